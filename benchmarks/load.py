"""Checkpoint loading: our meta-device streaming loader vs the naive `load_state_dict` path,
one rank of a 2-way tensor-parallel load (it reads only its slices: about half the memory), and
quantizing while loading: int8 and int4 (`quant=`), and the int4 checkpoint that `cogvlm
quantize` writes from the same one (loaded as is). Checkpoint shards are 512 MiB.

Writes a ≈1.3 B-parameter bf16 checkpoint in the Hugging Face layout (sharded safetensors) to a
temp folder, then loads it in fresh subprocesses, one per method, and prints seconds and peak
resident memory above the process's baseline, as a multiple of the checkpoint size.

    python benchmarks/load.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cogvlm.checkpoint import expected_shapes, quantize_checkpoint, save_hf
from cogvlm.config import CogVLMConfig, VisionConfig
from cogvlm.quantize import QuantConfig

CONFIG = CogVLMConfig(hidden_size=2048, intermediate_size=5504, num_layers=12, num_heads=16,
                      vision=VisionConfig(image_size=224, hidden_size=1024, num_layers=4, num_heads=16,
                                          intermediate_size=4096))

CHILD = r"""
import json, resource, sys, time, torch
from pathlib import Path
def rss_kb():
    return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize() // 1024
def peak_kb():  # VmHWM: this process image's own peak (ru_maxrss keeps the forking parent's across exec)
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))
from cogvlm.checkpoint import load_model, read_config, _hf_shards
from cogvlm.model import CogVLMForCausalLM
from safetensors.torch import load_file
folder, method = Path(sys.argv[1]), sys.argv[2]
base = rss_kb()
t = time.perf_counter()
if method in ("streaming", "int4 file"):
    model, _ = load_model(folder, dtype=torch.bfloat16)
elif method in ("int8", "int4"):
    from cogvlm.quantize import QuantConfig
    model, _ = load_model(folder, dtype=torch.bfloat16, quant=QuantConfig(int(method[-1])))
elif method == "rank 0 of 2":  # what each process of `--tp 2` reads and holds (no process group needed)
    from functools import partial
    from cogvlm.checkpoint import load_weights
    from cogvlm.tp import ParallelCogVLM
    model = load_weights(folder, read_config(folder), torch.bfloat16, "cpu", 0, 2,
                         build=partial(ParallelCogVLM, rank=0, world=2))
else:  # what most code does: build (fp32 random init), cast, read every shard, load_state_dict
    model = CogVLMForCausalLM(read_config(folder)).to(torch.bfloat16)
    state = {}
    for shard in _hf_shards(folder):
        state.update(load_file(shard))
    model.load_state_dict(state)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "peak_kb": peak_kb(), "base_kb": base}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=Path, help="write the checkpoint here and keep it")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    folder = args.keep or Path(tmp.name) / "ckpt"
    if not (folder / "config.json").exists():
        t = time.perf_counter()
        g = torch.Generator().manual_seed(0)
        state = {k: (torch.randn(s, generator=g, dtype=torch.float32) * 0.02).to(torch.bfloat16)
                 for k, s in expected_shapes(CONFIG).items()}
        save_hf(state, CONFIG, folder, max_shard_bytes=2**29)
        del state
        print(f"wrote checkpoint in {time.perf_counter() - t:.1f}s")
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    params = sum(torch.Size(s).numel() for s in expected_shapes(CONFIG).values())
    print(f"checkpoint: {params / 1e9:.2f} B parameters, {size / 2**30:.2f} GiB bf16, "
          f"{len(list(folder.glob('*.safetensors')))} shards\n")
    int4_folder = folder.parent / (folder.name + "-int4")
    if not (int4_folder / "config.json").exists():
        t = time.perf_counter()
        quantize_checkpoint(folder, int4_folder, QuantConfig(4), max_shard_bytes=2**29)
        print(f"wrote the int4 checkpoint in {time.perf_counter() - t:.1f}s")
    print(f"{'method':<12} {'seconds':>8} {'peak RSS above baseline':>26}")
    for method in ("streaming", "rank 0 of 2", "int8", "int4", "int4 file", "naive"):
        where = int4_folder if method == "int4 file" else folder
        out = subprocess.run([sys.executable, "-c", CHILD, str(where), method], capture_output=True,
                             text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        extra = (r["peak_kb"] - r["base_kb"]) * 1024
        print(f"{method:<12} {r['seconds']:>8.2f} {extra / 2**30:>14.2f} GiB = {extra / size:.2f}x size")


if __name__ == "__main__":
    main()
