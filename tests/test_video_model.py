"""CogVLM2-Video (docs/spec/cogvlm2-video.md) as options of the one model: a tiny checkpoint in the
published layout against spec-literal reference code written here (frame preprocessing, the
frame layout and the run rule for positions; the tower and decoder from tests/reference.py, no
visual expert), the published configuration and its 12.5 B parameters, and batches of clips."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from cogvlm import CogVLM
from cogvlm.checkpoint import load_model, registry_template
from cogvlm.config import COGVLM2_VIDEO, REGISTRY, ConfigError, from_hf_config
from cogvlm.image import preprocess_frames
from cogvlm.model import CogVLMForCausalLM
from cogvlm.prompt import PromptTokens, layout_batch

from .conftest import published_video_config, published_video_names
from .reference import reference_decoder, reference_vision

TOL = 1e-5  # fp32 model vs float64 reference, logits O(1) (the brief allows 1e-4)
SIZE = 56  # the tiny tower's frame size: a 4x4 patch grid merged 2x2, 4 + 2 = 6 slots a frame
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


# ---- the spec, literally -------------------------------------------------------------------------

def spec_bilinear(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Bilinear resize of the last two axes, align_corners False, no antialiasing: output pixel d
    samples the input at (d + 0.5) * in / out - 0.5, clamped at 0, between its two neighbours.
    That coordinate is computed in float32, as torch does for a float32 input (in float64 it
    moves by up to 3e-5 px at 480 px, which shows at 1e-4 between neighbours 8 apart)."""
    def axis(n_in, n_out):
        scale = torch.tensor(n_in, dtype=torch.float32) / n_out
        src = ((torch.arange(n_out, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
        lo = src.floor().long()
        return lo, (lo + 1).clamp(max=n_in - 1), (src - lo).double()

    r0, r1, wy = axis(x.shape[-2], out_h)
    c0, c1, wx = axis(x.shape[-1], out_w)
    rows = x[..., r0, :] * (1 - wy)[:, None] + x[..., r1, :] * wy[:, None]
    return rows[..., c0] * (1 - wx) + rows[..., c1] * wx


def spec_preprocess(clip: torch.Tensor, s: int) -> torch.Tensor:
    """docs/spec/cogvlm2-video.md section 5.1, in float64: /255, normalise, short side to s, centre crop."""
    x = clip.double() / 255.0
    x = (x - torch.tensor(MEAN, dtype=torch.float64)[:, None, None, None]) / torch.tensor(
        STD, dtype=torch.float64)[:, None, None, None]
    _, _, h, w = x.shape
    if w < h:
        new_h, new_w = math.floor(h / w * s), s
    else:
        new_h, new_w = s, math.floor(w / h * s)
    x = spec_bilinear(x, new_h, new_w)
    i, j = round((new_h - s) / 2.0), round((new_w - s) / 2.0)  # Python: half to even
    return x[:, :, i:i + s, j:j + s].transpose(0, 1)


def spec_positions(types: list[int]) -> list[int]:
    """Section 6's rule as written: run starts and ends count as type 0; a token advances if it
    is type 0, or type 1 after a type 0."""
    n = len(types)
    relabelled = list(types)
    for i, t in enumerate(types):
        if t == 1 and (i == 0 or types[i - 1] == 0):
            relabelled[i] = 0  # run start
        if t == 1 and (i == n - 1 or types[i + 1] == 0):
            relabelled[i] = 0  # run end
    positions = [0]
    for i in range(1, n):
        advance = relabelled[i] == 0 or (relabelled[i] == 1 and relabelled[i - 1] == 0)
        positions.append(positions[-1] + advance)
    return positions


def spec_layout(tok: HFTokenizer, cfg, text: list[int], frames: int | None, template: str):
    """Section 6: bos, then per frame 66 placeholders (type 1) and, with the chat template, the
    frame's index as text; base and vqa: one run of all the slots; then the text."""
    ids, types = [cfg.bos_token_id], [0]
    slots = cfg.vision.num_tokens + 2
    for k in range(frames or 0):
        ids += [cfg.pad_token_id] * slots
        types += [1] * slots
        if template == "chat":
            index = tok.encode(str(k), add_special_tokens=False).ids
            ids += index
            types += [0] * len(index)
    return ids + text, types + [0] * len(text)


def spec_logits(model, tok, text: list[int], pixels: torch.Tensor | None, template: str) -> torch.Tensor:
    """float64 logits: each frame through the tower, its 66 rows written in order into the type-1
    slots, the decoder with the language weights for every token."""
    sd, cfg = model.state_dict(), model.config
    ids, types = spec_layout(tok, cfg, text, None if pixels is None else len(pixels), template)
    x = sd["model.embed_tokens.weight"].double()[torch.tensor(ids)]
    if pixels is not None:
        x[torch.tensor(types) == 1] = torch.cat([reference_vision(sd, cfg, frame) for frame in pixels])
    return reference_decoder(sd, cfg, x, spec_positions(types), torch.zeros(len(ids), dtype=torch.bool))


def clip(frames: int, height: int, width: int, seed: int) -> torch.Tensor:
    """A random uint8 clip in the demos' layout (3, T, H, W)."""
    return torch.randint(0, 256, (3, frames, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model(video_checkpoint):
    return load_model(video_checkpoint)[0].eval()


@pytest.fixture(scope="module")
def tok(video_checkpoint) -> HFTokenizer:
    return HFTokenizer.from_file(str(video_checkpoint / "tokenizer.json"))


@pytest.fixture(scope="module")
def vlm(video_checkpoint) -> CogVLM:
    return CogVLM.from_pretrained(video_checkpoint, device="cpu", prepack=False)


def prompt(vlm: CogVLM, query: str, video, template: str) -> PromptTokens:
    return vlm.prompt_tokens(None, query, None, template, video)


# ---- preprocessing ---------------------------------------------------------------------------------

CROP = 64  # 69 / 64 * 64 and 71 / 64 * 64 floor to 69 and 71 (at 56, 61 / 56 * 56 floors to 60)


@pytest.mark.parametrize("height,width,offsets", [
    (CROP + 5, CROP, (2, 0)),  # W < H, odd excess 5: round(2.5) = 2
    (CROP + 7, CROP, (4, 0)),  # W < H, odd excess 7: round(3.5) = 4, not 3
    (CROP, CROP + 5, (0, 2)),  # W > H
    (CROP, CROP + 7, (0, 4)),
    (CROP, CROP, (0, 0)),  # W == H takes the W >= H branch
])
def test_centre_crop_rounds_half_to_even(height, width, offsets):
    x = clip(2, height, width, seed=height + width)
    got = preprocess_frames(x, CROP)  # the short side is already S: the resize is the identity
    i, j = offsets
    normalised = (x.double() / 255 - torch.tensor(MEAN, dtype=torch.float64)[:, None, None, None]) / torch.tensor(
        STD, dtype=torch.float64)[:, None, None, None]
    assert got.shape == (2, 3, CROP, CROP) and got.dtype == torch.float32
    assert torch.allclose(got.double(), normalised[:, :, i:i + CROP, j:j + CROP].transpose(0, 1), atol=1e-6)
    assert torch.allclose(got.double(), spec_preprocess(x, CROP), atol=1e-6)


# (61, 56): floor(61 / 56 * 56) = floor(60.99999999999999) = 60, the authors' float arithmetic
@pytest.mark.parametrize("height,width", [(90, 70), (50, 77), (64, 39), (41, 41), (480, 854), (61, 56)])
def test_frames_match_the_spec_after_resize(height, width):
    """Short-side bilinear resize (no antialias) of the normalised clip, then the crop; W < H and W >= H."""
    x = clip(3, height, width, seed=height * width)
    got = preprocess_frames(x, SIZE)
    want = spec_preprocess(x, SIZE)
    assert got.shape == want.shape == (3, 3, SIZE, SIZE)
    assert (got.double() - want).abs().max().item() <= 1e-5


def test_bad_clips_are_named_errors(vlm):
    from cogvlm.errors import VideoError

    for bad in (torch.zeros(3, 2, 8, 8), torch.zeros(2, 8, 8, dtype=torch.uint8),
                torch.zeros(4, 2, 8, 8, dtype=torch.uint8), torch.zeros(3, 0, 8, 8, dtype=torch.uint8)):
        with pytest.raises(VideoError, match="uint8 tensor"):
            vlm.chat(None, "What happens?", video=bad)


# ---- layout: ids, token types, positions -------------------------------------------------------------

@pytest.mark.parametrize("template,frames", [("chat", 3), ("base", 3), ("vqa", 2), ("chat", None)])
def test_layout_is_the_specs(vlm, tok, template, frames):
    cfg = vlm.config
    video = None if frames is None else clip(frames, 60, 80, seed=1)
    p = prompt(vlm, "What happens next?", video, template)
    chunk = layout_batch([p], cfg)
    ids, types = spec_layout(tok, cfg, p.text_ids, frames, template)
    assert chunk.input_ids[0].tolist() == ids
    assert chunk.position_ids[0].tolist() == spec_positions(types)
    assert chunk.attention_mask.all()
    if frames is None:
        assert chunk.frames is None and chunk.frame_slots is None
    else:
        assert chunk.frame_slots[0].tolist() == [t == 1 for t in types]
        assert torch.equal(chunk.frames, preprocess_frames(video, SIZE))
    assert vlm.prompt_length(p) == len(ids)


def test_positions_chat_four_per_frame_base_one_run(vlm):
    """The section 6 table on the tiny tower (6 slots: boi, 4 patches, eoi)."""
    text = [5, 6]
    chat = layout_batch([PromptTokens(None, text, frames=torch.zeros(2, 3, SIZE, SIZE), frame_labels=([7], [8]))],
                        vlm.config)
    assert chat.position_ids[0].tolist() == [0, 1, 2, 2, 2, 2, 3, 4, 5, 6, 6, 6, 6, 7, 8, 9, 10]
    base = layout_batch([PromptTokens(None, text, frames=torch.zeros(3, 3, SIZE, SIZE), frame_labels=([], [], []))],
                        vlm.config)
    # all 18 slots one run: inner eois and bois sit at position 2 with the patches
    assert base.position_ids[0].tolist() == [0, 1] + [2] * 16 + [3, 4, 5]


# ---- logits and greedy tokens against the reference ----------------------------------------------------

@pytest.mark.parametrize("template,frames", [("chat", 3), ("base", 2), ("chat", None), ("base", None)])
def test_logits_match_the_reference(vlm, model, tok, template, frames):
    video = None if frames is None else clip(frames, 72, 64, seed=frames)
    p = prompt(vlm, "Question about the clip", video, template)
    with torch.no_grad():
        got = model(layout_batch([p], model.config))[0]
    want = spec_logits(model, tok, p.text_ids, p.frames, template)
    assert got.shape == want.shape
    assert (got.double() - want).abs().max().item() <= TOL


def test_greedy_tokens_match_the_reference(vlm, model, tok):
    video = clip(2, 64, 96, seed=3)
    p = prompt(vlm, "Describe it.", video, "chat")
    decoder = vlm.decoder([p], [vlm.sampling(top_k=1, max_new_tokens=5)])
    for _ in decoder.run():
        pass
    text, want = list(p.text_ids), []
    for _ in range(5):
        token = int(spec_logits(model, tok, text, p.frames, "chat")[-1].argmax())
        if token == model.config.eos_token_id:
            break
        want.append(token)
        text.append(token)  # generated tokens are text: type 0, last position + 1
    assert decoder.generated[0] == want and len(want) >= 3


# ---- batches of clips ------------------------------------------------------------------------------

def test_batch_of_clips_of_different_lengths_equals_one_at_a_time(vlm, model):
    prompts = [prompt(vlm, "What happens?", clip(3, 60, 90, seed=4), "chat"),
               prompt(vlm, "Describe the clip in detail.", clip(1, 100, 56, seed=5), "chat"),
               prompt(vlm, "Hello", None, "chat"),
               prompt(vlm, "The", clip(2, 56, 56, seed=6), "base")]
    chunk = layout_batch(prompts, model.config)
    assert not chunk.attention_mask.all()  # padding between frames and text, and after bos
    with torch.no_grad():
        batch = model(chunk)
        last = model(chunk, last_only=True)
        for row, p in enumerate(prompts):
            alone = model(layout_batch([p], model.config))[0]
            assert (batch[row][chunk.attention_mask[row]] - alone).abs().max().item() <= TOL
            assert (last[row] - alone[-1]).abs().max().item() <= TOL
    requests = [(None, "What happens?", None, clip(3, 60, 90, seed=4)), (None, "Hi", None),
                (None, "Describe the clip.", [("What is it?", "A clip.")], clip(1, 100, 56, seed=5))]
    greedy = dict(top_k=1, max_new_tokens=6, template="chat")
    assert vlm.generate(requests, **greedy) == [vlm.generate([r], **greedy)[0] for r in requests]


def test_joined_clips_decode_as_one_at_a_time(vlm):
    """Continuous batching: a clip's decoder joins a running one mid-way (the server's path)."""
    talk = vlm.sampling(top_k=1, max_new_tokens=8)
    a = prompt(vlm, "What happens?", clip(3, 60, 90, seed=7), "chat")
    b = prompt(vlm, "And then?", clip(1, 70, 70, seed=8), "chat")

    def alone(p):
        d = vlm.decoder([p], [talk])
        for _ in d.run():
            pass
        return d.generated[0]

    running = vlm.decoder([a], [talk])
    running.step()
    running.step()
    rows = running.join(vlm.decoder([b, a], [talk, talk]))
    for _ in running.run():
        pass
    assert [running.generated[r] for r in [0, *rows]] == [alone(a), alone(b), alone(a)]


def test_the_scheduler_serves_concurrent_clips_as_one_at_a_time(vlm):
    """The server's continuous batching over video rows: clips of 1-3 frames and a text prompt,
    submitted together, answered as `chat` answers each alone."""
    from cogvlm.scheduler import Scheduler

    requests = [("What happens?", clip(3, 60, 90, seed=15)), ("Hello", None), ("And here?", clip(1, 80, 64, seed=16)),
                ("Describe it.", clip(2, 64, 64, seed=17))]
    params = vlm.sampling(top_k=1, max_new_tokens=10)
    sched = Scheduler(vlm, max_batch=8)
    try:
        jobs = [sched.submit(prompt(vlm, q, video, "chat"), params) for q, video in requests]
        answers = [j.result(timeout=120) for j in jobs]
        assert sched.max_batch_seen > 1
    finally:
        sched.close()
    assert answers == [vlm.chat(None, q, template="chat", video=video, top_k=1, max_new_tokens=10)[0]
                       for q, video in requests]


# ---- the API ---------------------------------------------------------------------------------------

def test_session_encodes_the_clip_once_and_answers_as_chat(vlm):
    calls = []
    hook = vlm.model.model.vision.register_forward_hook(lambda *_: calls.append(1))
    video = clip(2, 64, 64, seed=9)
    greedy = dict(top_k=1, max_new_tokens=5)
    try:
        session = vlm.session(template="chat", video=video, **greedy)
        first, second = session.ask("What is it?"), session.ask("Why?")
        assert len(calls) == 1
        session.clear()
        again = session.ask("What is it?")
        assert len(calls) == 1
    finally:
        hook.remove()
    want_first, history = vlm.chat(None, "What is it?", template="chat", video=video, **greedy)
    assert first == want_first == again
    assert second == vlm.chat(None, "Why?", history, template="chat", video=video, **greedy)[0]
    assert "".join(vlm.stream(None, "What is it?", template="chat", video=video, **greedy)) == first


def test_caption_asks_the_captioners_question_in_the_chat_template(vlm):
    from cogvlm.api import VIDEO_CAPTION_PROMPT

    video = clip(2, 64, 80, seed=10)
    greedy = dict(top_k=1, max_new_tokens=6)
    assert VIDEO_CAPTION_PROMPT == "Please describe this video in detail."
    want = vlm.chat(None, VIDEO_CAPTION_PROMPT, template="chat", video=video, **greedy)[0]
    assert vlm.caption(video=video, **greedy) == want
    assert vlm.caption(video=video, query="", template="base", **greedy) == \
        vlm.chat(None, "", template="base", video=video, **greedy)[0]


def test_wrong_inputs_are_named_errors(vlm, talkative_vlm):
    from cogvlm.errors import ContextLengthError, ImageError, UsageError, VideoError

    video = clip(2, 64, 64, seed=0)
    image = torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()
    with pytest.raises(VideoError, match="takes images, not videos"):
        talkative_vlm.chat(None, "What happens?", video=video)
    with pytest.raises(VideoError, match="not both"):
        vlm.chat(image, "What happens?", video=video)
    with pytest.raises(ImageError, match="takes videos, not images"):
        vlm.chat(image, "What is it?")
    with pytest.raises(UsageError, match="an image or a video"):
        vlm.caption()
    # 1 + 3 x (6 slots + 1 index) + the text: past max_length 20
    with pytest.raises(ContextLengthError, match="frame slots"):
        vlm.chat(None, "What happens in this clip?", template="chat", video=clip(3, 56, 56, seed=0), max_length=20)


# ---- the published configuration, checkpoint and registry ------------------------------------------

PUBLISHED = {  # docs/spec/cogvlm2-video.md section 3, verbatim but transformers_version
    "architectures": ["CogVLMVideoForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_cogvlm.CogVLMConfig",
                 "AutoModelForCausalLM": "modeling_cogvlm.CogVLMVideoForCausalLM"},
    "bos_token_id": 128000, "eos_token_id": 128001, "pad_token_id": 128002, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 2048,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_multi_query_heads": 8, "rms_norm_eps": 1e-05,
    "template_version": "base", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "vocab_size": 128256,
    "vision_config": {"dropout_prob": 0.0, "hidden_act": "gelu", "hidden_size": 1792, "image_size": 224,
                      "in_channels": 3, "intermediate_size": 15360, "layer_norm_eps": 1e-06, "num_heads": 16,
                      "num_hidden_layers": 63, "num_positions": 257, "patch_size": 14},
}


def test_published_config_reads_as_the_registry_entries():
    cfg = from_hf_config(PUBLISHED)
    assert cfg == COGVLM2_VIDEO == REGISTRY["cogvlm2-video-llama3-base"].config
    assert cfg.video and not cfg.visual_expert and cfg.template == "base"
    assert (cfg.image_tokens, cfg.vision.num_positions, cfg.vision.num_tokens) == (66, 257, 64)
    assert (cfg.stop_ids, cfg.pad_token_id, cfg.max_position_embeddings, cfg.rope_theta) == ((128001,), 128002, 2048,
                                                                                                500000.0)
    assert cfg.num_key_value_heads == 8 and cfg.rope_freqs_in_weights
    assert from_hf_config(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg
    assert cfg.to_hf_dict()["architectures"] == ["CogVLMVideoForCausalLM"]
    templates = {name: REGISTRY[name].config.template for name in
                 ("cogvlm2-video-llama3-chat", "cogvlm2-video-llama3-base", "cogvlm2-llama3-caption")}
    assert templates == {"cogvlm2-video-llama3-chat": "chat", "cogvlm2-video-llama3-base": "base",
                         "cogvlm2-llama3-caption": "chat"}
    for name in templates:
        assert registry_template(name) == templates[name] == registry_template(REGISTRY[name].hf_repo)
        assert REGISTRY[name].config == cfg.__class__(**{**cfg.__dict__, "template": templates[name]})
    with pytest.raises(ConfigError, match="no visual expert"):
        cfg.__class__(**{**cfg.__dict__, "visual_expert": True})


def test_full_size_model_has_the_published_names_shapes_and_count():
    with torch.device("meta"):
        model = CogVLMForCausalLM(REGISTRY["cogvlm2-llama3-caption"].config)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == published_video_names(PUBLISHED) and len(got) == 1029
    assert not any("vision_expert" in k or "vision_mlp" in k for k in got)
    assert sum(p.numel() for p in model.parameters()) == 12_507_530_496
    parts = dict.fromkeys(("model.vision.patch_embedding.", "model.vision.transformer.", "model.vision.conv.",
                           "model.vision.linear_proj.", "model.vision.boi", "model.vision.eoi"), 0)
    for name, p in model.named_parameters():
        for prefix in parts:
            parts[prefix] += p.numel() if name.startswith(prefix) else 0
    assert parts["model.vision.patch_embedding."] + parts["model.vision.transformer."] == 4_280_905_216
    assert parts["model.vision.conv."] == 12_846_848 and parts["model.vision.linear_proj."] == 183_508_992
    assert parts["model.vision.boi"] + parts["model.vision.eoi"] == 8_192
    language = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("model.vision."))
    assert language == 8_030_261_248


def test_tiny_checkpoint_loads_from_the_published_layout(video_checkpoint, bpe_tokenizer_path, model):
    """Read by architecture: no vision-expert tensors expected; the slots a frame follow the tower."""
    stored = published_video_config(bpe_tokenizer_path)
    assert model.config.video and not model.config.visual_expert and model.config.template == "base"
    assert model.config.image_tokens == 6 and model.config.stop_ids == (stored["eos_token_id"],)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == published_video_names(stored)
    inv_freq = model.model.layers[0].self_attn.rotary_emb.inv_freq
    exact = 500000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    assert torch.equal(inv_freq, exact.to(torch.bfloat16).float())  # the stored bf16 values, not recomputed
    # a folder keeps its config.json's template: the published files all say base
    assert registry_template(video_checkpoint) is None
    assert CogVLM.from_pretrained(video_checkpoint, device="cpu").config.template == "base"


# ---- plan, quantize, tensor parallelism ---------------------------------------------------------------

def test_plan_counts_the_published_checkpoint():
    from cogvlm.plan import plan, weight_bytes

    cfg = REGISTRY["cogvlm2-video-llama3-chat"].config
    weights = weight_bytes(cfg)
    # spec section 3: six bf16 files of 25,015,199,008 bytes = 2 x (parameters + 2048 inv_freq) + 133,920 of headers
    assert weights["total"] == 2 * (12_507_530_496 + 2048) == 25_015_199_008 - 133_920
    assert weights["decode_step"] == 2 * (8_030_261_248 - 128256 * 4096 + 4096 + 2048)  # language weights, one embedding row
    halves = plan(cfg, tp=2)
    assert weights["total"] / 2 < halves.weights < 0.52 * weights["total"]  # the adapter and norms on both ranks
    assert plan(cfg, quant=4).weights < 0.56 * weights["total"]


def test_quantized_checkpoint_of_a_video_model(video_checkpoint, model, tmp_path):
    """`cogvlm quantize` of a model without the visual expert: int8 decoder and head, loaded back."""
    from cogvlm.checkpoint import quantize_checkpoint
    from cogvlm.quantize import Int8Linear, QuantConfig

    quantize_checkpoint(video_checkpoint, tmp_path / "int8", QuantConfig(8))
    quantized, _ = load_model(tmp_path / "int8", dtype=torch.bfloat16)  # as CogVLM.load runs quantized models
    assert quantized.config.video and isinstance(quantized.model.layers[0].mlp.language_mlp.down_proj, Int8Linear)
    chunk = layout_batch([PromptTokens(None, [5, 6, 7], frames=preprocess_frames(clip(2, 60, 60, seed=12), SIZE),
                                       frame_labels=([15], [16]))], model.config)
    with torch.no_grad():
        got, want = quantized(chunk)[0], model(chunk)[0]
    # int8 per output row, bf16 activations (vs the fp32 model): measured 1.8% of the largest logit
    assert (got - want).abs().max() <= 0.027 * want.abs().max()  # 1.5x the measurement


@pytest.mark.slow  # a second process
def test_two_ranks_equal_one_process(video_checkpoint, model):
    from .test_tp import assert_same_logits, on_two_ranks

    prompts = [PromptTokens(None, [5, 6, 7, 8], frames=preprocess_frames(clip(3, 60, 80, seed=13), SIZE),
                            frame_labels=([15], [16], [17])),
               PromptTokens(None, [9, 10]),
               PromptTokens(None, [11], frames=preprocess_frames(clip(1, 56, 70, seed=14), SIZE), frame_labels=([],))]
    for split in on_two_ranks(video_checkpoint):
        assert_same_logits(model, split.model, layout_batch(prompts, model.config))
