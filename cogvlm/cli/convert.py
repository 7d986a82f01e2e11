"""`cogvlm convert`: a Hugging Face-layout copy of a SAT or Hugging Face checkpoint."""

from __future__ import annotations

import argparse
from typing import Any


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
    p.add_argument("src", help="checkpoint folder (SAT or Hugging Face layout), registry name or hub id")
    p.add_argument("dst", help="output folder: new or empty (written atomically)")
    p.add_argument("--shard-gb", type=float, default=5.0, help="largest shard size in GiB (default 5)")
    p.add_argument("--force", action="store_true",
                   help="replace a checkpoint cogvlm wrote in the output folder (a folder holding anything else "
                        "is never touched)")
    p.set_defaults(func=cmd_convert)
