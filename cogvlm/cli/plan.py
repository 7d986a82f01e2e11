"""`cogvlm plan`: memory per GPU for a model, split and quantization, from the config alone."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .flags import add_quant_flags, positive_int


def cmd_plan(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import read_config
    from ..config import REGISTRY
    from ..plan import describe, plan, usable_memory

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
        memory, source = usable_memory(args.gpu_memory) if args.gpu_memory else (None, None)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if memory is None and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        memory, source = props.total_memory, f"this machine's GPU 0, {props.name}, as CUDA reports it"
    max_length = config.max_position_embeddings if args.max_length is None else args.max_length
    if args.batch < 1 or max_length < 2:
        raise UsageError("--batch must be >= 1 and --max-length >= 2")
    if args.finetune:
        p = finetune_plan_of(config, args, max_length, dtype)
        print(p.describe(memory, args.batch, max_length))
        return 0 if memory is None or p.fits(memory) else 1
    p = plan(config, args.tp, args.quant, dtype, args.batch, max_length, args.group_size, args.quant_vision)
    print(describe(config, p, memory, dtype, args.batch, max_length, source))
    return 0 if memory is None or p.fits(memory) else 1


FINETUNE_DEFAULT_PARTS = {"lora": "vision_expert,language", "full": "vision_expert"}


def finetune_plan_of(config: Any, args: argparse.Namespace, max_length: int, dtype: Any) -> Any:
    """The fine-tuning plan the flags ask for: the job's own tables (`cogvlm.finetune`) say what
    --train's parts are, so the plan counts exactly what `cogvlm finetune` would train."""
    import re

    from ..finetune import LORA_TARGETS, PARTS, TrainingError, checkpointing, parts_for
    from ..plan import finetune_plan

    if args.fsdp < 1 or args.lora_r < 1:
        raise UsageError("--fsdp and --lora-r must be >= 1")
    if args.tp != 1:
        raise UsageError("--finetune plans data-parallel or FSDP training (--fsdp N), not --tp")
    try:
        parts = parts_for(args.train, config, FINETUNE_DEFAULT_PARTS[args.finetune])
    except TrainingError as e:
        raise UsageError(str(e)) from None
    if args.finetune == "lora":
        pattern = re.compile("^(?:" + "|".join(f"(?:{LORA_TARGETS[p]})" for p in parts) + ")$")
        selected = lambda name: pattern.match(name) is not None  # noqa: E731
    else:
        selected = lambda name: any(PARTS[p](name) for p in parts)  # noqa: E731
    return finetune_plan(config, args.finetune, selected, args.lora_r, args.quant, args.group_size, args.fsdp,
                         args.batch, max_length, checkpointing(args.grad_checkpointing, args.quant), dtype)


def add_plan_verb(verbs: Any) -> None:
    p = verbs.add_parser("plan", help="memory per GPU for a model, split (--tp) and quantization; what fits",
                         description="Bytes per device of weights (exact, from the shapes), KV cache and peak "
                                     "activations (estimate: the prefill of one image), computed from the config "
                                     "without downloading; with --gpu-memory (default: this machine's GPU) says "
                                     "whether it fits (exit 0) or not (exit 1, with the smallest --tp / --quant "
                                     "that does). A nominal size (24GB) is planned at what such a card offers CUDA "
                                     "(23.7 GiB); GiB or MiB are taken as written.")
    p.add_argument("model", help="registry name (see `cogvlm list`) or checkpoint folder")
    p.add_argument("--tp", type=positive_int, default=1, metavar="N", help="GPUs the model is split over (default 1)")
    add_quant_flags(p)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="weight dtype (default bf16)")
    p.add_argument("--batch", "--batch-size", dest="batch", type=int, default=1,
                   help="prompts decoded together, or with --finetune examples per micro-batch per GPU (default 1)")
    p.add_argument("--max-length", "--max_length", dest="max_length", type=int,
                   help="prompt + answer tokens per row (default: the model's context, 2048 for CogVLM and "
                        "CogAgent, 8192 for CogVLM2)")
    p.add_argument("--gpu-memory", metavar="SIZE",
                   help="memory per GPU: a card's nominal size (24GB, 80GB: planned at what such a card offers, "
                        "23.7 / 79.2 GiB) or an exact 23.5GiB")
    ft = p.add_argument_group("fine-tuning (cogvlm finetune; docs/finetune.md)")
    ft.add_argument("--finetune", choices=("lora", "full"),
                    help="plan training instead of inference: weights, fp32 trainables, gradients, AdamW states and "
                         "activations per GPU; with --quant, QLoRA")
    ft.add_argument("--train", metavar="PARTS", help="what trains, as finetune --train takes it (default: "
                    + "; ".join(f"{k}: {v}" for k, v in FINETUNE_DEFAULT_PARTS.items())
                    + "; language for a model without a visual expert, CogVLM2-Video)")
    ft.add_argument("--lora-r", type=int, default=8, metavar="R", help="LoRA rank (default 8)")
    ft.add_argument("--fsdp", type=int, default=1, metavar="N", help="GPUs FSDP shards the run over (default 1)")
    ft.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                    help="recompute activations in backward (default: as finetune, on with --quant)")
    p.set_defaults(func=cmd_plan)
