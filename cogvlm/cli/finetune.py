"""`cogvlm finetune` and `cogvlm merge-lora`: training on JSONL conversations, and folding a LoRA
adapter into its base."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .flags import add_output_flags

FINETUNE_HELP = {
    "data": "training JSONL (docs/data-format.md)",
    "out": "output folder: final/ (the model), checkpoints/step-N/, log.jsonl",
    "model": "start from these weights: folder, registry name or hub id",
    "init_config": "start from random weights with this config.json (needs --tokenizer)",
    "tokenizer": "sentencepiece tokenizer.model (default: the one next to the weights)",
    "eval_data": "held-out JSONL for periodic evaluation loss",
    "train": "what trains: 'all' or a comma list of vision_expert, adapter, vit, language (default: vision_expert,adapter; "
             "language for a model without a visual expert, CogVLM2-Video)",
    "template": "video sets: the template their questions are asked in, which also picks the frame sampling rule "
                "(default: the model's; the published CogVLM2-Video folders say base, their chat models use chat)",
    "lora": "train LoRA adapters (peft) on the chosen parts instead of the weights themselves",
    "lora_r": "LoRA rank", "lora_alpha": "LoRA alpha",
    "steps": "optimizer steps", "batch_size": "examples per micro-batch per process",
    "grad_accum": "micro-batches per optimizer step", "lr": "peak learning rate (AdamW)",
    "min_lr_ratio": "cosine schedule ends at lr x this", "warmup": "linear warmup steps",
    "weight_decay": "AdamW weight decay on matrices",
    "loss_average": "'token': mean over all answer tokens; 'example': each example's mean, then the mean over "
                    "examples (short answers weigh as much as long ones)",
    "dtype": "dtype of the frozen weights, which load straight into it: fp32, or bf16 (with autocast); trained "
             "weights and LoRA adapters keep fp32 master copies. auto: the checkpoint's dtype (bf16 with --quant)",
    "quant": "QLoRA: load the language weights (both experts, output head) quantized, 4 = int4 in groups, 8 = int8, "
             "and train LoRA adapters over them (needs --lora; computes in bf16)",
    "group_size": "with --quant 4: inputs per int4 scale (32, 64, 128, 256)",
    "grad_checkpointing": "recompute activations in backward to save memory (default: on with --quant, off "
                          "otherwise)",
    "eval_every": "evaluate every N steps (0: never)", "save_every": "checkpoint every N steps (0: only at the end)",
    "seed": "seed for init and data order",
    "resume": "continue from the newest checkpoint under OUT/checkpoints",
    "fsdp": "with torchrun: shard parameters with FSDP instead of replicating them (DDP); with --model each "
            "rank reads only its own rows of each weight (a float safetensors checkpoint)",
    "save_dtype": "dtype of the final weights: fp32, bf16 or fp16",
    "max_length": "longest example in tokens (image slots included; 0 = the model's context); longer records "
                  "are reported and skipped",
    "progress": "show a progress bar",
}


def cmd_finetune(args: argparse.Namespace) -> int:
    from ..finetune import TrainArgs, finetune

    fields = {k: getattr(args, k) for k in TrainArgs.__dataclass_fields__}
    print(f"wrote {finetune(TrainArgs(**fields))}")
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from ..finetune import merge_lora

    print(f"wrote {merge_lora(args.base, args.adapter, args.out, force=args.force)}")
    return 0


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, helps: dict[str, str]) -> None:
    """One flag per dataclass field, so the CLI and the Python API cannot drift apart."""
    from dataclasses import MISSING, fields
    from typing import Literal, get_args, get_origin, get_type_hints

    hints = get_type_hints(cls)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        required = f.default is MISSING
        if isinstance(f.default, bool) or (f.default is None and bool in get_args(hints[f.name])):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=helps.get(f.name))
            continue
        kind = {"int": int, "float": float}.get(type(f.default).__name__, str)
        if f.default is None and int in get_args(hints[f.name]):  # int | None: an optional number
            kind = int
        if "Path" in str(f.type):
            kind = Path
        choices = get_args(hints[f.name]) if get_origin(hints[f.name]) is Literal else None
        text = helps.get(f.name, "")
        if not required and f.default is not None and "(default" not in text:  # say each default once
            text += f" (default: {f.default})"
        parser.add_argument(flag, dest=f.name, type=kind, default=None if required else f.default,
                            required=required, choices=choices, help=text)


def add_finetune_verbs(verbs: Any) -> None:
    from ..finetune import TrainArgs

    p = verbs.add_parser("finetune", help="train a model on a JSONL data set (full or LoRA; torchrun for several processes)",
                         description="Fine-tune (or train from scratch) on JSONL conversations; loss on answers only. "
                                     "Run under torchrun --nproc_per_node N for data parallelism.")
    add_dataclass_flags(p, TrainArgs, FINETUNE_HELP)
    p.set_defaults(func=cmd_finetune)

    p = verbs.add_parser("merge-lora", help="fold a LoRA adapter into its base weights",
                         description="Base checkpoint + LoRA adapter folder (from finetune --lora) -> one Hugging Face-layout checkpoint.")
    p.add_argument("base", help="base checkpoint folder, registry name or hub id")
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out", help="output folder: new or empty (written atomically)")
    add_output_flags(p)
    p.set_defaults(func=cmd_merge_lora)
