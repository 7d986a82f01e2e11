"""How each weight splits across tensor-parallel ranks: the one table (`split_rule`), the check
that a rank count divides a model (`check_split`), and the slicing built on them.

The checkpoint reader (`cogvlm.checkpoint`) reads each rank's slices with it, `ParallelCogVLM`
(`cogvlm.tp`) builds each rank's modules from it and `cogvlm.plan` counts a rank's bytes with
it, so the three cannot disagree on a shape. A leaf module: it imports only the config, so all
three can import it without a cycle. A load runs `check_split` once, where the rank count is
first known (`CogVLM.from_pretrained`, or `load_parallel` called directly); everything below
trusts that the division is exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .config import CogVLMConfig
from .errors import TensorParallelError


def check_split(config: CogVLMConfig, world: int) -> None:
    """Every split dimension must divide by the rank count; say which does not."""
    sizes = {"attention heads": config.num_heads, "MLP width": config.intermediate_size,
             "vocabulary": config.vocab_size, "ViT heads": config.vision.num_heads,
             "ViT MLP width": config.vision.intermediate_size}
    if config.num_key_value_heads != config.num_heads:  # GQA (CogVLM2): each rank takes whole KV heads too
        sizes["KV heads"] = config.num_key_value_heads
    if config.cross_vision is not None:  # CogAgent's cross-attention splits by heads too
        sizes["cross-attention width"] = config.cross_compute_hidden_size
    bad = [f"{k} {v}" for k, v in sizes.items() if v % world]
    if world < 1 or bad:
        fits = [n for n in range(1, 65) if all(v % n == 0 for v in sizes.values())]
        raise TensorParallelError(f"cannot split this model over {world} ranks ({', '.join(bad) or 'need >= 1'} "
                                  f"do not divide); possible rank counts: {', '.join(map(str, fits))}")


def split_rule(hf_name: str) -> str:
    """How a tensor is split across model-parallel ranks: 'qkv', 'kv', 'dim0', 'dim1' or 'replicated'."""
    if hf_name.startswith(("model.vision.linear_proj.", "model.cross_vision.")):
        return "replicated"  # the adapter and CogAgent's high-resolution tower are not split
    if hf_name.endswith("cross_attn.key_value.weight"):
        return "kv"  # rank r holds [k_r; v_r]
    if hf_name.endswith("cross_attn.query.weight"):
        return "dim0"
    if hf_name.endswith("cross_attn.dense.weight"):
        return "dim1"
    if hf_name.endswith(("query_key_value.weight", "query_key_value.bias")):
        return "qkv"
    if hf_name in ("model.embed_tokens.weight", "lm_head.weight") or re.search(
            r"(gate_proj|up_proj)\.weight$|mlp\.fc1\.(weight|bias)$", hf_name):
        return "dim0"
    if re.search(r"(expert_dense|down_proj|attention\.dense|mlp\.fc2)\.weight$", hf_name):
        return "dim1"
    return "replicated"


def rank_shape(hf_name: str, shape: Sequence[int], world: int) -> tuple[int, ...]:
    """The shape of one rank's part of the tensor `hf_name` whose whole shape is `shape` (every
    rank's is the same): what `take_rank` returns, without a tensor. The one place this
    arithmetic lives, so the modules a rank builds and the bytes a plan counts match what it
    reads. A 'qkv' / 'kv' tensor's blocks each lose the same fraction, so its rows do too."""
    out = list(shape)
    rule = split_rule(hf_name)
    if rule in ("dim0", "qkv", "kv"):
        out[0] //= world
    elif rule == "dim1":
        out[1] //= world
    return tuple(out)


def row_blocks(hf_name: str, config: CogVLMConfig) -> tuple[int, ...] | None:
    """The relative row counts of a 'qkv' tensor's blocks where they may differ: the decoder's
    fused QKV (both experts' weights, the vision expert's bias) is [q: num_heads | k:
    num_key_value_heads | v: num_key_value_heads] heads, unequal under grouped-query attention
    (docs/spec/cogvlm2.md section 4). None for the rest: the ViT's q/k/v and CogAgent's k/v are equal."""
    if ".self_attn." in hf_name and split_rule(hf_name) == "qkv":
        return config.num_heads, config.num_key_value_heads, config.num_key_value_heads
    return None


def _block_sizes(rows: int, blocks: tuple[int, ...]) -> list[int]:
    unit = rows // sum(blocks)
    return [b * unit for b in blocks]


def merge_ranks(parts: list[torch.Tensor], rule: str, blocks: tuple[int, ...] | None = None) -> torch.Tensor:
    """The whole tensor from its ranks' parts; `blocks` as in `take_rank`."""
    if len(parts) == 1 or rule == "replicated":
        return parts[0]
    if rule == "dim0":
        return torch.cat(parts, 0)
    if rule == "dim1":
        return torch.cat(parts, 1)
    blocks = blocks or (1,) * len(rule)  # "qkv": rank r holds [q_r; k_r; v_r]; "kv": [k_r; v_r]
    pieces = [p.split(_block_sizes(p.shape[0], blocks)) for p in parts]
    return torch.cat([blk[i] for i in range(len(blocks)) for blk in pieces], 0)


def take_rank(t: torch.Tensor | Any, rule: str, rank: int, world: int,
              blocks: tuple[int, ...] | None = None) -> torch.Tensor:
    """Rank `rank`'s part of a whole tensor under `rule`: the inverse of `merge_ranks`. `t` may
    be a safetensors slice, so that only this part is read from the file. A 'qkv' / 'kv' tensor's
    rows are blocks of the relative sizes `blocks` (`row_blocks`; default equal), each split."""
    shape = t.get_shape() if hasattr(t, "get_shape") else t.shape
    if world == 1 or rule == "replicated":
        return t[:]
    if rule == "dim1":
        n = shape[1] // world
        return t[:, rank * n:(rank + 1) * n]
    if rule == "dim0":
        n = shape[0] // world
        return t[rank * n:(rank + 1) * n]
    parts, start = [], 0  # qkv: this rank's heads of q, then of k, then of v; kv: of k, then of v
    for rows in _block_sizes(shape[0], blocks or (1,) * len(rule)):
        n = rows // world
        parts.append(t[start + rank * n:start + (rank + 1) * n])
        start += rows
    return torch.cat(parts)


@dataclass(frozen=True)
class Split:
    """Tensor-parallel rank `rank` of `world` of a model with `config`: which part of each tensor it holds."""

    config: CogVLMConfig
    rank: int = 0
    world: int = 1

    def take(self, hf_name: str, t: torch.Tensor | Any) -> torch.Tensor:
        return take_rank(t, split_rule(hf_name), self.rank, self.world, row_blocks(hf_name, self.config))

    def merge(self, hf_name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        return merge_ranks(parts, split_rule(hf_name), row_blocks(hf_name, self.config))
