"""Fine-tuning: full-parameter or LoRA, one process or several with torchrun (DDP, or FSDP).

The data order is a pure function of (seed, step), and every checkpoint carries the optimizer,
scheduler and step, so `--resume` continues with exactly the losses an uninterrupted run has.
Checkpoints are Hugging Face-layout folders that `CogVLM.from_pretrained` loads.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import time
import types
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .api import apply_adapter, check_adapter_folder, peft_module
from .checkpoint import (HF_CONFIG, check_destination, iter_tensors, load_weights, read_config, read_quant, resolve,
                         save_hf)
from .config import TEMPLATES, CogVLMConfig, from_hf_config
from .data.records import Record, RecordError, VideoRecord, is_video_set, read_records, read_video_records
from .errors import TrainingError, VideoError
from .fsdp import Slots, is_dtensor, local_part, shard_from_checkpoint, weight_slots
from .jobs import leave_group
from .model import Chunk, CogVLMForCausalLM
from .progress import Progress
from .prompt import (PromptTokens, build_prompt, check_takes_video, frame_labels, image_pixels, layout_batch,
                     prompt_length, video_frames)
from .quantize import BITS, QuantConfig, input_grad, quantize_model, register_lora_layers
from .tokenizer import TOKENIZER_FILE, Tokenizer, tokenizer_file
from .video import sampled_frame_count, strategy_for

IGNORE = -100
LossAverage = Literal["token", "example"]
LOSS_AVERAGES: tuple[str, ...] = get_args(LossAverage)
TrainDtype = Literal["auto", "fp32", "bf16"]
STATE_FILE = "trainer_state.pt"


# What `--train` can name: parameter-name tests for each part of the model.
PARTS = {
    "vision_expert": lambda n: n.startswith("model.layers.") and ("vision_expert" in n or "vision_mlp" in n),
    "language": lambda n: not n.startswith(("model.vision.", "model.cross_vision.")) and not _is_cross(n)
    and "vision_expert" not in n and "vision_mlp" not in n,
    "adapter": lambda n: n.startswith(("model.vision.linear_proj.", "model.vision.conv.", "model.vision.boi",
                                       "model.vision.eoi", "model.vision.pos_embed")),
    "vit": lambda n: n.startswith(("model.vision.patch_embedding.", "model.vision.transformer.")),
    # CogAgent: the high-resolution tower and the decoder's cross-attention (nothing in CogVLM)
    "cross": lambda n: n.startswith("model.cross_vision.") or _is_cross(n),
}
# Linear layers LoRA adapts for each part (regexes over module names, as peft takes them).
LORA_TARGETS = {
    "vision_expert": r"model\.layers\.\d+\.(self_attn\.vision_expert_\w+|mlp\.vision_mlp\.\w+)",
    "language": r"model\.layers\.\d+\.(self_attn\.language_expert_\w+|mlp\.language_mlp\.\w+)",
    "adapter": r"model\.vision\.linear_proj\.(linear_proj|gate_proj|dense_h_to_4h|dense_4h_to_h)",
    "vit": r"model\.vision\.transformer\.layers\.\d+\.(attention\.query_key_value|attention\.dense|mlp\.fc1|mlp\.fc2)",
    "cross": r"model\.layers\.\d+\.cross_attn\.(query|key_value|dense)",
}


def _is_cross(name: str) -> bool:
    return ".cross_attn." in name or ".post_cross_attention_layernorm." in name


@dataclass
class TrainArgs:
    data: Path
    out: Path
    model: str | None = None  # start from these weights (folder, registry name or hub id) ...
    init_config: Path | None = None  # ... or from random weights with this config.json
    tokenizer: Path | None = None
    eval_data: Path | None = None
    train: str | None = None  # None: the paper's vision_expert,adapter (language without a visual expert); "all"
    template: str | None = None  # video sets: the template the questions are asked in (default: the model's)
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.0
    loss_average: LossAverage = "token"  # "example": every example weighs the same, however long its answer
    dtype: TrainDtype = "auto"  # frozen weights' dtype (bf16: + autocast); "auto": the checkpoint's
    quant: int | None = None  # QLoRA: LoRA adapters over int4/int8 packed frozen weights
    group_size: int = 128
    grad_checkpointing: bool | None = None  # None: on with --quant (QLoRA's usual set-up), else off
    eval_every: int = 0
    save_every: int = 0
    seed: int = 0
    resume: bool = False
    fsdp: bool = False
    save_dtype: str = "fp32"
    max_length: int = 0  # 0: the model's context (2048 for CogVLM, 8192 for CogVLM2)
    progress: bool = True


@dataclass
class Example:
    image: Path | None
    prompt_ids: list[int]
    answer_ids: list[int]  # answer + </s>: the only tokens with a loss
    line: int
    video: Path | None = None  # a clip, decoded and sampled each time its batch is built (once an epoch)
    template: str = "chat"  # the clip's sampling rule follows it
    frame_labels: tuple[list[int], ...] = ()  # the text after each of its frames (chat: the index)


def make_examples(records: Sequence[Record], tokenizer: Tokenizer, cfg: CogVLMConfig,
                  max_length: int) -> tuple[list[Example], list[RecordError]]:
    """One example per turn (earlier turns become its history, as at inference)."""
    examples, errors = [], []
    for rec in records:
        if rec.image is None and cfg.cross_vision is not None:
            errors.append(RecordError(rec.line, "CogAgent needs an image in every record"))
            continue
        if rec.image is not None and cfg.video:
            errors.append(RecordError(rec.line, "this model takes videos, not images: give it video records "
                                                "(docs/data-format.md)"))
            continue
        for i, (query, answer) in enumerate(rec.turns):
            framed = rec.image is not None or not cfg.vicuna_frame
            prompt = tokenizer.encode(build_prompt(query, rec.turns[:i], rec.template, image=framed))
            ans = tokenizer.encode(answer) + [cfg.eos_token_id]
            length = 1 + (cfg.image_tokens if rec.image else 0) + len(prompt) + len(ans)
            if length > max_length:
                errors.append(RecordError(rec.line, f"turn {i + 1} needs {length} tokens, over max_length {max_length}"))
                break
            examples.append(Example(rec.image, prompt, ans, rec.line))
    return examples, errors


def make_video_examples(records: Sequence[VideoRecord], tokenizer: Tokenizer, cfg: CogVLMConfig,
                        max_length: int, template: str) -> tuple[list[Example], list[RecordError]]:
    """One example per video record: the prompt as inference lays it out (bos, each frame's slots
    and, in the chat template, its index, then the template's text), then the first answer and
    eos, the only tokens with a loss (docs/spec/cogvlm2-video.md section 6). Each clip's packets
    are scanned for its frame count, no frame decoded: a clip that cannot be read is skipped here
    with its line, not found mid-training."""
    check_takes_video(cfg)
    strategy = strategy_for(template)
    examples, errors = [], []
    for rec in records:
        try:
            labels = frame_labels(tokenizer, sampled_frame_count(rec.video, strategy), template)
        except VideoError as e:
            errors.append(RecordError(rec.line, str(e)))
            continue
        prompt = tokenizer.encode(build_prompt(rec.question, (), template))
        ans = tokenizer.encode(rec.answers[0]) + [cfg.eos_token_id]
        length = prompt_length(PromptTokens(None, prompt + ans, frame_labels=labels), cfg)
        if length > max_length:
            errors.append(RecordError(rec.line, f"needs {length} tokens ({len(labels)} frames), over max_length {max_length}"))
            continue
        examples.append(Example(None, prompt, ans, rec.line, rec.video, template, labels))
    return examples, errors


def example_prompt(ex: Example, cfg: CogVLMConfig) -> PromptTokens:
    """The example's picture or clip, preprocessed, and all its text (prompt and answer)."""
    if ex.video is None:
        pixels, cross = image_pixels(ex.image, cfg)  # CogAgent: also the high-resolution picture
        return PromptTokens(pixels, ex.prompt_ids + ex.answer_ids, cross)
    try:
        frames = video_frames(ex.video, cfg, ex.template)
    except VideoError as e:
        raise TrainingError(f"line {ex.line}: {e} (it was readable when training started)") from None
    if len(frames) != len(ex.frame_labels):
        raise TrainingError(f"line {ex.line}: {ex.video} now gives {len(frames)} frames, not the "
                            f"{len(ex.frame_labels)} it gave when training started; was it replaced?")
    return PromptTokens(None, ex.prompt_ids + ex.answer_ids, frames=frames, frame_labels=ex.frame_labels)


def collate(batch: Sequence[Example], cfg: CogVLMConfig):
    """The inference layout (`layout_batch`) plus next-token labels on the answer tokens only."""
    prompts = [example_prompt(ex, cfg) for ex in batch]
    chunk = layout_batch(prompts, cfg)
    labels = torch.full_like(chunk.input_ids, IGNORE)
    for row, ex in enumerate(batch):
        # The answer ends the row; each of its tokens is predicted at the real token before it,
        # which for an empty prompt (captioning) is eoi, with padding in between.
        real = chunk.attention_mask[row].nonzero().squeeze(1)
        n = len(ex.answer_ids)
        labels[row, real[-n - 1:-1]] = chunk.input_ids[row, real[-n:]]
    return chunk, labels


def check_loss_average(average: str) -> None:
    if average not in LOSS_AVERAGES:
        raise TrainingError(f"loss average must be one of {LOSS_AVERAGES}, got {average!r}")


def checkpointing(asked: bool | None, quant: int | None) -> bool:
    """Whether activations are recomputed in backward: as asked, else on for QLoRA, whose point is
    fitting a small card (as peft's `prepare_model_for_kbit_training` turns it on), off otherwise.
    `cogvlm plan --finetune` assumes the same."""
    return asked if asked is not None else quant is not None


def loss_units(labels: torch.Tensor, average: str = "token") -> int:
    """What the loss is averaged over: answer tokens, or examples (rows with an answer)."""
    check_loss_average(average)
    answer = labels != IGNORE
    return int(answer.sum() if average == "token" else answer.any(1).sum())


def loss_fn(model: torch.nn.Module, chunk, labels: torch.Tensor,
            average: str = "token") -> tuple[torch.Tensor, int]:
    """(summed loss, units): per-token losses summed, or with `average="example"` each row's
    mean over its answer tokens summed, so a one-word answer counts as much as a long caption
    (with token averaging, long answers take almost all of the gradient)."""
    units = loss_units(labels, average)  # (checks `average` before the forward pass)
    answer = labels != IGNORE
    logits = model(chunk, at=answer)  # (K, vocab): only where a label is
    per_token = F.cross_entropy(logits, labels[answer].to(logits.device), reduction="none")
    if average == "example":
        counts = answer.sum(1)
        per_token = per_token / counts.repeat_interleave(counts).to(per_token.device)
    return per_token.sum(), units


def batch_indices(step: int, n: int, args: TrainArgs, rank: int, world: int) -> Iterator[list[int]]:
    """The micro-batches of optimizer step `step` for `rank`: a function of (seed, step) only."""
    per_step = args.batch_size * args.grad_accum * world
    for micro in range(args.grad_accum):
        start = step * per_step + (micro * world + rank) * args.batch_size
        out = []
        for pos in range(start, start + args.batch_size):
            epoch, within = divmod(pos, n)
            perm = _permutation(n, args.seed + epoch)
            out.append(perm[within])
        yield out


_PERMS: dict[tuple[int, int], list[int]] = {}


def _permutation(n: int, seed: int) -> list[int]:
    if (n, seed) not in _PERMS:
        _PERMS.clear()
        _PERMS[(n, seed)] = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return _PERMS[(n, seed)]


def lr_at(step: int, args: TrainArgs) -> float:
    """Linear warmup, then cosine down to min_lr_ratio × lr."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def parts_for(spec: str | None, cfg: CogVLMConfig, default: str = "vision_expert,adapter") -> list[str]:
    """--train's parts for this model: `default` when not given, or "language" for a model without
    a visual expert (CogVLM2-Video, docs/spec/cogvlm2-video.md section 4), whose decoder has only
    its language weights; naming the visual expert for such a model is a mistake."""
    if spec is None:
        spec = default if cfg.visual_expert else "language"
    parts = parse_parts(spec)
    if "vision_expert" in parts and not cfg.visual_expert and spec != "all":
        raise TrainingError("this model has no visual expert (CogVLM2-Video: every token goes through the language "
                            "weights): train language, vit or adapter, e.g. --train language,vit")
    return parts


def parse_parts(spec: str) -> list[str]:
    parts = list(PARTS) if spec == "all" else [p.strip() for p in spec.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise TrainingError(f"--train takes 'all' or a comma list of {sorted(PARTS)}; got {spec!r}")
    return parts


def set_trainable(model: torch.nn.Module, parts: list[str]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(any(PARTS[part](name) for part in parts))


def apply_lora(model: CogVLMForCausalLM, parts: list[str], r: int, alpha: int):
    peft = peft_module()
    target = "|".join(f"(?:{LORA_TARGETS[p]})" for p in parts)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=f"^(?:{target})$")
    register_lora_layers(config)  # a quantized base: peft wraps the packed layers too (QLoRA)
    return peft.get_peft_model(model, config)


# numeric flags and their lower bounds (a bound in the set: inclusive); checked before anything loads,
# where peft, AdamW and the batch layout would otherwise fail with their own tracebacks
AT_LEAST = {"steps": 1, "batch_size": 1, "grad_accum": 1, "lora_r": 1, "lora_alpha": 1, "group_size": 1,
            "warmup": 0, "eval_every": 0, "save_every": 0, "max_length": 0, "weight_decay": 0.0, "min_lr_ratio": 0.0}


def check_numbers(args: TrainArgs) -> None:
    """Each number in its range: finite, at least its AT_LEAST bound; lr > 0, min_lr_ratio <= 1."""
    for name, low in {**AT_LEAST, "lr": 0.0}.items():
        value = getattr(args, name)
        if not math.isfinite(value) or value < low or (name == "lr" and value == 0):
            bound = "> 0" if name == "lr" else f">= {low}"
            raise TrainingError(f"--{name.replace('_', '-')} must be a finite number {bound}, not {value}")
    if args.min_lr_ratio > 1:
        raise TrainingError(f"--min-lr-ratio must be between 0 and 1, not {args.min_lr_ratio}")


def check_quant_args(args: TrainArgs) -> None:
    """QLoRA's constraints, checked before anything loads: the packed weights take no gradient
    (only adapters beside them train) and compute in bf16."""
    if args.quant is None:
        return
    if args.quant not in BITS:
        raise TrainingError(f"--quant takes {' or '.join(map(str, BITS))}, not {args.quant}")
    if not args.lora:
        raise TrainingError("--quant freezes the quantized weights: add --lora to train adapters over them (QLoRA)")
    if args.dtype == "fp32":
        raise TrainingError("a quantized base computes in bf16 (the packed kernels' dtype): drop --dtype fp32")


def train_dtype(args: TrainArgs, folder: Path | None, quantized: bool) -> torch.dtype:
    """The dtype the frozen weights load and stay in, which is also the autocast dtype: as asked,
    or ("auto") bf16 for a quantized base or a checkpoint stored in bf16 (loading such one in fp32
    only doubles its memory), fp32 for random starts and fp32 checkpoints."""
    if args.dtype != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if quantized:
        return torch.bfloat16
    stored = json.loads((folder / HF_CONFIG).read_text()).get("torch_dtype") if folder and (folder / HF_CONFIG).is_file() else None
    return torch.bfloat16 if stored == "bfloat16" else torch.float32


class _FrozenLinear(torch.autograd.Function):
    """F.linear over a frozen weight whose backward gives the input its gradient through
    `quantize.input_grad` (the fast bf16 layout on CPUs without native bf16) and the weight none."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        return input_grad(grad.to(weight.dtype), weight), None, None


def _frozen_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _FrozenLinear.apply(x, self.weight, self.bias)


def route_frozen_linears(model: torch.nn.Module) -> None:
    """Frozen bf16 Linears compute their backward through `_FrozenLinear`: on a CPU without
    native bf16, autograd's own grad @ weight takes a fallback kernel ~25x slower, which made a
    bf16 LoRA step ~100x slower than an fp32 one (benchmarks/finetune.py). Trained Linears keep
    autograd's formula (their weight needs a gradient)."""
    for m in model.modules():
        if type(m) is torch.nn.Linear and not m.weight.requires_grad and m.weight.dtype == torch.bfloat16:
            m.forward = types.MethodType(_frozen_forward, m)


def fp32_masters(model: torch.nn.Module) -> None:
    """Trainable parameters in fp32, whatever the frozen ones load in: AdamW's updates (lr x a
    unit step, ~1e-5 of a weight) vanish below bf16's 8 bits of mantissa. The frozen weights keep
    their load dtype, and no fp32 copy of them is made."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def init_adapters(model: torch.nn.Module, seed: int) -> None:
    """LoRA's starting values, the same in one process and on any number of FSDP ranks: B zero
    (the adapted model starts as the base), A kaiming-uniform as peft draws it, from one
    generator seeded with `seed` and walked in module order; an FSDP rank keeps its rows of
    each A (r x in_features: small, so drawing it whole on every rank costs nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." not in name and ".lora_B." not in name:
                continue
            whole = torch.zeros(p.shape)
            if ".lora_A." in name:
                torch.nn.init.kaiming_uniform_(whole, a=math.sqrt(5), generator=g)
            local, begin, end = local_part(p)
            local.copy_(whole[begin:end])


def merge_lora(base: str | Path, adapter: str | Path, out: str | Path, dtype: torch.dtype = torch.float32,
               force: bool = False) -> Path:
    """Base weights + a LoRA adapter → one plain Hugging Face-layout checkpoint."""
    check_destination(out, force)
    adapter = Path(adapter)
    check_adapter_folder(adapter)  # before the base loads
    folder = resolve(base)
    model = load_weights(folder, read_config(folder), dtype=torch.float32)
    merged = apply_adapter(model, adapter).merge_and_unload()
    state = {k: v.to(dtype) for k, v in merged.state_dict().items()}
    extra = tuple(p for p in [tokenizer_file(folder), tokenizer_file(Path(adapter))] if p is not None)[:1]
    return save_hf(state, merged.config, out, extra_files=extra, force=force)


# ---------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, args: TrainArgs) -> None:
        self.args = args
        check_numbers(args)  # before anything is made or loaded
        args.out.mkdir(parents=True, exist_ok=True)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.is_main = self.rank == 0
        if args.train is not None:
            parse_parts(args.train)  # a typo found before minutes of loading
        if args.template is not None and args.template not in TEMPLATES:
            raise TrainingError(f"unknown template {args.template!r}: choose one of {', '.join(TEMPLATES)}")
        check_loss_average(args.loss_average)  # before minutes of loading, not at the first step
        check_quant_args(args)
        if args.resume and args.fsdp and self.world > 1:
            raise TrainingError("--resume does not combine with --fsdp yet: checkpoints hold rank 0's optimizer "
                                "state only")
        self.base, self.tokenizer, self.base_folder = self._load_base()
        self.cfg = self.base.config
        self.parts = parts_for(args.train, self.cfg)
        self.examples, self.errors = self._load(args.data)
        if not self.examples:
            raise TrainingError(f"{args.data} holds no usable training examples")
        self.eval_examples = self._load(args.eval_data)[0] if args.eval_data else []
        torch.manual_seed(args.seed)
        self.model = self._prepare_model()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in self.trainable if p.ndim >= 2]
        no_decay = [p for p in self.trainable if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
        self.step = 0
        self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="cogvlm-batches")
        self._ahead: tuple[int, Future] | None = None  # (step, its collated micro-batches being made)
        self.log_path = args.out / "log.jsonl"
        if args.resume:
            self._resume()

    # ---- set-up -------------------------------------------------------------------------------
    def _load_base(self) -> tuple[CogVLMForCausalLM, Tokenizer, Path | None]:
        """The base model as inference loads it: built on the meta device, each tensor streamed
        to this process's device in the frozen dtype (`train_dtype`), quantized as it arrives
        with --quant, so host memory never holds an fp32 copy of the model. Under torchrun with
        --fsdp the base stays on meta here: `_prepare_model` shards it and each rank reads only
        its own rows (`cogvlm.fsdp`)."""
        a = self.args
        if (a.model is None) == (a.init_config is None):
            raise TrainingError("give exactly one of --model (start from weights) or --init-config (random start)")
        quant = QuantConfig(a.quant, a.group_size) if a.quant else None
        self.slots: Slots | None = None
        if a.model is not None:
            folder = resolve(a.model)
            stored = read_quant(folder)
            if stored is not None and not a.lora:
                raise TrainingError(f"{folder} holds quantized weights, which do not train: add --lora (QLoRA)")
            self.dtype = train_dtype(a, folder, quant is not None or stored is not None)
            if self.sharded_load:
                if quant is not None or stored is not None:
                    raise TrainingError("--fsdp shards a float base; QLoRA's packed weights are not sharded: "
                                        "drop --fsdp (QLoRA fits one GPU) or --quant")
                with torch.device("meta"):
                    model = CogVLMForCausalLM(read_config(folder))
                self.slots = weight_slots(model)
            else:
                model = load_weights(folder, read_config(folder), self.dtype, self.device, quant=quant)
        else:
            folder = None
            torch.manual_seed(self.args.seed)
            model = CogVLMForCausalLM(from_hf_config(a.init_config))
            init_weights(model)
            self.dtype = train_dtype(a, None, quant is not None)
            model = model.to(self.device, self.dtype)
            if quant is not None:
                quantize_model(model, quant)
        tok_path = a.tokenizer or (tokenizer_file(folder) or folder / TOKENIZER_FILE if folder else None)
        if tok_path is None:
            raise TrainingError("--init-config needs --tokenizer PATH")
        return model, Tokenizer(tok_path), folder

    @property
    def sharded_load(self) -> bool:
        """FSDP over a checkpoint: each rank reads only its shards. (A random start is built whole
        on every rank, from one seed, and sharded after.)"""
        return self.world > 1 and self.args.fsdp and self.args.model is not None

    def _load(self, path: Path) -> tuple[list[Example], list[RecordError]]:
        """The examples of a conversation file, or of a video set (its records have a "video")."""
        max_length = self.args.max_length or self.cfg.max_position_embeddings
        if is_video_set(path):
            records, errors = read_video_records(path)
            examples, more = make_video_examples(records, self.tokenizer, self.cfg, max_length,
                                                 self.args.template or self.cfg.template)
        else:
            records, errors = read_records(path)
            examples, more = make_examples(records, self.tokenizer, self.cfg, max_length)
        errors += more
        if self.is_main:
            for e in errors:
                print(f"{path}:{e.line}: skipped: {e.message}")
        return examples, errors

    def _prepare_model(self) -> torch.nn.Module:
        model = self.base.train()
        model.set_gradient_checkpointing(checkpointing(self.args.grad_checkpointing, self.args.quant))
        if self.args.lora:
            model.requires_grad_(False)
            model = apply_lora(model, self.parts, self.args.lora_r, self.args.lora_alpha)
        else:
            set_trainable(model, self.parts)
        self.inner = model
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:
            route_frozen_linears(model)
        if self.slots is not None:
            sharded = shard_from_checkpoint(model, self.base, self.slots, self.base_folder, self.device, self.dtype)
            init_adapters(model, self.args.seed)
            return sharded
        fp32_masters(model)
        init_adapters(model, self.args.seed)
        if self.world > 1 and self.args.fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in self.base.model.layers:
                fully_shard(layer)
            return fully_shard(model)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(model, find_unused_parameters=True)
        return model

    # ---- the loop -----------------------------------------------------------------------------
    def _batches(self, step: int) -> list[tuple[Chunk, torch.Tensor]]:
        """Step `step`'s micro-batches of this rank, collated: images and clips read, decoded and
        preprocessed. The order is a pure function of (seed, step), so any step can be made ahead."""
        micro = batch_indices(step, len(self.examples), self.args, self.rank, self.world)
        return [collate([self.examples[i] for i in idx], self.cfg) for idx in micro]

    def next_batches(self) -> list[tuple[Chunk, torch.Tensor]]:
        """This step's micro-batches, made by a background thread while the previous step trained,
        and the next step's started now: decoding a batch's clips (PyAV lets go of the GIL) or
        images overlaps the model instead of stalling every step. A read error surfaces here, at
        the step that needs the batch."""
        ahead, self._ahead = self._ahead, None
        batches = ahead[1].result() if ahead is not None and ahead[0] == self.step else self._batches(self.step)
        if self.step + 1 < self.args.steps:
            self._ahead = (self.step + 1, self._prefetch.submit(self._batches, self.step + 1))
        return batches

    def autocast(self):
        if self.dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def train_step(self) -> float:
        a = self.args
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, a)
        self.optimizer.zero_grad(set_to_none=True)
        batches = self.next_batches()
        units = torch.tensor(float(sum(loss_units(lab, a.loss_average) for _, lab in batches)))
        if self.world > 1:
            dist.all_reduce(units)
        loss_sum = 0.0
        for chunk, labels in batches:
            with self.autocast():
                total, _ = loss_fn(self.model, chunk, labels, a.loss_average)
            (total * self.world / units).backward()  # DDP averages over ranks: mean per unit overall
            loss_sum += total.item()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        self.step += 1
        stat = torch.tensor([loss_sum])
        if self.world > 1:
            dist.all_reduce(stat)
        return stat.item() / units.item()

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total = torch.zeros(2)
        mine = self.eval_examples[self.rank::self.world]
        for i in range(0, len(mine), self.args.batch_size):
            with self.autocast():
                loss, n = loss_fn(self.model, *collate(mine[i:i + self.args.batch_size], self.cfg))
            total += torch.tensor([loss.item(), n])
        if self.world > 1:
            dist.all_reduce(total)
        self.model.train()
        return (total[0] / total[1].clamp_min(1)).item()

    def fit(self) -> Path:
        a = self.args
        bar = Progress(a.steps, "finetune", "step", initial=self.step, enabled=self.is_main and a.progress)
        t0, seen = time.perf_counter(), 0
        while self.step < a.steps:
            loss = self.train_step()
            seen += a.batch_size * a.grad_accum * self.world
            record = {"step": self.step, "loss": loss, "lr": lr_at(self.step - 1, a)}
            if a.eval_every and self.step % a.eval_every == 0 and self.eval_examples:
                record["eval_loss"] = self.evaluate()
            if self.is_main:
                with self.log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                rate = seen / (time.perf_counter() - t0)
                bar.update(1, loss=f"{loss:.4f}", samples_s=f"{rate:.1f}",
                           **({"eval": f"{record['eval_loss']:.4f}"} if "eval_loss" in record else {}))
            if a.save_every and self.step % a.save_every == 0 and self.step < a.steps:
                self.save(a.out / "checkpoints" / f"step-{self.step:07d}")
        bar.close()
        if self.world > 1 and not a.fsdp:  # FSDP shards are different by design
            self._check_ranks_agree()
        return self.save(a.out / "final", final=True)

    def _check_ranks_agree(self) -> None:
        """Data-parallel replicas must end identical; say so, or fail loudly."""
        with torch.no_grad():
            digest = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()])
                                  for p in self.model.parameters()]).cpu()
        gathered = [torch.empty_like(digest) for _ in range(self.world)]
        dist.all_gather(gathered, digest)
        if not all(torch.equal(gathered[0], g) for g in gathered):
            raise RuntimeError("data-parallel ranks ended with different weights")
        if self.is_main:
            print(f"weights identical on all {self.world} ranks")

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self, folder: Path, final: bool = False) -> Path:
        """Weights (HF layout, or a LoRA adapter) + trainer state, written by rank 0 only."""
        state = self._whole_state()
        if self.is_main:
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            if self.args.lora:
                tmp.mkdir(parents=True)
                self.inner.save_pretrained(str(tmp), state_dict=state)
                shutil.copy2(self.tokenizer.path, tmp / self.tokenizer.file_name)
            else:
                dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
                    self.args.save_dtype if final else "fp32"]
                weights = {k.removeprefix("module."): v.detach().to("cpu", dtype) for k, v in state.items()}
                save_hf(weights, self.cfg, tmp, extra_files=(self.tokenizer.path,))
            if not final:  # what --resume needs; the final model is for use, not for resuming
                torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(),
                            "args": _jsonable(self.args)}, tmp / STATE_FILE)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        if self.world > 1:
            dist.barrier()
        return folder

    def _whole_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds, as whole tensors (every rank takes part: FSDP gathers):
        with LoRA the adapters alone, never a gathered copy of the frozen base."""
        if self.args.lora:
            return {n: (p.full_tensor() if is_dtensor(p) else p).detach()
                    for n, p in self.inner.named_parameters() if p.requires_grad}
        return self.model.state_dict() if not self.args.fsdp else _full_state(self.model)

    def _load_into_params(self, folder: Path) -> None:
        """A checkpoint's weights streamed tensor by tensor into the parameters, each in the dtype
        it has (frozen: the load dtype; trained: fp32), so resuming holds no fp32 copy of the
        model beside it (the checkpoint stores fp32)."""
        params = dict(self.inner.named_parameters())
        seen = set()
        with torch.no_grad():
            for group in iter_tensors(folder, config=self.cfg):
                for name, tensor in group.items():
                    if name in params:
                        params[name].copy_(tensor)
                        seen.add(name)
        if seen != params.keys():
            raise TrainingError(f"{folder} lacks {len(params.keys() - seen)} of the model's weights, "
                                f"e.g. {sorted(params.keys() - seen)[0]}")

    def _resume(self) -> None:
        found = sorted((self.args.out / "checkpoints").glob("step-*"))
        found = [f for f in found if (f / STATE_FILE).is_file()]
        if not found:
            if self.is_main:
                print(f"--resume: no checkpoint under {self.args.out / 'checkpoints'}; starting fresh")
            return
        last = found[-1]
        state = torch.load(last / STATE_FILE, map_location="cpu", weights_only=True)
        if self.args.lora:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(self.inner, load_file(last / "adapter_model.safetensors"))
        else:
            self._load_into_params(last)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        if self.is_main:  # keep the log consistent with the resumed step
            lines = self.log_path.read_text().splitlines() if self.log_path.exists() else []
            kept = [l for l in lines if json.loads(l)["step"] <= self.step]
            self.log_path.write_text("".join(l + "\n" for l in kept))
            print(f"resumed from {last} at step {self.step}")


def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _jsonable(args: TrainArgs) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(args).items()}


def init_weights(model: CogVLMForCausalLM, std: float = 0.02) -> None:
    """Initialization for training from scratch.

    GPT-style normal(0, std) matrices, unit norms, zero biases, with three exceptions for the
    EVA encoder. Its layers add *normalized* branch outputs to the stream, and at init attention
    is near-uniform, so every layer would add the same unit-size vector to every patch and bury
    what tells patches apart (a model trained that way learns to ignore the image). So the
    branch norms start at 0.1 (like layer scale), and the patch embedding at 1/sqrt(fan_in) so
    each patch starts with a unit-size, image-dependent vector. And where a patch is matters as
    much (boxes, left-to-right captions) but reaches the decoder only through the ViT's position
    embedding (CogVLM gives all patches one position id), so that starts as 2-D sin-cos
    features of the patch's row and column, as large as the patch vectors, not as noise 50x
    smaller.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif name.startswith("model.vision.transformer.") and name.endswith("layernorm.weight"):
                p.fill_(0.1)
            elif ("norm" in name or name.endswith("_ln.weight")) and p.ndim == 1:  # _ln: CogAgent's tower
                p.fill_(1.0)
            elif name == "model.vision.patch_embedding.proj.weight":
                p.normal_(0.0, p[0].numel() ** -0.5)
            elif name == "model.vision.patch_embedding.position_embedding.weight":
                v = model.config.vision
                p.copy_(sincos_2d(v.image_size // v.patch_size, p.shape[1]))
            else:
                p.normal_(0.0, std)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(1 + grid*grid, dim) position features: a zero row for the CLS token, then for each patch
    (row-major, as the patch embedding flattens them) sin and cos of its row and of its column
    at dim/4 frequencies from 1 to 1/10000 (the MAE / "ViT-S/16 baselines" initialization)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos features need a width divisible by 4, not {dim}")
    freqs = 10000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = []
    for coord in (rows.flatten(), cols.flatten()):
        angles = coord[:, None] * freqs[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), torch.cat(parts, dim=1)]).float()


MMAP_THRESHOLD = 128 << 10  # glibc's own default, held fixed (see return_freed_blocks)


def return_freed_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve every allocation of `threshold` bytes or more with its own mmap, so a step's freed
    activations go back to the OS at once (glibc's mallopt M_MMAP_THRESHOLD). Left alone, glibc
    raises the threshold after the first large free (up to 32 MiB) and serves later steps' tensors
    from a heap that only grows: on the fine-tuning benchmark's model the peak host memory of a
    run fell 942 -> 835 MB (int4 QLoRA) and 1202 -> 1123 MB (bf16 LoRA) with it. Process-wide,
    so the fine-tuning run sets it, not the library. False where the C library has no effective
    mallopt (musl, macOS): nothing changes there."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3  # from glibc's malloc.h
    return mallopt(ctypes.c_int(m_mmap_threshold), ctypes.c_int(threshold)) == 1


def finetune(args: TrainArgs) -> Path:
    return_freed_blocks()
    trainer = Trainer(args)
    if trainer.is_main:
        n_img = sum(ex.image is not None for ex in trainer.examples)
        n_video = sum(ex.video is not None for ex in trainer.examples)
        params = sum(p.numel() for p in trainer.trainable)
        shown = f"{n_video} with videos" if n_video else f"{n_img} with images"
        print(f"{len(trainer.examples)} training examples ({shown}), {len(trainer.errors)} skipped; "
              f"training {params:,} parameters ({'LoRA on ' if args.lora else ''}{', '.join(trainer.parts)}) "
              f"on {trainer.world} process(es)")
    out = trainer.fit()
    if trainer.world > 1:
        leave_group()
    return out

