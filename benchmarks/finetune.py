"""Fine-tuning memory and speed: LoRA over an fp32 base, over a bf16-frozen base, and QLoRA over
int8 and int4 packed bases, side by side (QLoRA with gradient checkpointing, its default, and
without; bf16 also with it).

Writes a mid-size random checkpoint (language hidden 1024 x 8 layers, bf16 on disk, like the
published ones) and synthetic scenes to a temp folder, then trains each contender in a fresh
subprocess: LoRA rank 8 on the visual expert and the language layers, batch 2, a few steps.
Each runs as `cogvlm finetune` does (`return_freed_blocks` first). Prints the subprocess's peak
resident memory (VmHWM: its own peak, which ru_maxrss is not across the exec of a forked parent),
the same above the runtime every contender holds before it loads a weight (torch, cogvlm and peft
imported, measured in a child of its own), and steps per second after one warm-up step, each as a
multiple of the baseline's / the bf16 path's.

The baseline is the fp32 row, today's code asked for fp32 weights. With `--old-tree DIR` (a
checkout of an older commit, e.g. 88fa554, where fine-tuning loaded every weight in fp32 on the
host and computed the logits of every token) it is that code's fp32 run instead, from the same
checkpoint and data in the same run.

    python benchmarks/finetune.py [--steps N] [--keep DIR]
    git worktree add /tmp/cogvlm-88fa554 88fa554 && python benchmarks/finetune.py --old-tree /tmp/cogvlm-88fa554
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from cogvlm.checkpoint import expected_shapes, save_hf
from cogvlm.config import REGISTRY, CogVLMConfig, VisionConfig
from cogvlm.data.synthetic import make_dataset
from cogvlm.tokenizer import tokenizer_file

IMAGE_SIZE = 112


def mid_size_config(hidden: int = 1024, layers: int = 8) -> CogVLMConfig:
    """The issue's mid-size model by default (language hidden 1024 x 8 layers); wider ones show
    where the ratios go as the weights outgrow the runtime every process holds."""
    return CogVLMConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_layers=layers,
                        num_heads=hidden // 64, template="vqa", max_position_embeddings=512,
                        vision=VisionConfig(image_size=IMAGE_SIZE, hidden_size=512, num_layers=4, num_heads=8,
                                            intermediate_size=2048))


CONTENDERS = {"fp32 LoRA": {"dtype": "fp32"}, "bf16-frozen LoRA": {"dtype": "bf16"},
              "int8 QLoRA, no checkpointing": {"quant": 8, "grad_checkpointing": False},
              "int4 QLoRA, no checkpointing": {"quant": 4, "grad_checkpointing": False},
              "bf16-frozen LoRA, checkpointing": {"dtype": "bf16", "grad_checkpointing": True},
              "int4 QLoRA (checkpointing, its default)": {"quant": 4}}

# what every contender holds before it loads a weight: the interpreter with torch, cogvlm's
# trainer and peft (which imports transformers) imported
RUNTIME = r"""
import cogvlm.finetune, peft
print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')))
"""

CHILD = r"""
import json, sys, time
from pathlib import Path
import cogvlm.finetune
from cogvlm.finetune import TrainArgs, Trainer
if hasattr(cogvlm.finetune, "return_freed_blocks"):  # an --old-tree checkout may predate it
    cogvlm.finetune.return_freed_blocks()
def peak_kb():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))
folder, data, out, steps, extra = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
trainer = Trainer(TrainArgs(data=Path(data), out=Path(out), model=folder, lora=True, lora_r=8,
                            train="vision_expert,language", steps=steps + 1, batch_size=2, warmup=1,
                            progress=False, **extra))
losses = [trainer.train_step()]  # warm-up: first-call allocations and kernel choices
t = time.perf_counter()
losses += [trainer.train_step() for _ in range(steps)]
print(json.dumps({"steps_s": steps / (time.perf_counter() - t), "peak_kb": peak_kb(), "losses": losses,
                  "code": cogvlm.__file__}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps per contender (default 4)")
    ap.add_argument("--keep", type=Path, help="write the checkpoint and data here and keep them")
    ap.add_argument("--hidden", type=int, default=1024, help="the language model's width (default 1024)")
    ap.add_argument("--layers", type=int, default=8, help="language layers (default 8)")
    ap.add_argument("--old-tree", type=Path, help="a checkout of an older commit: its fp32 run is the baseline")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    root = args.keep or Path(tmp.name)
    config = mid_size_config(args.hidden, args.layers)
    folder = root / f"ckpt-{args.hidden}x{args.layers}"
    if not (folder / "config.json").exists():
        g = torch.Generator().manual_seed(0)
        state = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in expected_shapes(config).items()}
        save_hf(state, config, folder, extra_files=(tokenizer_file(REGISTRY["cogvlm-tiny"].local_dir),))
        del state
    data = make_dataset(root / "data", n_images=16, seed=0, image_size=IMAGE_SIZE)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    params = sum(torch.Size(s).numel() for s in expected_shapes(config).values())
    print(f"checkpoint: {params / 1e6:.0f} M parameters, {size / 2**20:.0f} MiB bf16; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    runtime_kb = int(subprocess.run([sys.executable, "-c", RUNTIME], capture_output=True, text=True,
                                    check=True).stdout.split()[-1])
    print(f"runtime (torch, cogvlm, peft imported; no weights): {runtime_kb / 2**20:.2f} GiB\n")
    print("| contender | peak host memory | vs baseline | above the runtime | vs baseline | steps/s | vs bf16 LoRA |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
    contenders = [(name, extra, None) for name, extra in CONTENDERS.items()]
    if args.old_tree:
        commit = subprocess.run(["git", "-C", str(args.old_tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        contenders.insert(0, (f"fp32 LoRA at {commit}", {"dtype": "fp32"}, args.old_tree.resolve()))
    rows: dict[str, dict] = {}
    for name, extra, tree in contenders:  # each row as it comes: a slow contender does not hide the others
        env = {**os.environ, "PYTHONPATH": str(tree)} if tree else None  # (-c puts the cwd first on sys.path)
        out = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(data), str(root / "runs" / name),
                              str(args.steps), json.dumps(extra)], capture_output=True, text=True, env=env, cwd=tree)
        if out.returncode:
            sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
        r = rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
        assert tree is None or Path(r["code"]).is_relative_to(tree), f"{name} ran {r['code']}, not {tree}'s code"
        base, bf16 = rows[contenders[0][0]], rows.get("bf16-frozen LoRA", r)
        above, above_base = r["peak_kb"] - runtime_kb, base["peak_kb"] - runtime_kb
        print(f"| {name} | {r['peak_kb'] / 2**20:.2f} GiB | {r['peak_kb'] / base['peak_kb']:.2f}x | "
              f"{above / 2**20:.2f} GiB | {above / above_base:.2f}x | "
              f"{r['steps_s']:.3f} | {r['steps_s'] / bf16['steps_s']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
