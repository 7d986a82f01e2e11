"""`cogvlm convert`: a Hugging Face-layout copy of a SAT or Hugging Face checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

from .flags import add_output_flags


def cmd_convert(args: argparse.Namespace) -> int:
    from ..checkpoint import convert

    out = convert(args.src, args.dst, max_shard_bytes=int(args.shard_gb * 2**30), force=args.force)
    print(f"wrote {out}")
    return 0


def add_convert_verb(verbs: Any) -> None:
    p = verbs.add_parser("convert", help="write a Hugging Face-layout copy of a checkpoint",
                         description="Convert a SAT or Hugging Face checkpoint folder (or a hub id) into a "
                                     "Hugging Face-layout folder: sharded safetensors + index + config.json. "
                                     "Tensors are copied bit-exactly in their stored dtype.")
    add_output_flags(p, "checkpoint folder (SAT or Hugging Face layout), registry name or hub id")
    p.set_defaults(func=cmd_convert)
