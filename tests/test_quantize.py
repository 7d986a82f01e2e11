"""Weight-only quantization keeps the model's answers close and its decoder weights small."""

from __future__ import annotations

import pytest
import torch

from cogvlm.model import CogVLMForCausalLM
from cogvlm.prompt import PromptTokens, layout_batch
from cogvlm.quantize import QuantLinear, quantize_model


@pytest.mark.parametrize("bits, tol", [(8, 0.01), (4, 0.15)])
def test_quant_linear_reconstructs_weights(bits, tol):
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    q = QuantLinear(w, bits)
    err = (q.dequantize() - w).abs().max() / w.abs().max()
    assert 0 < err <= tol  # int8: half a step of 1/127; int4: half a step of 1/7 per group
    x = torch.randn(3, 128)
    assert torch.allclose(q(x), x @ q.dequantize().T)


# Relative RMS error of the logits. Per weight the rounding noise is step/sqrt(12), step = amax/127
# (int8) or amax/7 (int4); for gaussian rows of 64-96 values (amax ~2.5 sigma) that is ~0.6% and
# ~10% of the weights' spread, adding up over the 5 quantized matmuls in a row on a token's path
# (x2 layers) and amplified by random tiny weights: int4 is lossy, so it is held to 40%.
@pytest.mark.parametrize("bits, tol", [(8, 0.02), (4, 0.4)])
def test_quantized_model_stays_close(tiny_model, bits, tol):
    g = torch.Generator().manual_seed(1)
    chunk = layout_batch([PromptTokens(torch.randn(3, 28, 28, generator=g), [5, 6, 7, 8])], tiny_model.config)
    with torch.no_grad():
        want = tiny_model(chunk)
        quant = CogVLMForCausalLM(tiny_model.config)
        quant.load_state_dict(tiny_model.state_dict())
        quantize_model(quant.eval(), bits)
        got = quant(chunk)
    n_quant = sum(isinstance(m, QuantLinear) for m in quant.modules())
    assert n_quant == tiny_model.config.num_layers * 10 + 1  # 2 experts x (qkv, dense, 3 mlp) + head
    assert (got - want).norm() <= tol * want.norm()
    size = sum(b.numel() * b.element_size() for n, b in quant.named_buffers() if n.endswith("qweight"))
    full = sum(p.numel() * 4 for n, p in tiny_model.named_parameters()
               if n.startswith("model.layers.") and n.endswith("weight") and p.ndim == 2)
    full += tiny_model.lm_head.weight.numel() * 4
    assert size == full // (4 if bits == 8 else 8)
