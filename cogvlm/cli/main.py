"""The `cogvlm` command: one entry point with a verb per job (convert, chat, ...), each verb in a
module of its own beside this one.

User mistakes (bad paths, unknown models, bad images) end with a one-line message on stderr
and exit code 2, never a traceback: every named error derives from `CogVLMError`.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version
from typing import Callable, Sequence

from ..errors import CogVLMError

# what the user can fix besides our named errors: a path that is not there, an extra not installed
USER_ERRORS = (CogVLMError, FileNotFoundError, ImportError)


def cmd_list(args: argparse.Namespace) -> int:
    """The registry's models, their size (counted on the meta device from the real configs) and
    whether their weights are here already (shipped, or in the Hugging Face cache)."""
    from ..checkpoint import read_config
    from ..config import REGISTRY

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

    from ..model import CogVLMForCausalLM

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


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from ..data.records import read_records
    from ..prompt import build_prompt
    from ..tokenizer import train_tokenizer

    texts = []
    for path in args.data:
        records, _ = read_records(path, check_images=False)
        for rec in records:  # the exact prompt strings the model will see, and the answers
            texts += [build_prompt(q, rec.turns[:i], t, image=rec.image is not None)
                      for i, (q, _) in enumerate(rec.turns) for t in ("base", "chat", "vqa")]
            texts += [a for _, a in rec.turns]
    print(f"wrote {train_tokenizer(texts, args.out, args.vocab_size)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .caption import add_caption_verb
    from .chat import add_chat_verb
    from .convert import add_convert_verb
    from .eval import add_eval_verb
    from .finetune import add_finetune_verbs
    from .plan import add_plan_verb
    from .quantize import add_quantize_verb
    from .serve import add_serve_verb
    from .web import add_web_verb

    parser = argparse.ArgumentParser(prog="cogvlm", description="Run, serve and fine-tune CogVLM models.")
    parser.add_argument("--version", action="version", version=f"cogvlm {version('cogvlm')}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("list", help="the models cogvlm knows, their size and whether they are here",
                         description="List the registry's models with their parameters, bf16 weight size, image "
                                     "size and template, and whether each is shipped or in the Hugging Face cache.")
    p.set_defaults(func=cmd_list)
    add_convert_verb(verbs)
    add_quantize_verb(verbs)
    add_finetune_verbs(verbs)
    add_plan_verb(verbs)

    p = verbs.add_parser("train-tokenizer", help="train a LLaMA-style sentencepiece tokenizer on JSONL data",
                         description="Train a sentencepiece BPE tokenizer with LLaMA-2's settings (byte fallback, "
                                     "split digits, <unk>/<s>/</s> = 0/1/2) on the prompts and answers of JSONL sets: "
                                     "for models trained from scratch.")
    p.add_argument("data", nargs="+", help="JSONL files (docs/data-format.md)")
    p.add_argument("out", help="output tokenizer.model path")
    p.add_argument("--vocab-size", type=int, default=512, help="pieces (default 512)")
    p.set_defaults(func=cmd_train_tokenizer)

    add_chat_verb(verbs)
    add_web_verb(verbs)
    add_serve_verb(verbs)
    add_caption_verb(verbs)
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
