"""Inference-only weight formats: weight-only quantization of the language decoder (the authors'
`--quant 4|8`), and oneDNN-prepacked weights for CPU, both in plain PyTorch.

Decoding reads every weight once per token, so storing the decoder's linear layers in 8 or 4
bits cuts memory (17.6 B parameters: ~35 GB in bf16, ~20 GB with 8-bit, ~14 GB with 4-bit
decoder weights) and the bytes each step reads. Weights are dequantized on the fly to the
activation dtype; the vision encoder and adapter stay in full precision (they run once per image).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model import CogVLMForCausalLM, GatedMLP


class PackedLinear(nn.Module):
    """A Linear whose weight is stored once, in oneDNN's blocked layout, for CPU inference.

    A plain `F.linear` on CPU repacks the whole weight on every call when a few rows come in
    (batched decoding reads each weight twice and writes it once: ~2x slower at 4-16 rows);
    packing it up front makes the per-step cost one read. For a single row (batch-1 decoding)
    in fp32, though, MKL's matrix-vector product on the plain weight beats oneDNN's packed
    kernel by 1.2-1.7x (measured per layer), so fp32 also keeps the plain weight for one-row
    inputs: twice the linear weights' memory, bought for speed. In bf16 the packed kernel is
    the faster one at every row count (MKL has no bf16 matrix-vector product), so bf16 keeps
    only the packed weight.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # the row count (8) only tunes oneDNN's choice of layout; any number of rows works
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 8),
                             persistent=False)
        self.register_buffer("plain_weight", weight.detach() if weight.dtype == torch.float32 else None,
                             persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.plain_weight is not None and x.numel() == self.in_features:
            return F.linear(x, self.plain_weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


class PackedGatedMLP(nn.Module):
    """The decoder's MLP with gate and up packed as one weight: one matmul instead of two,
    which is ~15% faster when a single row comes in (batch-1 decoding)."""

    def __init__(self, mlp: GatedMLP) -> None:
        super().__init__()
        self.gate_up = PackedLinear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        self.down_proj = PackedLinear(mlp.down_proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN packing helps plain fp32/bf16 inference on CPU builds that have it."""
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available())


def prepack_model(model: CogVLMForCausalLM) -> CogVLMForCausalLM:
    """Replace every Linear (vision encoder, adapter, both experts, output head) in place.
    Inference only: the packed weights take no gradient and are left out of `state_dict`."""
    _replace(model, GatedMLP, lambda name: True, PackedGatedMLP)
    _replace(model, nn.Linear, lambda name: True, lambda linear: PackedLinear(linear.weight, linear.bias))
    return model


class QuantLinear(nn.Module):
    """A Linear with int8 (one scale per output row) or int4 weights (one scale per group of
    `group_size` inputs, two values packed per byte); a bias (CogVLM2's vision QKV) stays as is."""

    def __init__(self, weight: torch.Tensor, bits: int, group_size: int = 64,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, not {bits}")
        self.bits, self.out_features, self.in_features = bits, weight.shape[0], weight.shape[1]
        self.dtype = weight.dtype
        w = weight.detach().float()
        if bits == 8:
            scale = w.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
            q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
        else:
            if self.in_features % group_size:
                group_size = self.in_features  # one group per row when the width does not divide
            groups = w.view(self.out_features, -1, group_size)
            scale = groups.abs().amax(2, keepdim=True).clamp_min(1e-8) / 7
            q = (torch.round(groups / scale).clamp(-8, 7) + 8).to(torch.uint8).view(self.out_features, -1)
            q = q[:, 0::2] | (q[:, 1::2] << 4)  # pack two 4-bit values per byte
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(self.dtype))
        self.register_buffer("bias", None if bias is None else bias.detach())

    def dequantize(self) -> torch.Tensor:
        if self.bits == 8:
            return self.qweight.to(self.scale.dtype) * self.scale
        low, high = self.qweight & 0xF, self.qweight >> 4
        q = torch.stack([low, high], dim=-1).view(self.out_features, -1).to(self.scale.dtype) - 8
        return (q.view(*self.scale.shape[:2], -1) * self.scale).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def quantize_model(model: CogVLMForCausalLM, bits: int) -> CogVLMForCausalLM:
    """Replace every Linear of the decoder layers (both experts) and the output head in place."""
    _replace(model, nn.Linear, lambda name: name.startswith("model.layers.") or name == "lm_head",
             lambda linear: QuantLinear(linear.weight, bits, bias=linear.bias).to(linear.weight.device))
    return model


def _replace(model: nn.Module, kind: type[nn.Module], selected, make) -> None:
    """Swap each selected module of type `kind` (by module name) for `make(module)`."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, kind) and selected(name)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(module))
