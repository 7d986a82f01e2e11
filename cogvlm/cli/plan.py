"""`cogvlm plan`: memory per GPU for a model, split and quantization, from the config alone."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .flags import add_quant_flags


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
    p = plan(config, args.tp, args.quant, dtype, args.batch, max_length, args.group_size, args.quant_vision)
    print(describe(config, p, memory, dtype, args.batch, max_length, source))
    return 0 if memory is None or p.fits(memory) else 1


def add_plan_verb(verbs: Any) -> None:
    p = verbs.add_parser("plan", help="memory per GPU for a model, split (--tp) and quantization; what fits",
                         description="Bytes per device of weights (exact, from the shapes), KV cache and peak "
                                     "activations (estimate: the prefill of one image), computed from the config "
                                     "without downloading; with --gpu-memory (default: this machine's GPU) says "
                                     "whether it fits (exit 0) or not (exit 1, with the smallest --tp / --quant "
                                     "that does). A nominal size (24GB) is planned at what such a card offers CUDA "
                                     "(23.7 GiB); GiB or MiB are taken as written.")
    p.add_argument("model", help="registry name (see `cogvlm list`) or checkpoint folder")
    p.add_argument("--tp", type=int, default=1, metavar="N", help="GPUs the model is split over (default 1)")
    add_quant_flags(p)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="weight dtype (default bf16)")
    p.add_argument("--batch", type=int, default=1, help="prompts decoded together (default 1)")
    p.add_argument("--max-length", "--max_length", dest="max_length", type=int,
                   help="prompt + answer tokens per row (default: the model's context, 2048 for CogVLM and "
                        "CogAgent, 8192 for CogVLM2)")
    p.add_argument("--gpu-memory", metavar="SIZE", help="memory per GPU: a card's nominal size (24GB, 80GB: planned at what such "
                                                          "a card offers, 23.7 / 79.2 GiB) or an exact 23.5GiB")
    p.set_defaults(func=cmd_plan)
