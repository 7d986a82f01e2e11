"""The flags every surface shares (which model, how to load it, how to sample) and their checks.

`cogvlm chat`, `web`, `serve`, `caption` and `eval` all take the same model and sampling flags; they
live here, in one place, so a new loading option (quantization, several GPUs) reaches every
surface at once.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from .config import DEFAULT_MODEL, TEMPLATE_ALIASES, TEMPLATES
from .generate import SamplingParams

if TYPE_CHECKING:
    from .api import CogVLM

SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "max_new_tokens", "max_length", "seed")
SAMPLING_HELP = {
    "temperature": "sampling temperature (0 = greedy)", "top_p": "nucleus sampling mass",
    "top_k": "sample among the k likeliest tokens (1 = greedy, 0 = no limit)",
    "max_new_tokens": "longest answer in tokens (default: until max_length)",
    "max_length": "longest prompt + answer in tokens, image slots included (default: the model's context, "
                  "2048 for CogVLM, 8192 for CogVLM2)", "seed": "random seed for sampling",
}


class UsageError(Exception):
    """A flag value or combination the user can fix: one line on stderr and exit code 2."""


def spellings(name: str) -> list[str]:
    """The seed's underscore flag name and its dashed twin, so both habits work."""
    return [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Which model to load, how, and the default sampling settings."""
    parser.add_argument(*spellings("model"), *spellings("from_pretrained"), dest="model", default=DEFAULT_MODEL,
                        metavar="NAME_OR_PATH", help=f"registry name, hub id or folder (default: {DEFAULT_MODEL})")
    parser.add_argument("--template", "--version", choices=TEMPLATES, type=lambda v: TEMPLATE_ALIASES.get(v, v),
                        help="prompt template (default: the model's; the authors' chat_old is chat)")
    dtype = parser.add_mutually_exclusive_group()
    dtype.add_argument("--bf16", dest="dtype", action="store_const", const="bf16", help="bfloat16 weights")
    dtype.add_argument("--fp16", dest="dtype", action="store_const", const="fp16", help="float16 weights")
    add_quant_flags(parser)
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one)")
    add_tp_flag(parser)
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step with torch.compile: faster decoding after some seconds of "
                             "compiling; needs a C++ compiler on CPU, and holds a packed copy of the language "
                             "weights per frozen graph (batches; in bf16 batch 1 too); with --quant it fuses the small "
                             "ops around the packed kernels (int4 decoding 1.7-1.9x on CPU)")
    parser.add_argument("--tokenizer", *spellings("local_tokenizer"), dest="tokenizer", metavar="PATH",
                        help="sentencepiece tokenizer.model (CogVLM) or tokenizer.json (CogVLM2) (default: the one "
                             "next to the weights)")
    defaults = SamplingParams()
    for name in SAMPLING_FLAGS:
        kind = float if name in ("temperature", "top_p") else int
        default = None if name == "max_length" else getattr(defaults, name)  # max_length: in its help
        parser.add_argument(*spellings(name), type=kind, metavar="N",
                            help=SAMPLING_HELP[name] + ("" if default is None else f" (default {default})"))


# cogvlm-chat-v1.1's plan (cogvlm.plan.weight_bytes; tests/test_plan.py keeps these in step)
MEMORY_PLAN = ("weights of cogvlm-chat-v1.1: bf16 35.3 GB, --quant 8 22.2 GB, --quant 4 16.1 GB, "
               "--quant 4 --quant-vision 8 11.6 GB; KV cache 1.07 GB per 2048-token row (bf16)")


def add_quant_flags(parser: argparse.ArgumentParser) -> None:
    """Weight-only quantization while loading (docs/quantization.md)."""
    from .quantize import GROUP_SIZES

    parser.add_argument("--quant", type=int, choices=(4, 8),
                        help="quantize the language weights (both experts, output head) while loading, on CPU or "
                             "CUDA: 8 = int8 per output row, 4 = int4 in groups; activations run in bf16, the "
                             "packed kernels' dtype. A checkpoint made by `cogvlm quantize` loads quantized "
                             f"without this flag. {MEMORY_PLAN}")
    parser.add_argument("--quant-group-size", type=int, choices=GROUP_SIZES, default=128, metavar="N",
                        help=f"inputs per int4 scale: {', '.join(map(str, GROUP_SIZES))} (default 128)")
    parser.add_argument("--quant-vision", type=int, choices=(8,),
                        help="also int8 for the ViT and adapter linears (default: full precision, as the authors "
                             "ship it; costs a little accuracy, see docs/quantization.md)")


def quant_flags(args: argparse.Namespace) -> dict[str, Any]:
    """`CogVLM.from_pretrained` keywords for the quantization flags, checked."""
    quantized = args.quant or args.quant_vision
    if quantized and getattr(args, "dtype", None) == "fp16":
        raise UsageError("quantized models run in bf16 (the packed kernels' activation dtype); drop --fp16")
    return {"quant": args.quant, "group_size": args.quant_group_size, "quant_vision": args.quant_vision}


def add_tp_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, metavar="N",
                        help="split the model over N GPUs (or N CPU processes) with tensor parallelism; "
                             "the N-1 other processes are started for you (under torchrun: its world size). "
                             "`cogvlm plan` says which N fits")


def torchrun_group() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment, joining the gloo group the ranks meet in
    when there are several (once; ranks may end far apart, hence the long timeout)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timedelta(hours=24))
    return rank, world


def share_items(args: argparse.Namespace) -> tuple[int, int]:
    """(rank, world size) for the jobs that split their *items* over torchrun's processes (caption,
    eval): each process loads a model of its own, on its own GPU, and takes every world-th item.
    Only `--tp N` asks for the other split, one model over the processes, driven by rank 0: then
    rank 0 takes every item, (0, 1). Call it before `load_model(args)`."""
    from .tp import launched_by_torchrun

    if (args.tp or 1) > 1 or launched_by_torchrun() is None:
        return 0, 1
    args.tp = 1  # not the torchrun default of chat and serve, which split the model
    rank, world = torchrun_group()
    if world > 1 and args.device is None:
        import torch

        if torch.cuda.is_available():
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    return rank, world


def sampling_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling keywords given on the command line, checked before the (slow) model load."""
    chosen = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}
    try:
        SamplingParams.build(**chosen)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return chosen


def load_model(args: argparse.Namespace) -> CogVLM:
    """The model the flags name, once the device and quantization requests make sense; a
    --max_length past the model's positions is refused here, before the first question."""
    vlm = _load(args)
    positions = vlm.config.max_position_embeddings
    if getattr(args, "max_length", None) is not None and args.max_length > positions:
        raise UsageError(f"--max_length {args.max_length} is past this model's {positions} positions; "
                         f"use at most {positions}")
    return vlm


def _load(args: argparse.Namespace) -> CogVLM:
    import torch

    from .api import CogVLM, default_device

    try:
        device = torch.device(args.device or default_device())
    except RuntimeError:
        raise UsageError(f"unknown device {args.device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("no CUDA GPU is available here; use --device cpu")
    if args.tp is not None and args.tp < 1:
        raise UsageError(f"--tp {args.tp}: the number of processes must be at least 1")
    if (args.tp or 1) > 1 and args.compile:
        raise UsageError("--tp does not combine with --compile yet: the ranks decode uncompiled")
    return CogVLM.from_pretrained(args.model, dtype=args.dtype, device=device, tokenizer=args.tokenizer,
                                  compile=args.compile, tp=args.tp, **quant_flags(args))
