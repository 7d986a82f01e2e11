"""`cogvlm quantize`: a quantized copy of a float checkpoint, written as the weights stream in."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import UsageError
from .flags import add_output_flags, add_quant_flags

# the spellings of the first release, accepted for one more with a note on stderr
OLD_SPELLINGS = {"bits": "quant", "vision_bits": "quant_vision"}


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..checkpoint import quantize_checkpoint
    from ..quantize import QuantConfig

    for old, new in OLD_SPELLINGS.items():
        value = getattr(args, old)
        if value is None:
            continue
        if getattr(args, new) not in (None, value):
            raise UsageError(f"--{old.replace('_', '-')} {value} and --{new.replace('_', '-')} "
                             f"{getattr(args, new)} disagree; give --{new.replace('_', '-')} only")
        setattr(args, new, value)
        print(f"cogvlm quantize: note: --{old.replace('_', '-')} is now --{new.replace('_', '-')}, as on every "
              f"other verb; the old spelling goes in the next release", file=sys.stderr)
    if args.quant is None:
        raise UsageError("say how many bits: --quant 4 or --quant 8")
    quant = QuantConfig(args.quant, args.group_size, args.quant_vision)
    out = quantize_checkpoint(args.src, args.dst, quant, device=args.device or "cpu",
                              max_shard_bytes=int(args.shard_gb * 2**30), force=args.force)
    print(f"wrote {out}")
    return 0


def add_quantize_verb(verbs: Any) -> None:
    p = verbs.add_parser("quantize", help="write a quantized copy of a checkpoint (int8 / int4 weights + scales)",
                         description="Quantize a float checkpoint's decoder linears (both experts) and output head to "
                                     "int8 or int4 (and optionally the ViT + adapter to int8), each weight as it "
                                     "streams in; writes sharded safetensors with the packed weights and scales in a "
                                     "device-neutral layout, the quantization recorded in config.json. Every surface "
                                     "loads it directly (CPU or CUDA) with no re-quantization. "
                                     "See docs/quantization.md.")
    add_output_flags(p, "float checkpoint folder (SAT or Hugging Face layout), registry name or hub id")
    add_quant_flags(p)
    p.add_argument("--bits", type=int, choices=(4, 8), help=argparse.SUPPRESS)
    p.add_argument("--vision-bits", type=int, choices=(8,), help=argparse.SUPPRESS)
    p.add_argument("--device", help="where to compute the quantization (default cpu); the file loads on any device")
    p.set_defaults(func=cmd_quantize)
