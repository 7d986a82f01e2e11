"""CogAgent (cogagent.md): a tiny random CogAgent against the spec-literal reference, the
cross-attention keys/values kept with the KV cache, the published configuration, and the
checkpoint layouts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cogvlm import CogVLM
from cogvlm.checkpoint import convert, load_model, save_hf
from cogvlm.config import REGISTRY, from_hf_config, from_sat_config
from cogvlm.errors import ConfigError
from tests.configs import tiny_test_config
from cogvlm.model import CogVLMForCausalLM, KVCache
from cogvlm.prompt import ImageRequiredError, PromptTokens, agent_query, build_prompt, continuation_chunk, layout_batch
from cogvlm.tokenizer import Tokenizer

from .reference import reference_logits, reference_prompt
from .test_checkpoint import rank_slice, sat_name

TOL = 1e-5  # fp32 model vs float64 reference; logits are O(1), so this is ~100 ulp of fp32
LOW, HIGH = 28, 56  # the tiny config's two image sizes (2x2 and 4x4 patches)
IMAGE = Path(__file__).resolve().parent.parent / "cogvlm" / "web_examples" / "shapes-0.png"


def tiny_cogagent_config(**kw):
    return tiny_test_config(vocab_size=400, template="inst", cross_vision={}, **kw)


def randomize_all(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere; every norm's weight near 1 (the high-resolution tower has norms
    named norm1/norm2/inner_attn_ln/ffn_ln), so no path is scaled away."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.08
            is_norm = p.ndim == 1 and name.endswith("weight") and ("norm" in name or "_ln" in name)
            p.copy_(1.0 + noise if is_norm else noise)
    return model


@pytest.fixture
def agent() -> CogVLMForCausalLM:
    return randomize_all(CogVLMForCausalLM(tiny_cogagent_config())).eval()


def pictures(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, LOW, LOW, generator=g), torch.randn(3, HIGH, HIGH, generator=g)) for _ in range(n)]


def tower_runs(model: CogVLMForCausalLM) -> list[int]:
    """A counter of high-resolution tower passes (images per pass)."""
    runs: list[int] = []
    model.model.cross_vision.register_forward_hook(lambda m, args, out: runs.append(args[0].shape[0]))
    return runs


# ---- the forward pass against the reference --------------------------------------------------

def test_image_matches_reference(agent):
    (px, cx), = pictures(1)
    ids = [11, 12, 13, 14, 15]
    with torch.no_grad():
        got = agent(layout_batch([PromptTokens(px, ids, cx)], agent.config))[0]
    want = reference_logits(agent.state_dict(), agent.config, ids, px, cx)
    assert got.shape == want.shape == (1 + 6 + 5, 400)
    assert (got.double() - want).abs().max().item() <= TOL


def test_every_cogagent_part_changes_the_logits(agent):
    """The reference comparison above can fail: each CogAgent-specific weight moves the logits
    far beyond the tolerance, and the tower's last block (never run, spec 13.1) does not."""
    (px, cx), = pictures(1, seed=1)
    chunk = layout_batch([PromptTokens(px, [5, 6, 7], cx)], agent.config)
    with torch.no_grad():
        base = agent(chunk)
        for name in ["model.vision.pos_embed", "model.cross_vision.pos_embed",
                     "model.cross_vision.vit.model.blocks.1.attn.q_bias",
                     "model.layers.0.cross_attn.key_value.weight", "model.layers.1.post_cross_attention_layernorm.weight",
                     "model.cross_vision.vit.model.blocks.2.attn.q_proj.weight"]:
            p = agent.get_parameter(name)
            saved = p.clone()
            p.add_(0.5)
            moved = (agent(chunk) - base).abs().max().item()
            p.copy_(saved)
            if ".blocks.2." in name:  # the last of the 3 built blocks
                assert moved == 0, name
            else:
                assert moved > 1e-3, name


@pytest.mark.parametrize("template", ["inst", "chat", "vqa"])
def test_history_prompt_matches_reference(agent, sp_model_path, template):
    tok = Tokenizer(sp_model_path)
    history = [("What is in the image?", "a red circle"), ("How many objects are there?", "3")]
    query = agent_query("Search for CogVLM")
    assert query == 'What steps do I need to take to "Search for CogVLM"?(with grounding)'
    prompt = build_prompt(query, history, template)
    assert prompt == reference_prompt(query, history, template)
    (px, cx), = pictures(1, seed=2)
    ids = tok.encode(prompt)
    with torch.no_grad():
        got = agent(layout_batch([PromptTokens(px, ids, cx)], agent.config))[0]
    want = reference_logits(agent.state_dict(), agent.config, ids, px, cx)
    assert (got.double() - want).abs().max().item() <= TOL


def test_inst_template_is_the_spec_string():
    assert build_prompt("Hi", (), "inst") == " [INST] Hi [/INST] "
    assert build_prompt("q2", [("q1", "a1")], "inst") == " [INST] q1 [/INST] a1 [INST] q2 [/INST] "


def test_padded_batch_matches_reference_per_row(agent):
    pics = pictures(3, seed=3)
    texts = [[4, 5, 6, 7, 8, 9], [12], []]
    prompts = [PromptTokens(px, t, cx) for (px, cx), t in zip(pics, texts)]
    chunk = layout_batch(prompts, agent.config)
    with torch.no_grad():
        logits = agent(chunk)
        last = agent(chunk, last_only=True)
    for row, p in enumerate(prompts):
        want = reference_logits(agent.state_dict(), agent.config, p.text_ids, p.pixels, p.cross_pixels)
        got = logits[row][chunk.attention_mask[row]]
        assert got.shape == want.shape
        assert (got.double() - want).abs().max().item() <= TOL
        assert (last[row].double() - want[-1]).abs().max().item() <= TOL


def test_bf16_close_to_fp32(agent):
    (px, cx), = pictures(1, seed=6)
    chunk = layout_batch([PromptTokens(px, [20, 21, 22], cx)], agent.config)
    half = CogVLMForCausalLM(agent.config)
    half.load_state_dict(agent.state_dict())
    half = half.to(torch.bfloat16).eval()
    with torch.no_grad():
        want, got = agent(chunk), half(chunk)
    assert got.dtype == torch.float32
    # bf16 has 8 mantissa bits: a few % of the logit scale after two towers and two layers
    assert (got - want).abs().max().item() <= 0.05 * want.abs().max().item()


def test_text_only_is_refused(agent):
    """Neither of the authors' code paths runs CogAgent without an image (docs/spec/cogagent.md section 10)."""
    with pytest.raises(ImageRequiredError):
        layout_batch([PromptTokens(*pictures(1)[0][:1], [5], pictures(1)[0][1]), PromptTokens(None, [6])],
                     agent.config)
    with pytest.raises(ValueError, match="without an image"):
        agent(layout_batch([PromptTokens(None, [5, 6])], agent.config))


# ---- the cross-attention keys/values live with the KV cache -------------------------------------

def test_cached_decoding_equals_full_recompute(agent):
    (px, cx), (px2, cx2) = pictures(2, seed=4)
    prompts = [PromptTokens(px, [5, 6, 7], cx), PromptTokens(px2, [8], cx2)]
    chunk = layout_batch(prompts, agent.config)
    runs = tower_runs(agent)
    cache = agent.new_cache(2, chunk.input_ids.shape[1] + 4)
    with torch.no_grad():
        agent(chunk, cache, last_only=True)
        new = [[20, 21], [30, 31]]
        positions = chunk.position_ids[:, -1] + 1
        steps = [agent.decode_step(torch.tensor([a, b]), positions + i, cache) for i, (a, b) in enumerate(zip(*new))]
        more = agent(continuation_chunk(torch.tensor([[22], [32]]), positions + 2), cache, last_only=True)
    assert runs == [2]  # prefill only: decode steps and the later chunk read the cached k/v
    for row, p in enumerate(prompts):
        ids = p.text_ids + new[row] + [[22], [32]][row]
        want = reference_logits(agent.state_dict(), agent.config, ids, p.pixels, p.cross_pixels)
        for i, step in enumerate(steps):
            assert (step[row].double() - want[-3 + i]).abs().max().item() <= TOL
        assert (more[row].double() - want[-1]).abs().max().item() <= TOL


def test_cache_rows_keep_and_concat_carry_the_cross_keys_values(agent):
    pics = pictures(3, seed=5)
    caches = []
    with torch.no_grad():
        for rows in ([0, 1], [2]):
            chunk = layout_batch([PromptTokens(pics[r][0], [5 + r] * (r + 1), pics[r][1]) for r in rows], agent.config)
            cache = agent.new_cache(len(rows), chunk.input_ids.shape[1] + 2)
            agent(chunk, cache)
            caches.append(cache)
    a, b = caches
    both = KVCache.concat(a, b, 20)
    for layer in range(agent.config.num_layers):
        for i in range(2):
            assert torch.equal(both.cross[layer][i], torch.cat([a.cross[layer][i], b.cross[layer][i]]))
    both.keep_rows(torch.tensor([2, 0]))
    assert torch.equal(both.cross[1][0], torch.cat([b.cross[1][0], a.cross[1][0][:1]]))


def test_high_res_tower_runs_once_per_image_in_chat_batches_and_joins(agent_checkpoint):
    vlm = CogVLM.from_pretrained(agent_checkpoint, device="cpu")
    runs = tower_runs(vlm.model)
    greedy = dict(top_k=1, max_new_tokens=3)
    session = vlm.session(IMAGE, max_length=100, **greedy)  # a cache of 100 slots
    first = session.ask(agent_query("Search for CogVLM"))
    cache = session.cache
    second = session.ask("And then?")
    assert session.cache is cache
    third = session.ask("Why?", max_length=512)  # past 100 slots: a bigger cache, the k/v move to it
    assert session.cache is not cache
    assert runs == [1]
    assert [first, second, third] == [a for _, a in session.history]
    fresh = vlm.chat(IMAGE, "Why?", history=session.history[:2], **greedy)[0]
    assert third == fresh  # the cached turn answers as a fresh call (which runs the tower again)
    assert runs == [1, 1]

    runs.clear()
    params = vlm.sampling(**greedy)
    prompts = [vlm.prompt_tokens(IMAGE, q) for q in ("one", "two two", "three")]
    running = vlm.decoder(prompts[:2], [params] * 2)
    running.step()
    running.finish(0)  # row 0 ends: keep_rows drops it
    running.step()
    running.join(vlm.decoder(prompts[2:], [params]))  # continuous batching: KVCache.concat
    while not running.done:
        running.step()
    assert runs == [2, 1]  # one pass per image, at its prefill
    alone = vlm.generate([(IMAGE, "three", None)], **greedy)[0]
    assert vlm.tokenizer.decode(running.generated[2]).strip() == alone


@pytest.mark.slow  # compiling the decode step: ~30 s
def test_compiled_decode_matches_eager(agent_checkpoint, fresh_dynamo):
    """compile=True: the compiled decode step takes each layer's cached cross-attention keys and
    values as inputs. Greedy tokens equal the eager ones and logits stay within 1e-4, for one
    row and a batch of two, across a growth of the attention window and a second turn that
    reuses the cached image features; a new image of the same size compiles nothing new."""
    from torch._dynamo.utils import counters

    from cogvlm.model import DECODE_WINDOW

    eager = CogVLM.from_pretrained(agent_checkpoint, device="cpu").model
    compiled = CogVLM.from_pretrained(agent_checkpoint, device="cpu", compile=True).model
    steps = DECODE_WINDOW + 8

    @torch.no_grad()
    def greedy(model: CogVLMForCausalLM, prompts: list[PromptTokens]) -> torch.Tensor:
        chunk = layout_batch(prompts, model.config)
        cache = model.new_cache(len(prompts), chunk.input_ids.shape[1] + steps + 2)
        logits, positions, out = model(chunk, cache, last_only=True), chunk.position_ids[:, -1] + 1, []
        for i in range(steps):
            if i == steps // 2:  # a second turn: text only, the image's keys/values from the cache
                turn = continuation_chunk(torch.tensor([[22, 23]] * len(prompts)), positions)
                logits, positions = model(turn, cache, last_only=True), positions + 2
            logits = model.decode_step(logits.argmax(-1), positions, cache)
            positions = positions + 1
            out.append(logits)
        return torch.stack(out)

    (px, cx), (px2, cx2), (px3, cx3) = pictures(3, seed=6)
    graphs = counters["stats"]["unique_graphs"]
    for prompts in ([PromptTokens(px, [5, 6, 7], cx)], [PromptTokens(px, [5, 6, 7], cx), PromptTokens(px2, [8], cx2)]):
        want, got = greedy(eager, prompts), greedy(compiled, prompts)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        assert (got - want).abs().max().item() <= 1e-4
    assert counters["stats"]["unique_graphs"] > graphs  # the compiled step did run
    graphs = counters["stats"]["unique_graphs"]
    greedy(compiled, [PromptTokens(px3, [5, 6, 7], cx3)])
    assert counters["stats"]["unique_graphs"] == graphs


def test_api_refuses_text_only(agent_checkpoint):
    vlm = CogVLM.from_pretrained(agent_checkpoint, device="cpu")
    with pytest.raises(ImageRequiredError, match="CogAgent needs an image"):
        vlm.chat(None, "hello")


# ---- configuration ---------------------------------------------------------------------------

PUBLISHED_HF = {  # cogagent-chat-hf's config.json keys (docs/spec/cogagent.md section 3)
    "architectures": ["CogAgentForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32000, "hidden_act": "silu",
    "rms_norm_eps": 1e-05, "max_position_embeddings": 2048, "tie_word_embeddings": False, "bos_token_id": 1,
    "eos_token_id": 2, "pad_token_id": 0, "template_version": "chat", "torch_dtype": "bfloat16",
    "cross_hidden_size": 1024, "cross_compute_hidden_size": 1024, "cross_image_size": 1120,
    "vision_config": {"hidden_size": 1792, "num_hidden_layers": 63, "num_heads": 16, "intermediate_size": 15360,
                      "hidden_act": "gelu", "layer_norm_eps": 1e-6, "patch_size": 14, "in_channels": 3,
                      "image_size": 224, "num_positions": 257, "dropout_prob": 0.0},
}
PUBLISHED_SAT = {  # cogagent-chat's model_config.json (docs/spec/cogagent.md section 3)
    "model_class": "CogAgentModel", "num_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
    "vocab_size": 32000, "inner_hidden_size": 11008, "use_bias": False, "layernorm_order": "pre",
    "max_sequence_length": 4096, "is_decoder": [True] * 32, "cross_attn_hidden_size": 1024,
    "cross_hidden_size_per_attention_head": 32, "image_length": 256, "cross_image_pix": 1120, "encoder_args": {},
    "use_neft_noise": True, "text_processor_version": "chat",
    "eva_args": {"num_layers": 63, "hidden_size": 1792, "num_attention_heads": 16, "inner_hidden_size": 15360,
                 "layernorm_epsilon": 1e-6, "image_size": [224, 224], "patch_size": 14, "pre_len": 1,
                 "vocab_size": 1, "max_sequence_length": 257, "row_parallel_linear_final_bias": False},
}


def test_published_configs_read_as_the_registry_entry():
    want = REGISTRY["cogagent-chat"].config
    assert from_hf_config(PUBLISHED_HF) == want
    sat = from_sat_config(PUBLISHED_SAT)
    assert sat.max_position_embeddings == 4096 and sat.rms_norm_eps == 1e-5  # SAT's defaults
    assert sat == type(want)(**{**want.__dict__, "max_position_embeddings": 4096})
    assert from_hf_config({**PUBLISHED_HF, "template_version": "chat_old"}).template == "chat"
    assert REGISTRY["cogagent-vqa"].config.template == "chat" and REGISTRY["cogagent-vqa"].hf_repo == "THUDM/cogagent-vqa-hf"
    assert from_hf_config(want.to_hf_dict()) == want and "cross_vision_config" not in want.to_hf_dict()
    tiny = tiny_cogagent_config()
    assert from_hf_config(tiny.to_hf_dict()) == tiny


# The CogAgent additions of docs/spec/cogagent.md section 12 (HF names), i over 32 decoder layers, j over 24 blocks.
SPEC_CROSS_LAYER = {
    "post_cross_attention_layernorm.weight": (4096,), "cross_attn.query.weight": (1024, 4096),
    "cross_attn.key_value.weight": (2048, 1024), "cross_attn.dense.weight": (4096, 1024),
}
SPEC_BLOCK = {
    "norm1.weight": (1024,), "norm1.bias": (1024,), "norm2.weight": (1024,), "norm2.bias": (1024,),
    **{f"attn.{p}_proj.weight": (1024, 1024) for p in "qkv"}, "attn.q_bias": (1024,), "attn.v_bias": (1024,),
    "attn.inner_attn_ln.weight": (1024,), "attn.inner_attn_ln.bias": (1024,),
    "attn.proj.weight": (1024, 1024), "attn.proj.bias": (1024,),
    "mlp.w1.weight": (2730, 1024), "mlp.w1.bias": (2730,), "mlp.w2.weight": (2730, 1024), "mlp.w2.bias": (2730,),
    "mlp.ffn_ln.weight": (2730,), "mlp.ffn_ln.bias": (2730,), "mlp.w3.weight": (1024, 2730), "mlp.w3.bias": (1024,),
}
SPEC_CROSS_OTHER = {
    "model.vision.pos_embed": (256, 1792), "model.cross_vision.pos_embed": (6400, 1024),
    "model.cross_vision.vit.model.cls_token": (1, 1, 1024), "model.cross_vision.vit.model.pos_embed": (1, 6401, 1024),
    "model.cross_vision.vit.model.patch_embed.proj.weight": (1024, 3, 14, 14),
    "model.cross_vision.vit.model.patch_embed.proj.bias": (1024,),
    "model.cross_vision.vit.model.norm.weight": (1024,), "model.cross_vision.vit.model.norm.bias": (1024,),
    "model.cross_vision.vit.model.head.weight": (768, 1024), "model.cross_vision.vit.model.head.bias": (768,),
}


def test_full_size_model_has_spec_names_shapes_and_count():
    from .test_model import SPEC_DECODER, SPEC_OTHER, SPEC_VISION_LAYER

    with torch.device("meta"):
        model = CogVLMForCausalLM(REGISTRY["cogagent-chat"].config)
    want = {**SPEC_OTHER, "model.vision.patch_embedding.position_embedding.weight": (257, 1792), **SPEC_CROSS_OTHER}
    want.update({f"model.layers.{i}.{k}": s for i in range(32) for k, s in {**SPEC_DECODER, **SPEC_CROSS_LAYER}.items()})
    want.update({f"model.vision.transformer.layers.{j}.{k}": s for j in range(63) for k, s in SPEC_VISION_LAYER.items()})
    want.update({f"model.cross_vision.vit.model.blocks.{j}.{k}": s for j in range(24) for k, s in SPEC_BLOCK.items()})
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == want
    assert sum(math.prod(s) for s in got.values()) == 18_291_033_280
    block = sum(math.prod(s) for s in SPEC_BLOCK.values())
    assert block == 12_602_024  # the never-run block of the spec's table


# ---- checkpoints: HF and SAT (model-parallel) layouts ----------------------------------------------

def cogagent_sat_name(hf: str) -> str:
    """docs/spec/cogagent.md section 12, written out independently of cogvlm.checkpoint."""
    parts = hf.split(".")
    if hf.startswith("model.layers.") and parts[3] in ("cross_attn", "post_cross_attention_layernorm"):
        i = parts[2]
        if parts[3] == "post_cross_attention_layernorm":
            return f"transformer.layers.{i}.post_cross_attention_layernorm.weight"
        return f"transformer.layers.{i}.cross_attention.{parts[4]}.weight"
    if hf == "model.vision.pos_embed":
        return "mixins.eva.pos_embed"
    if hf.startswith("model.cross_vision."):
        return "mixins.encoder." + hf[len("model.cross_vision."):]
    return sat_name(hf)


def cogagent_rank_slice(hf: str, t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    if hf.endswith("cross_attn.key_value.weight"):  # rank r holds [k_r; v_r]
        return torch.cat([half.chunk(world, 0)[rank] for half in t.chunk(2, 0)])
    if hf.endswith("cross_attn.query.weight"):
        return t.chunk(world, 0)[rank]
    if hf.endswith("cross_attn.dense.weight"):
        return t.chunk(world, 1)[rank]
    if hf.startswith("model.cross_vision."):
        return t
    return rank_slice(hf, t, rank, world)


def write_cogagent_sat(folder: Path, model: CogVLMForCausalLM, world: int) -> None:
    cfg = model.config
    v, cv = cfg.vision, cfg.cross_vision
    folder.mkdir(parents=True)
    (folder / "latest").write_text("500\n")
    (folder / "model_config.json").write_text(json.dumps({
        **PUBLISHED_SAT, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_heads, "vocab_size": cfg.vocab_size, "inner_hidden_size": cfg.intermediate_size,
        "max_sequence_length": cfg.max_position_embeddings, "is_decoder": [True] * cfg.num_layers,
        "cross_attn_hidden_size": cv.hidden_size, "cross_hidden_size_per_attention_head": cfg.cross_head_dim,
        "image_length": v.num_patches, "cross_image_pix": cv.image_size,
        "cross_vision_config": {k: val for k, val in cv.to_dict().items() if k not in ("image_size", "hidden_size")},
        "eva_args": {**PUBLISHED_SAT["eva_args"], "num_layers": v.num_layers, "hidden_size": v.hidden_size,
                     "num_attention_heads": v.num_heads, "inner_hidden_size": v.intermediate_size,
                     "image_size": [v.image_size, v.image_size]},
    }))
    (folder / "500").mkdir()
    for rank in range(world):
        sd = {cogagent_sat_name(k): cogagent_rank_slice(k, t, rank, world).clone() for k, t in model.state_dict().items()}
        # buffers the authors' state dicts hold: derived, so any values are ignored
        sd["mixins.encoder.vit.model.rope.freqs_cos"] = torch.ones(cv.num_patches, 16)
        sd["mixins.encoder.vit.model.blocks.0.attn.rope.freqs_sin"] = torch.ones(cv.num_patches, 16)
        torch.save({"module": sd}, folder / "500" / f"mp_rank_{rank:02d}_model_states.pt")


def logits_of(model: CogVLMForCausalLM) -> torch.Tensor:
    (px, cx), (px2, cx2) = pictures(2, seed=9)
    chunk = layout_batch([PromptTokens(px, [5, 6, 7], cx), PromptTokens(px2, [8], cx2)], model.config)
    with torch.no_grad():
        return model(chunk)


@pytest.mark.parametrize("world", [1, 2])
def test_sat_checkpoint_loads_and_converts(agent, tmp_path, world):
    sat = tmp_path / "sat"
    write_cogagent_sat(sat, agent, world)
    loaded, _ = load_model(sat)
    assert loaded.config == type(agent.config)(**{**agent.config.__dict__, "template": "inst"})
    for name, t in agent.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    # bit-identical weights; logits within 1e-5 (CPU kernels may sum in another order)
    torch.testing.assert_close(logits_of(loaded), logits_of(agent), rtol=TOL, atol=TOL)
    hf = convert(sat, tmp_path / "hf", max_shard_bytes=100_000)
    assert json.loads((hf / "config.json").read_text())["template_version"] == "chat"  # inst, as published
    again, _ = load_model(hf)
    assert again.config == loaded.config
    assert all(torch.equal(again.state_dict()[k], t) for k, t in agent.state_dict().items())


# ---- the surfaces ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def agent_checkpoint(tmp_path_factory, sp_model_path) -> Path:
    """A tiny random CogAgent in the Hugging Face layout, with its tokenizer."""
    # 2048 positions, as the real checkpoints (and the server tests' --max_length)
    model = randomize_all(CogVLMForCausalLM(tiny_cogagent_config(max_position_embeddings=2048)), seed=11)
    with torch.no_grad():
        model.lm_head.weight[model.config.eos_token_id] = -1
    out = save_hf(model.state_dict(), model.config, tmp_path_factory.mktemp("agent") / "ckpt")
    (out / "tokenizer.model").write_bytes(sp_model_path.read_bytes())
    return out


def test_chat_one_shot_answers_as_the_api(agent_checkpoint, tmp_path, capsys, monkeypatch):
    from cogvlm.cli import main

    monkeypatch.chdir(tmp_path)
    query = agent_query("Open the settings")
    flags = ["--top_k", "1", "--max_new_tokens", "4"]
    assert main(["chat", "--model", str(agent_checkpoint), "--image", str(IMAGE), "--query", query, "--json", "--no-draw",
                 *flags]) == 0
    record = json.loads(capsys.readouterr().out)
    vlm = CogVLM.from_pretrained(agent_checkpoint, device="cpu")
    assert record["answer"] == vlm.chat(IMAGE, query, top_k=1, max_new_tokens=4)[0]
    assert record["operations"] == []  # a random model writes no Grounded Operation line
    # CogAgent has no text-only mode: one line, exit 2
    assert main(["chat", "--model", str(agent_checkpoint), "--query", "hi", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cogvlm chat: error: CogAgent needs an image") and err.count("\n") == 1


def test_operation_box_is_drawn_on_the_screenshot(tmp_path):
    """What `cogvlm chat` and `cogvlm web` draw for an agent answer (both call turn_boxes)."""
    from PIL import Image

    from cogvlm.cli.chat import save_drawing
    from cogvlm.grounding import turn_boxes
    from cogvlm.grounding import PALETTE

    answer = ("Plan: 1. Type CogVLM into the search box.\nNext Action: Type \"CogVLM\".\n"
              "Grounded Operation:[combobox] Search -> TYPE: CogVLM at the box [[200,500,800,600]]")
    phrases = turn_boxes(agent_query("Search for CogVLM"), answer)
    assert [p.phrase for p in phrases] == ["[combobox] Search -> TYPE: CogVLM"]
    drawn = save_drawing(Image.new("RGB", (400, 200), "white"), phrases, tmp_path, "screen")
    with Image.open(drawn) as img:
        assert img.getpixel((80, 110)) == PALETTE[0]  # the box's left edge, x = 0.2 * 400
        assert img.getpixel((400 // 2, 110)) == (255, 255, 255)  # inside untouched


@pytest.mark.parametrize("lora", [False, True])
def test_finetune_full_and_lora(agent_checkpoint, sp_model_path, tmp_path, lora):
    from cogvlm.data.synthetic import make_dataset
    from cogvlm.finetune import TrainArgs, Trainer, merge_lora

    data = make_dataset(tmp_path / "data", n_images=6, seed=1, image_size=HIGH)
    kw = dict(lora=True, lora_r=4, train="vision_expert,cross", lr=1e-2) if lora else dict(train="all", lr=1e-3)
    trainer = Trainer(TrainArgs(data=data, out=tmp_path / "run", model=str(agent_checkpoint), steps=3, batch_size=2,
                                warmup=1, progress=False, seed=0, **kw))
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    if lora:
        assert any(".cross_attn.key_value.lora_A" in n for n in trained)
    else:
        assert "model.cross_vision.vit.model.blocks.0.attn.q_bias" in trained and "model.vision.pos_embed" in trained
    runs = tower_runs(trainer.inner if not lora else trainer.inner.base_model.model)
    out = trainer.fit()
    assert sum(runs) >= 3 * 2  # every training example ran the high-resolution tower (with gradients)
    final = merge_lora(agent_checkpoint, out, tmp_path / "merged") if lora else out
    model, _ = load_model(final)
    before, _ = load_model(agent_checkpoint)
    trainer.model.eval()
    (px, cx), = pictures(1, seed=12)
    chunk = layout_batch([PromptTokens(px, [5, 6, 7], cx)], model.config)
    with torch.no_grad():
        got, want, old = model(chunk), trainer.model(chunk), before(chunk)
    assert (want - old).abs().max() > 1e-4  # training changed the model
    assert (got - want).abs().max() <= TOL  # and the saved (merged) checkpoint is that model


@pytest.mark.slow  # a subprocess
def test_convert_command_from_sat(agent, tmp_path):
    import subprocess
    import sys

    write_cogagent_sat(tmp_path / "sat", agent, world=2)
    out = subprocess.run([sys.executable, "-m", "cogvlm", "convert", str(tmp_path / "sat"), str(tmp_path / "hf")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    loaded, _ = load_model(tmp_path / "hf")
    assert all(torch.equal(loaded.state_dict()[k], t) for k, t in agent.state_dict().items())


@pytest.mark.slow  # a subprocess
def test_server_answers_as_the_api_and_refuses_text_only(agent_checkpoint, tmp_path):
    """`cogvlm serve` with CogAgent: concurrent image requests (the scheduler may batch them)
    answer as the API does; a request without an image gets a 400."""
    import threading

    import httpx

    from tests.test_server import CONTEXT, data_url, scene, serving, user

    images = [scene(s) for s in (1, 2, 3)]
    answers: dict[int, dict] = {}

    def ask(i: int) -> None:
        body = {"messages": [user(f"What is item {i}?", data_url(images[i]))], "temperature": 0, "max_tokens": 3 + 3 * i}
        answers[i] = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()

    with serving(agent_checkpoint, tmp_path / "server.log") as url:
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == str(agent_checkpoint)
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        refused = httpx.post(f"{url}/v1/chat/completions", json={"messages": [user("hi")], "max_tokens": 2})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "image_required"
    vlm = CogVLM.from_pretrained(agent_checkpoint, device="cpu")
    for i, image in enumerate(images):
        want = vlm.chat(image, f"What is item {i}?", top_k=1, max_new_tokens=3 + 3 * i, max_length=CONTEXT)[0]
        assert answers[i]["choices"][0]["message"]["content"] == want


def test_loads_by_registry_name_and_hub_id_from_the_hub_cache(agent_checkpoint, tmp_path):
    """`cogagent-chat` and `THUDM/cogagent-chat-hf` resolve to the same hub snapshot (here a
    tiny one placed in an offline Hugging Face cache) and load from it."""
    import os
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "hub" / "models--THUDM--cogagent-chat-hf"
    shutil.copytree(agent_checkpoint, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    code = ("from cogvlm.checkpoint import load_model\n"
            "for name in ('cogagent-chat', 'THUDM/cogagent-chat-hf'):\n"
            "    model, folder = load_model(name)\n"
            "    print(name, folder.name, model.config.template, model.config.cross_vision.image_size)\n")
    env = dict(os.environ, HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"cogagent-chat {'0' * 40} inst {HIGH}",
                                       f"THUDM/cogagent-chat-hf {'0' * 40} inst {HIGH}"]


def test_caption_and_eval(agent_checkpoint, tmp_path):
    """`CogVLM.caption` (what `cogvlm caption` batches) and `evaluate` (`cogvlm eval`) on CogAgent:
    every answer equals the API's for the same request, and each prefill runs the tower once."""
    from cogvlm.data.records import read_records
    from cogvlm.data.synthetic import make_dataset
    from cogvlm.eval.jsonl import evaluate

    vlm = CogVLM.from_pretrained(agent_checkpoint, device="cpu")
    assert vlm.caption(IMAGE, top_k=1) == vlm.generate([(IMAGE, "", None)], template="base", top_k=1)[0]
    data = make_dataset(tmp_path / "set", n_images=2, seed=2, image_size=HIGH)
    records, _ = read_records(data)
    runs = tower_runs(vlm.model)
    result = evaluate(vlm, data, batch_size=64, progress=False)
    turns = [(rec, i) for rec in records for i in range(len(rec.turns))]
    assert len(result["examples"]) == len(turns) and result["skipped_records"] == 0
    assert sum(runs) == len(turns)  # each turn's image once (turns of one template batched together)
    rec, i = turns[-1]
    want = vlm.generate([(rec.image, rec.turns[i][0], rec.turns[:i])], template=rec.template, top_k=1)[0]
    assert [e["prediction"] for e in result["examples"] if e["line"] == rec.line][-1] == want


@pytest.mark.parametrize("read, config, key", [
    (from_hf_config, PUBLISHED_HF, "vision_config"), (from_sat_config, PUBLISHED_SAT, "eva_args")])
def test_a_zero_patch_size_is_named_not_divided_by(read, config, key):
    """Found by tests/test_fuzz.py: a patch size of 0 reached the patch-grid check before the
    range checks, a ZeroDivisionError instead of a ConfigError naming the key."""
    bad = {**config, key: {**config[key], "patch_size": 0}}
    with pytest.raises(ConfigError, match=rf"{key}\.patch_size must be an integer in \[1, "):
        read(bad)
