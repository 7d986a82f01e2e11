"""FSDP built sharded from the start: each rank reads from the safetensors files only the rows
of each weight that it holds, so no process holds the whole model, on the host or the device.

The model (the base, plus LoRA adapters if any) is built on the meta device, its parameters are
given their training dtypes there (frozen: the load dtype; trained: fp32), FSDP2's `fully_shard`
wraps each decoder layer and then the root, and only then is memory allocated. Every parameter is
then a DTensor sharded along dim 0 (torch.chunk's split: rank r holds rows r*c .. (r+1)*c, with
c = ceil(rows / world)), and a row range of a row-major tensor is one contiguous run of bytes in
its shard file, which `checkpoint.read_rows` reads alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from .checkpoint import check_names, derived, read_rows, report_weights, safetensors_index, scan_weights
from .model import CogVLMForCausalLM

Slots = dict[str, tuple[nn.Module, str]]


def weight_slots(model: CogVLMForCausalLM) -> Slots:
    """Checkpoint name -> (module, attribute) of every stored tensor, taken before peft wraps
    Linears and FSDP swaps parameters for DTensors: the module objects survive both (peft keeps
    the original Linear as `base_layer`), so the names still lead to the right tensors after."""
    slots = {}
    for name in model.state_dict():
        module_name, _, key = name.rpartition(".")
        slots[name] = (model.get_submodule(module_name), key)
    return slots


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor, without importing torch.distributed.tensor where FSDP is not used
    (0.7 s and ~40 MB of host memory, sympy included, in every fine-tuning process): no DTensor
    exists unless that module has been imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local_part(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(this rank's tensor, first row, end row) of a parameter: its local shard and where that
    lies in the whole tensor for an FSDP DTensor, the whole tensor otherwise."""
    if not is_dtensor(t):
        return t, 0, t.shape[0]
    from torch.distributed.tensor import Shard

    if tuple(t.placements) != (Shard(0),):
        raise ValueError(f"expected FSDP's Shard(0) placement, got {t.placements}")
    rows, world, rank = t.shape[0], t.device_mesh.size(), t.device_mesh.get_local_rank()
    chunk = -(-rows // world)
    begin = min(rank * chunk, rows)
    end = min(begin + chunk, rows)
    local = t.to_local()
    if local.shape[0] != end - begin:
        raise ValueError(f"local shard of {local.shape[0]} rows, expected rows {begin}..{end}")
    return local, begin, end


def shard_from_checkpoint(model: nn.Module, base: CogVLMForCausalLM, slots: Slots, folder: Path,
                          device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`model` (on meta; `base` is the CogVLM inside it, `slots` its `weight_slots`) sharded over
    the default process group with FSDP2 and filled from the checkpoint in `folder`: each rank
    reads its rows of each weight. Trainable parameters are fp32, frozen ones `dtype`. Buffers
    computed at build time (RoPE tables) are kept; stored buffers (CogVLM2's inv_freq, a few
    floats per layer) are read whole. Returns the FSDP module; LoRA adapters are left empty
    (`finetune.init_adapters` fills them)."""
    from torch.distributed.fsdp import fully_shard

    stored = safetensors_index(folder)  # headers only; names and shapes checked before any allocation
    rope = base.config.rope_freqs_in_weights
    check_names({k: tuple(getattr(m, a).shape) for k, (m, a) in slots.items()},
                {k: v.shape for k, v in stored.items() if not derived(k, rope)}, str(folder))
    for p in model.parameters():
        p.data = p.data.to(torch.float32 if p.requires_grad else dtype)
    built = {name: b for name, b in model.named_buffers() if not b.is_meta}
    for layer in base.model.layers:
        fully_shard(layer)
    sharded = fully_shard(model)
    model.to_empty(device=device)
    for name, b in built.items():  # to_empty left them uninitialized
        module_name, _, key = name.rpartition(".")
        model.get_submodule(module_name)._buffers[key] = b.to(device)
    bad: dict[str, list[str]] = {}
    with torch.no_grad():
        for name, (module, key) in slots.items():
            local, begin, end = local_part(getattr(module, key))
            raw = read_rows(stored[name], name, begin, end)
            local.copy_(raw)
            scan_weights({name: raw}, {name: local}, bad)
    report_weights(bad, str(folder))
    return sharded
