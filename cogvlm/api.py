"""The Python API: `CogVLM` (load once, then chat / stream / generate / caption) and
`ChatSession` (a conversation that keeps its KV cache between turns)."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .checkpoint import load_model, read_config, read_quant, registry_template, resolve
from .config import DEFAULT_MODEL, LLAMA3_VOCAB, CogVLMConfig
from .generate import BatchDecoder, ContextLengthError, SamplingParams, TextStream, final_text
from .errors import TensorParallelError, TrainingError, UsageError
from .image import ImageInput
from .model import CogVLMForCausalLM, KVCache
from .options import TP_TIMEOUT, LoadOptions
from .plan import check_fits
from .prompt import (History, PromptTokens, VideoInput, build_prompt, continuation_chunk, layout_batch, prompt_length,
                     visual_input)
from .quantize import QuantConfig, can_prepack, check_cuda_capability, prepack_model, register_lora_layers
from .sharding import check_split
from .tp import load_parallel
from .tokenizer import BPE_FILE, TOKENIZER_FILE, VICUNA_REPO, Tokenizer, TokenizerError, tokenizer_file

# (image or None, query, history or None), optionally with a video fourth: (None, query, history, clip)
Request = tuple[ImageInput | None, str, History | None] | tuple[ImageInput | None, str, History | None, VideoInput | None]
# CogVideoX's captioner asks this, in the chat template (docs/spec/cogvlm2-video.md section 8)
VIDEO_CAPTION_PROMPT = "Please describe this video in detail."
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def check_gpus(device: torch.device, world: int, dtype: torch.dtype, quant: QuantConfig | None) -> None:
    """The GPUs a CUDA load will use are there and can run `dtype`: checked before anything is
    planned, loaded or started, so each problem is one line (not `Invalid device id` from the
    memory plan, or a raw CUDA error from the first bf16 kernel). Ranks use cuda:0..N-1."""
    count = torch.cuda.device_count()
    if world > 1 and count < world:
        raise TensorParallelError(f"tp={world} needs {world} GPUs; {count} are visible (CUDA_VISIBLE_DEVICES "
                                  f"picks them): use --tp {count} or fewer, or run on more GPUs")
    if world == 1 and (device.index or 0) >= count:
        raise UsageError(f"there is no {device}: {count} GPUs are visible (cuda:0 to cuda:{count - 1})")
    for index in range(world) if world > 1 else [device.index or 0]:
        check_cuda_capability(torch.device("cuda", index), dtype, quant)


def _find_tokenizer(folder: Path, tokenizer: str | Path | None, config: CogVLMConfig) -> Tokenizer:
    if tokenizer is not None:
        return Tokenizer(tokenizer)
    if tokenizer_file(folder) is not None:
        return Tokenizer(tokenizer_file(folder))
    if config.vocab_size == LLAMA3_VOCAB:
        raise TokenizerError(f"no {BPE_FILE} next to the weights in {folder}: CogVLM2's Llama-3 tokenizer ships "
                             f"in its hub repo (e.g. THUDM/cogvlm2-llama3-chat-19B); pass "
                             f"tokenizer=/path/to/{BPE_FILE} (CLI: --tokenizer PATH).")
    from huggingface_hub import hf_hub_download

    try:
        return Tokenizer(hf_hub_download(VICUNA_REPO, TOKENIZER_FILE))
    except Exception as e:  # offline, or hub errors of many kinds
        raise TokenizerError(
            f"no {TOKENIZER_FILE} next to the weights in {folder}, and {VICUNA_REPO}'s could not be "
            f"fetched ({type(e).__name__}). Pass tokenizer=/path/to/tokenizer.model "
            f"(CLI: --tokenizer PATH).") from None


def peft_module():
    """peft, the LoRA library (an optional dependency: training and adapters need it)."""
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs peft: pip install 'cogvlm[train]'") from None
    return peft


def check_adapter_folder(adapter: Path) -> None:
    """The folder holds peft's config and safetensors weights: peft itself would fall back to
    adapter_model.bin, a pickle, which can run code when loaded."""
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise TrainingError(f"{adapter} holds no {ADAPTER_CONFIG}: pass the adapter folder finetune --lora wrote")
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise TrainingError(f"{adapter} holds no {ADAPTER_WEIGHTS}; other adapter files (adapter_model.bin "
                            f"is a pickle, which can run code when loaded) are not read")


def apply_adapter(model: CogVLMForCausalLM, adapter: str | Path) -> Any:
    """A peft model: `model` with the LoRA adapter in folder `adapter` wrapped around its layers
    (in place, unmerged: `.get_base_model()` is `model`; peft's layers, our packed ones
    registered, so a quantized base takes it too). Every
    tensor of the file must fill an adapter layer and every adapter layer must be filled, with
    the shapes the model needs: else `TrainingError`, one line (peft only warns of a missing one)."""
    from safetensors import safe_open

    peft = peft_module()
    folder = Path(adapter)
    check_adapter_folder(folder)
    try:
        config = peft.LoraConfig.from_pretrained(str(folder))
        register_lora_layers(config)
        with warnings.catch_warnings():  # peft warns of missing tensors; the check below says it in one line
            warnings.simplefilter("ignore", UserWarning)
            wrapped = peft.PeftModel.from_pretrained(model, str(folder), config=config)
        with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as f:
            stored = set(f.keys())
    except Exception as e:  # peft's and safetensors' errors for files they cannot use are of many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TrainingError(f"cannot apply the adapter in {folder} to this model: {type(e).__name__}: "
                            f"{first[:300]}") from None
    expected = set(peft.get_peft_model_state_dict(wrapped))
    if stored != expected:
        missing, extra = sorted(expected - stored), sorted(stored - expected)
        raise TrainingError(f"the adapter in {folder} does not fit this model: "
                            + "; ".join(f"{what} {len(names)} tensor(s), e.g. {names[0]}"
                                        for what, names in (("lacks", missing), ("has unknown", extra)) if names))
    return wrapped.eval()


def default_sampling(config: CogVLMConfig) -> SamplingParams:
    """Answers may run to the end of the model's context: the authors' max_length 2048 for v1,
    8192 for CogVLM2 (whose image alone takes 2306 slots)."""
    return SamplingParams(max_length=config.max_position_embeddings)


class CogVLM:
    """A loaded model with its tokenizer. Sampling keywords everywhere: temperature, top_k,
    top_p, repetition_penalty, max_new_tokens, max_length, seed, stop."""

    def __init__(self, model: CogVLMForCausalLM, tokenizer: Tokenizer,
                 defaults: SamplingParams | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.defaults = defaults or default_sampling(model.config)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise TokenizerError(f"tokenizer has {tokenizer.vocab_size} pieces but the model only "
                                 f"{model.config.vocab_size} embeddings; wrong tokenizer?")

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path | LoadOptions | None = None,
                        dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
                        tokenizer: str | Path | None = None, prepack: bool | None = None,
                        compile: bool = False, tp: int | None = None, quant: int | None = None,
                        group_size: int = 128, quant_vision: int | None = None,
                        tp_timeout: float = TP_TIMEOUT, adapter: str | Path | None = None) -> CogVLM:
        """A registry name, hub id or local folder (SAT or Hugging Face layout), or `LoadOptions`
        (then without other keywords); by default the shipped cogvlm-tiny, which needs no download.
        `prepack` (default: on CPU) stores the
        linear weights in oneDNN's layout, which makes batched CPU decoding up to ~2x faster
        (in fp32 it keeps the plain weights too, for batch 1: see `PackedLinear`); turn it off
        to keep one copy of fp32 weights, or to change or save them after loading. `compile` runs
        each decode step through torch.compile (see `compile_decode`): on CUDA as CUDA graphs,
        one per batch and window bucket, in static KV buffers; on CPU it packs the weights
        itself for batches, so it replaces `prepack`: the fastest decoding, after some seconds of
        compiling, at the cost of a packed copy of the language weights per frozen graph.
        `tp=N` splits the model over N processes (`cogvlm.tp`: N GPUs, or N CPU processes) that
        this call starts; under `torchrun` the default is its world size, and ranks > 0 serve
        rank 0 inside this call until it closes (`close()`, or at exit), then exit; a failure on
        any rank, or a collective waiting `tp_timeout` seconds, ends them all with
        `TensorParallelError`.

        `quant` (4 or 8) quantizes the decoder's linear layers (both experts) and the output head
        while loading, each weight on `device` as it streams in: int8 per output row, or int4 in
        groups of `group_size` inputs; `quant_vision=8` does int8 for the ViT and adapter too. A
        checkpoint written by `cogvlm quantize` loads quantized as it is. Quantized models run
        in bf16, the dtype the packed kernels take (docs/quantization.md). `adapter` applies a
        LoRA adapter folder (`finetune --lora`'s output) over the base, float or quantized,
        unmerged (docs/finetune.md); one that does not fit raises `TrainingError`. A bad
        combination of options raises `UsageError`."""
        if isinstance(name_or_path, LoadOptions):
            options = name_or_path
        else:
            options = LoadOptions(DEFAULT_MODEL if name_or_path is None else name_or_path, tokenizer, dtype, device,
                                  compile, tp, quant, group_size, quant_vision, prepack, tp_timeout, adapter)
        return cls.load(options)

    @classmethod
    def load(cls, options: LoadOptions) -> CogVLM:
        """The model `options` name, loaded (see `from_pretrained`)."""
        tp = options.world
        device = options.torch_device()
        folder = resolve(options.model)
        config = read_config(folder)
        wanted = options.quant_config
        quantized = wanted or read_quant(folder)
        if quantized and options.dtype not in (None, torch.bfloat16):
            raise UsageError(f"quantized models run in bfloat16 (the packed kernels' activation dtype), "
                             f"not {options.dtype}")
        dtype = options.dtype or (torch.bfloat16 if device.type == "cuda" or quantized else torch.float32)
        prepack = options.prepack
        if prepack is None:
            prepack = not options.compile and can_prepack(device, dtype)
        check_split(config, tp)  # the load's one check: the plan and every rank's share trust it
        if device.type == "cuda":
            check_gpus(device, tp, dtype, quantized)
        check_fits(config, tp, dtype, quantized, config.max_position_embeddings, device)  # the default max_length
        if tp > 1:
            model, folder = load_parallel(folder, tp, dtype, device, prepack, wanted, config, options.tp_timeout)
            return cls(_with_template(model, options.model), _find_tokenizer(folder, options.tokenizer, config))
        model, folder = load_model(folder, dtype=dtype, device=device, quant=wanted)
        model = _with_template(model, options.model)
        if options.adapter is not None:  # before prepacking, which would hide the Linears from peft
            model = apply_adapter(model, options.adapter).get_base_model()
        if prepack:
            model = prepack_model(model)
        if options.compile:
            model.compile_decode()
        return cls(model, _find_tokenizer(folder, options.tokenizer, model.config))

    def close(self) -> None:
        """Stop the other processes of a tensor-parallel model (also done at exit); else nothing."""
        close = getattr(self.model, "close", None)
        if close is not None:
            close()

    # ---- building prompts ----------------------------------------------------------------
    def sampling(self, **overrides: Any) -> SamplingParams:
        return SamplingParams.build(self.defaults, **overrides)

    def visual_input(self, image: ImageInput | None, video: VideoInput | None = None,
                     template: str | None = None) -> PromptTokens:
        """The picture or clip of a conversation, preprocessed, with no text yet; a video (a file,
        its bytes or a uint8 (3, T, H, W) frame tensor) only for a video model, and not with an
        image (`VideoError`). A file is sampled by the rule of the template (docs/spec/cogvlm2-video.md section 8)."""
        return visual_input(image, video, self.config, self.tokenizer, template or self.config.template)

    def prompt_tokens(self, image: ImageInput | None, query: str, history: History | None = None,
                      template: str | None = None, video: VideoInput | None = None) -> PromptTokens:
        template = template or self.config.template
        visual = self.visual_input(image, video, template)
        return self._with_text(visual, query, history or (), template)

    def _with_text(self, visual: PromptTokens, query: str, history: History, template: str) -> PromptTokens:
        shown = visual.pixels is not None or visual.frames is not None
        text = build_prompt(query, history, template, image=shown or not self.config.vicuna_frame)
        return replace(visual, text_ids=self.tokenizer.encode(text))

    def prompt_length(self, prompt: PromptTokens) -> int:
        """Slots the prompt takes: bos, image or frame slots (and frame labels), text."""
        return prompt_length(prompt, self.config)

    def generation_budget(self, prompt_len: int, params: SamplingParams) -> int:
        """How many tokens a prompt of `prompt_len` may generate; raises `ContextLengthError` (no
        room, or max_length past the model's positions) before any work is done."""
        positions = self.config.max_position_embeddings
        if params.max_length > positions:
            raise ContextLengthError(f"invalid max_length={params.max_length}: this model has {positions} "
                             f"positions; use at most {positions}")
        room = params.max_length - prompt_len
        if room < 1:
            raise ContextLengthError(
                f"the prompt takes {prompt_len} tokens (image or frame slots included) and max_length is "
                f"{params.max_length}: no room to generate. Shorten the prompt or history, or raise "
                f"max_length.")
        return room if params.max_new_tokens is None else min(room, params.max_new_tokens)

    # ---- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def decoder(self, prompts: Sequence[PromptTokens], params: Sequence[SamplingParams]) -> BatchDecoder:
        """Prefill `prompts` as one padded batch into a KV cache sized for their budgets; step the
        returned decoder (or `join` it to a running one, as the server's scheduler does)."""
        budgets = [self.generation_budget(self.prompt_length(p), sp) for p, sp in zip(prompts, params)]
        chunk = layout_batch(prompts, self.config)
        cache = self.model.new_cache(len(prompts), chunk.input_ids.shape[1] + max(budgets))
        logits = self.model(chunk, cache, last_only=True)
        seen_ids = chunk.input_ids.masked_fill(~chunk.attention_mask, self.config.bos_token_id)
        return BatchDecoder(self.model, cache, logits, chunk.position_ids[:, -1] + 1, params, seen_ids, budgets)

    def generate(self, requests: Sequence[Request], template: str | None = None,
                 params: SamplingParams | None = None, **sampling: Any) -> list[str]:
        """Answers for a batch of (image or None, query, history), each with an optional video
        fourth (video models), in one batched decode, sampled with `params` (default: the
        model's defaults) and the keyword overrides."""
        params = SamplingParams.build(params or self.defaults, **sampling)
        prompts = [self.prompt_tokens(img, q, h, template, *video) for img, q, h, *video in requests]
        if not prompts:
            return []
        decoder = self.decoder(prompts, [params] * len(prompts))
        streams = [TextStream(self.tokenizer, params.stop) for _ in prompts]
        for _ in decoder.run(streams):
            pass  # streams watch for stop strings; answers come from the full token lists
        return [final_text(self.tokenizer, ids, params.stop) for ids in decoder.generated]

    def chat(self, image: ImageInput | None, query: str, history: History | None = None,
             template: str | None = None, video: VideoInput | None = None,
             **sampling: Any) -> tuple[str, list[tuple[str, str]]]:
        answer = self.generate([(image, query, history, video)], template, **sampling)[0]
        return answer, [*(history or []), (query, answer)]

    def stream(self, image: ImageInput | None, query: str, history: History | None = None,
               template: str | None = None, video: VideoInput | None = None, **sampling: Any) -> Iterator[str]:
        params = self.sampling(**sampling)
        decoder = self.decoder([self.prompt_tokens(image, query, history, template, video)], [params])
        for _, piece in decoder.run([TextStream(self.tokenizer, params.stop)]):
            yield piece

    def caption(self, image: ImageInput | None = None, *, video: VideoInput | None = None, query: str | None = None,
                template: str | None = None, **sampling: Any) -> str:
        """An image: the base template with an empty query, plain captioning. A video: what
        CogVideoX's captioner asks, `Please describe this video in detail.` in the chat template
        (docs/spec/cogvlm2-video.md section 8). `query` and `template` replace those defaults."""
        if image is None and video is None:
            raise UsageError("caption needs an image or a video")
        if video is None:
            return self.generate([(image, query or "", None)], template=template or "base", **sampling)[0]
        query = VIDEO_CAPTION_PROMPT if query is None else query
        return self.generate([(image, query, None, video)], template=template or "chat", **sampling)[0]

    def session(self, image: ImageInput | None = None, template: str | None = None,
                video: VideoInput | None = None, **sampling: Any) -> ChatSession:
        return ChatSession(self, image, template, self.sampling(**sampling), video)


class ChatSession:
    """A multi-turn conversation about one image (or one video) that keeps its KV cache between turns.

    Each turn builds the full prompt with history (so answers equal a fresh `chat` call),
    reuses the cached tokens it shares with the previous turn, and prefills only the rest: the
    image or clip is decoded and encoded once per session (CogAgent's high-resolution tower too: its
    cross-attention keys/values stay with the cache, and move to a bigger one if a turn needs it).
    """

    def __init__(self, vlm: CogVLM, image: ImageInput | None = None, template: str | None = None,
                 params: SamplingParams | None = None, video: VideoInput | None = None) -> None:
        self.vlm = vlm
        self.template = template or vlm.config.template
        self.params = params or vlm.defaults
        self.visual = vlm.visual_input(image, video, self.template)  # the prompt without its text
        self.history: list[tuple[str, str]] = []
        self.cache: KVCache | None = None
        self._tokens: list[int] = []  # token ids in the cache, image placeholders included

    def ask(self, query: str, **sampling: Any) -> str:
        for _ in self.stream(query, **sampling):
            pass
        return self.history[-1][1]

    @torch.no_grad()
    def stream(self, query: str, **sampling: Any) -> Iterator[str]:
        """Answer pieces as they are generated; the turn joins the history when it completes."""
        vlm, cfg = self.vlm, self.vlm.config
        params = SamplingParams.build(self.params, **sampling)
        full = layout_batch([vlm._with_text(self.visual, query, self.history, self.template)], cfg)
        ids, positions = full.input_ids[0].tolist(), full.position_ids[0].tolist()
        budget = vlm.generation_budget(len(ids), params)
        if self.cache is None or self.cache.max_len < min(params.max_length, len(ids) + budget):
            cross = None if self.cache is None else self.cache.cross
            self.cache = vlm.model.new_cache(1, params.max_length)
            self.cache.cross = cross  # CogAgent: the image's cross-attention k/v outlive the resize
            self._tokens = []
        if self.cache.cross is not None:
            full.cross_images = None  # this session's image: its high-resolution pass is done
        shared = min(_common_prefix(self._tokens, ids), len(ids) - 1)  # feed >= 1 token for logits
        self._tokens = self._tokens[:shared]  # true even if this turn is interrupted
        self.cache.rewind(shared)
        if shared == 0:  # first turn: the only prefill with the image
            logits = vlm.model(full, self.cache, last_only=True)
        else:
            new = torch.tensor([ids[shared:]])
            logits = vlm.model(continuation_chunk(new, torch.tensor([positions[shared]])), self.cache,
                               last_only=True)
        decoder = BatchDecoder(vlm.model, self.cache, logits, torch.tensor([positions[-1] + 1]), [params],
                               torch.tensor([ids]), [budget])
        for _, piece in decoder.run([TextStream(vlm.tokenizer, params.stop)]):
            yield piece
        generated = decoder.generated[0]
        fed = generated if decoder.finished_by_eos[0] else generated[:-1]
        self._tokens = ids + fed
        self.cache.rewind(len(self._tokens))
        self.history.append((query, final_text(vlm.tokenizer, generated, params.stop)))

    def clear(self) -> None:
        """Forget the history (the image or clip and its cached encoding stay)."""
        self.history = []
        self._tokens = self._tokens[:self.vlm.prompt_length(self.visual)]


def _with_template(model: CogVLMForCausalLM, name: str | Path) -> CogVLMForCausalLM:
    """A registry model talks in the template its authors use it with, where its config.json says
    otherwise (the three CogVLM2-Video files all say base, docs/spec/cogvlm2-video.md section 3); a
    folder keeps its config.json's."""
    template = registry_template(name)
    if template is not None and template != model.config.template:
        model.config = replace(model.config, template=template)
    return model


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
