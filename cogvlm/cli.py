"""The `cogvlm` command: one entry point with a verb per job (convert, chat, ...).

User mistakes (bad paths, unknown models, bad images) end with a one-line message on stderr
and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from .checkpoint import CheckpointError
from .config import ConfigError
from .image import ImageError
from .tokenizer import TokenizerError

USER_ERRORS = (CheckpointError, ConfigError, ImageError, TokenizerError, FileNotFoundError)


def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import convert

    out = convert(args.src, args.dst, max_shard_bytes=int(args.shard_gb * 2**30))
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cogvlm", description="Run, serve and fine-tune CogVLM models.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("convert", help="write a Hugging Face-layout copy of a checkpoint",
                         description="Convert a SAT or Hugging Face checkpoint folder (or a hub id) into a "
                                     "Hugging Face-layout folder: sharded safetensors + index + config.json. "
                                     "Tensors are copied bit-exactly in their stored dtype.")
    p.add_argument("src", help="checkpoint folder (SAT or Hugging Face layout), registry name or hub id")
    p.add_argument("dst", help="output folder (replaced atomically if it exists)")
    p.add_argument("--shard-gb", type=float, default=5.0, help="largest shard size in GiB (default 5)")
    p.set_defaults(func=cmd_convert)
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
