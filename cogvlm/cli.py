"""The `cogvlm` command: one entry point with a verb per job (convert, chat, ...).

User mistakes (bad paths, unknown models, bad images) end with a one-line message on stderr
and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Sequence

from .options import UsageError
from .checkpoint import CheckpointError
from .config import ConfigError
from .image import ImageError
from .prompt import ImageRequiredError
from .tokenizer import TokenizerError
from .plan import PlanError
from .tp import TensorParallelError
from .files import WriteError

USER_ERRORS = (CheckpointError, ConfigError, ImageError, ImageRequiredError, TokenizerError, FileNotFoundError,
               ImportError, UsageError, TensorParallelError, PlanError, WriteError)


def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import convert

    out = convert(args.src, args.dst, max_shard_bytes=int(args.shard_gb * 2**30))
    print(f"wrote {out}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .checkpoint import quantize_checkpoint
    from .quantize import QuantConfig

    quant = QuantConfig(args.bits, args.group_size, args.vision_bits)
    out = quantize_checkpoint(args.src, args.dst, quant, device=args.device or "cpu",
                              max_shard_bytes=int(args.shard_gb * 2**30))
    print(f"wrote {out}")
    return 0


FINETUNE_HELP = {
    "data": "training JSONL (docs/data-format.md)",
    "out": "output folder: final/ (the model), checkpoints/step-N/, log.jsonl",
    "model": "start from these weights: folder, registry name or hub id",
    "init_config": "start from random weights with this config.json (needs --tokenizer)",
    "tokenizer": "sentencepiece tokenizer.model (default: the one next to the weights)",
    "eval_data": "held-out JSONL for periodic evaluation loss",
    "train": "what trains: 'all' or a comma list of vision_expert, adapter, vit, language",
    "lora": "train LoRA adapters (peft) on the chosen parts instead of the weights themselves",
    "lora_r": "LoRA rank", "lora_alpha": "LoRA alpha",
    "steps": "optimizer steps", "batch_size": "examples per micro-batch per process",
    "grad_accum": "micro-batches per optimizer step", "lr": "peak learning rate (AdamW)",
    "min_lr_ratio": "cosine schedule ends at lr x this", "warmup": "linear warmup steps",
    "weight_decay": "AdamW weight decay on matrices",
    "loss_average": "'token': mean over all answer tokens; 'example': each example's mean, then the mean over "
                    "examples (short answers weigh as much as long ones)",
    "dtype": "fp32, or bf16 autocast",
    "grad_checkpointing": "recompute activations in backward to save memory",
    "eval_every": "evaluate every N steps (0: never)", "save_every": "checkpoint every N steps (0: only at the end)",
    "seed": "seed for init and data order",
    "resume": "continue from the newest checkpoint under OUT/checkpoints",
    "fsdp": "with torchrun: shard parameters with FSDP instead of replicating them (DDP)",
    "save_dtype": "dtype of the final weights: fp32, bf16 or fp16",
    "max_length": "longest example in tokens (image slots included; 0 = the model's context); longer records "
                  "are reported and skipped",
    "progress": "show a progress bar",
}


def cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import TrainArgs, TrainingError, finetune

    fields = {k: getattr(args, k) for k in TrainArgs.__dataclass_fields__}
    try:
        out = finetune(TrainArgs(**fields))
    except TrainingError as e:
        raise UsageError(str(e)) from None
    print(f"wrote {out}")
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from .finetune import TrainingError, merge_lora

    try:
        print(f"wrote {merge_lora(args.base, args.adapter, args.out)}")
    except TrainingError as e:
        raise UsageError(str(e)) from None
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """The registry's models, their size (counted on the meta device from the real configs) and
    whether their weights are here already (shipped, or in the Hugging Face cache)."""
    from .checkpoint import read_config
    from .config import REGISTRY

    cached = _cached_repos()
    rows = [("name", "hub id", "params", "bf16", "image", "template", "here")]
    for entry in REGISTRY.values():
        config = entry.config or read_config(entry.local_dir)
        params = _parameter_count(config)
        here = "shipped" if entry.hf_repo is None else cached.get(entry.hf_repo, "-")
        image = str(config.vision.image_size) + (f"+{config.cross_vision.image_size}" if config.cross_vision else "")
        rows.append((entry.name, entry.hf_repo or "-", f"{params / 1e9:.2f} B" if params > 1e8 else
                     f"{params / 1e6:.1f} M", _gb(2 * params), image, config.template, here))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _parameter_count(config) -> int:
    import torch

    from .model import CogVLMForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in CogVLMForCausalLM(config).parameters())


def _gb(n: int) -> str:
    """Decimal units, as the authors quote sizes (35.3 GB for CogVLM-17B in bf16)."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _cached_repos() -> dict[str, str]:
    """repo id -> size on disk, for the models in the local Hugging Face cache."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        return {r.repo_id: f"cached ({_gb(r.size_on_disk)})" for r in scan_cache_dir().repos if r.repo_type == "model"}
    except CacheNotFound:
        return {}


def cmd_plan(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import read_config
    from .config import REGISTRY
    from .plan import describe, parse_memory, plan

    entry = REGISTRY.get(args.model)
    if entry is not None:
        config = entry.config or read_config(entry.local_dir)
    elif Path(args.model).is_dir():
        config = read_config(Path(args.model))
    else:
        raise UsageError(f"unknown model {args.model!r}: plan reads a registry name ({', '.join(REGISTRY)}) or a "
                         f"checkpoint folder, and downloads nothing")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    try:
        memory = parse_memory(args.gpu_memory) if args.gpu_memory else None
    except ValueError as e:
        raise UsageError(str(e)) from None
    if memory is None and torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(0).total_memory
    max_length = config.max_position_embeddings if args.max_length is None else args.max_length
    if args.batch < 1 or max_length < 2:
        raise UsageError("--batch must be >= 1 and --max-length >= 2")
    p = plan(config, args.tp, args.quant, dtype, args.batch, max_length)
    print(describe(config, p, memory, dtype, args.batch, max_length))
    return 0 if memory is None or p.fits(memory) else 1


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from .data.records import read_records
    from .prompt import build_prompt
    from .tokenizer import train_tokenizer

    texts = []
    for path in args.data:
        records, _ = read_records(path, check_images=False)
        for rec in records:  # the exact prompt strings the model will see, and the answers
            texts += [build_prompt(q, rec.turns[:i], t, image=rec.image is not None)
                      for i, (q, _) in enumerate(rec.turns) for t in ("base", "chat", "vqa")]
            texts += [a for _, a in rec.turns]
    print(f"wrote {train_tokenizer(texts, args.out, args.vocab_size)}")
    return 0


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, helps: dict[str, str]) -> None:
    """One flag per dataclass field, so the CLI and the Python API cannot drift apart."""
    from dataclasses import MISSING, fields
    from typing import Literal, get_args, get_origin, get_type_hints

    hints = get_type_hints(cls)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        required = f.default is MISSING
        if isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=helps.get(f.name))
            continue
        kind = {"int": int, "float": float}.get(type(f.default).__name__, str)
        if "Path" in str(f.type):
            kind = Path
        choices = get_args(hints[f.name]) if get_origin(hints[f.name]) is Literal else None
        text = helps.get(f.name, "")
        if not required and f.default is not None and "(default" not in text:  # say each default once
            text += f" (default: {f.default})"
        parser.add_argument(flag, dest=f.name, type=kind, default=None if required else f.default,
                            required=required, choices=choices, help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cogvlm", description="Run, serve and fine-tune CogVLM models.")
    parser.add_argument("--version", action="version", version=f"cogvlm {version('cogvlm')}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("list", help="the models cogvlm knows, their size and whether they are here",
                         description="List the registry's models with their parameters, bf16 weight size, image "
                                     "size and template, and whether each is shipped or in the Hugging Face cache.")
    p.set_defaults(func=cmd_list)

    p = verbs.add_parser("convert", help="write a Hugging Face-layout copy of a checkpoint",
                         description="Convert a SAT or Hugging Face checkpoint folder (or a hub id) into a "
                                     "Hugging Face-layout folder: sharded safetensors + index + config.json. "
                                     "Tensors are copied bit-exactly in their stored dtype.")
    p.add_argument("src", help="checkpoint folder (SAT or Hugging Face layout), registry name or hub id")
    p.add_argument("dst", help="output folder (replaced atomically if it exists)")
    p.add_argument("--shard-gb", type=float, default=5.0, help="largest shard size in GiB (default 5)")
    p.set_defaults(func=cmd_convert)

    from .quantize import GROUP_SIZES

    p = verbs.add_parser("quantize", help="write a quantized copy of a checkpoint (int8 / int4 weights + scales)",
                         description="Quantize a float checkpoint's decoder linears (both experts) and output head to "
                                     "int8 or int4 (and optionally the ViT + adapter to int8), each weight as it "
                                     "streams in; writes sharded safetensors with the packed weights and scales in a "
                                     "device-neutral layout, the quantization recorded in config.json. Every surface "
                                     "loads it directly (CPU or CUDA) with no re-quantization. "
                                     "See docs/quantization.md.")
    p.add_argument("src", help="float checkpoint folder (SAT or Hugging Face layout), registry name or hub id")
    p.add_argument("dst", help="output folder (replaced atomically if it exists)")
    p.add_argument("--bits", type=int, choices=(4, 8), required=True, help="decoder and output head: 8 or 4 bits")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=128,
                   help="inputs per int4 scale and zero (default 128)")
    p.add_argument("--vision-bits", type=int, choices=(8,), help="also int8 for the ViT and adapter linears")
    p.add_argument("--device", help="where to compute the quantization (default cpu); the file loads on any device")
    p.add_argument("--shard-gb", type=float, default=5.0, help="largest shard size in GiB (default 5)")
    p.set_defaults(func=cmd_quantize)

    from .finetune import TrainArgs

    p = verbs.add_parser("finetune", help="train a model on a JSONL data set (full or LoRA; torchrun for several processes)",
                         description="Fine-tune (or train from scratch) on JSONL conversations; loss on answers only. "
                                     "Run under torchrun --nproc_per_node N for data parallelism.")
    add_dataclass_flags(p, TrainArgs, FINETUNE_HELP)
    p.set_defaults(func=cmd_finetune)

    p = verbs.add_parser("merge-lora", help="fold a LoRA adapter into its base weights",
                         description="Base checkpoint + LoRA adapter folder (from finetune --lora) -> one Hugging Face-layout checkpoint.")
    p.add_argument("base", help="base checkpoint folder, registry name or hub id")
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out", help="output folder")
    p.set_defaults(func=cmd_merge_lora)

    p = verbs.add_parser("plan", help="memory per GPU for a model, split (--tp) and quantization; what fits",
                         description="Bytes per device of weights (exact, from the shapes), KV cache and peak "
                                     "activations (estimate: the prefill of one image), computed from the config "
                                     "without downloading; with --gpu-memory (default: this machine's GPU) says "
                                     "whether it fits (exit 0) or not (exit 1, with the smallest --tp / --quant "
                                     "that does). GB means GiB, as GPU makers count.")
    p.add_argument("model", help="registry name (see `cogvlm list`) or checkpoint folder")
    p.add_argument("--tp", type=int, default=1, metavar="N", help="GPUs the model is split over (default 1)")
    p.add_argument("--quant", type=int, choices=(4, 8), help="weights of the decoder in 4 or 8 bits")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="weight dtype (default bf16)")
    p.add_argument("--batch", type=int, default=1, help="prompts decoded together (default 1)")
    p.add_argument("--max-length", "--max_length", dest="max_length", type=int,
                   help="prompt + answer tokens per row (default: the model's context, 2048 for CogVLM and "
                        "CogAgent, 8192 for CogVLM2)")
    p.add_argument("--gpu-memory", metavar="SIZE", help="memory per GPU, e.g. 24GB or 80GB")
    p.set_defaults(func=cmd_plan)

    p = verbs.add_parser("train-tokenizer", help="train a LLaMA-style sentencepiece tokenizer on JSONL data",
                         description="Train a sentencepiece BPE tokenizer with LLaMA-2's settings (byte fallback, "
                                     "split digits, <unk>/<s>/</s> = 0/1/2) on the prompts and answers of JSONL sets: "
                                     "for models trained from scratch.")
    p.add_argument("data", nargs="+", help="JSONL files (docs/data-format.md)")
    p.add_argument("out", help="output tokenizer.model path")
    p.add_argument("--vocab-size", type=int, default=512, help="pieces (default 512)")
    p.set_defaults(func=cmd_train_tokenizer)

    from .chat_cli import add_chat_verb
    from .web import add_web_verb

    add_chat_verb(verbs)
    add_web_verb(verbs)

    from .caption import add_caption_verb
    from .server import add_serve_verb

    add_serve_verb(verbs)
    add_caption_verb(verbs)

    from .eval.command import add_eval_verb

    add_eval_verb(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except USER_ERRORS as e:
        print(f"cogvlm {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
