"""Inference weight formats: weight-only quantization keeps the model's answers close and its
decoder weights small; oneDNN prepacking keeps them the same."""

from __future__ import annotations

import pytest
import torch

from cogvlm.model import CogVLMForCausalLM
from cogvlm.prompt import PromptTokens, layout_batch
from cogvlm.quantize import PackedLinear, QuantLinear, can_prepack, prepack_model, quantize_model

needs_onednn = pytest.mark.skipif(not can_prepack(torch.device("cpu"), torch.float32),
                                  reason="this torch build has no oneDNN")


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


@needs_onednn
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.02)])
def test_prepacked_model_gives_the_same_logits(tiny_model, dtype, tol):
    # Same weights, only the memory layout and the kernels' summation order change: fp32 logits
    # agree to float rounding; bf16 to a few bf16 steps of the logits' scale.
    g = torch.Generator().manual_seed(2)
    prompts = [PromptTokens(torch.randn(3, 28, 28, generator=g), [5, 6, 7, 8]), PromptTokens(None, [9, 10])]
    chunk = layout_batch(prompts, tiny_model.config)
    plain = tiny_model.to(dtype)
    packed = CogVLMForCausalLM(tiny_model.config).to(dtype)
    packed.load_state_dict(plain.state_dict())
    prepack_model(packed.eval())
    with torch.no_grad():
        want, got = plain(chunk).float(), packed(chunk).float()
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in plain.modules())
    n_mlp = 2 * tiny_model.config.num_layers  # each MLP's gate and up become one packed weight
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == n_linear - n_mlp
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    assert (got - want).abs().max() <= tol * want.abs().max()


@needs_onednn
def test_packed_linear_sends_one_row_to_the_plain_weight_in_fp32():
    # fp32 keeps the plain weight for one-row inputs (MKL's matrix-vector product): the very
    # kernel and values nn.Linear uses, so bit-equal; more rows take the packed weight (rounding)
    g = torch.Generator().manual_seed(4)
    linear = torch.nn.Linear(96, 40)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 96, generator=g))
        packed = PackedLinear(linear.weight, linear.bias)
        one, rows = torch.randn(1, 96, generator=g), torch.randn(5, 96, generator=g)
        assert torch.equal(packed(one), linear(one))
        assert torch.equal(packed(one[None]), linear(one[None]))
        assert torch.allclose(packed(rows), linear(rows), atol=1e-5, rtol=0)
        assert packed.plain_weight.data_ptr() == linear.weight.data_ptr()  # shared, not copied
        bf16 = PackedLinear(linear.weight.bfloat16())
        assert bf16.plain_weight is None  # bf16: the packed kernel is the faster one, kept alone
        assert torch.allclose(bf16(one.bfloat16()).float(), linear(one) - linear.bias, atol=0.05, rtol=0.02)


@needs_onednn
def test_from_pretrained_prepacks_on_cpu_and_answers_the_same(talkative):
    from cogvlm import CogVLM

    packed = CogVLM.from_pretrained(talkative, device="cpu")
    plain = CogVLM.from_pretrained(talkative, device="cpu", prepack=False)
    assert any(isinstance(m, PackedLinear) for m in packed.model.modules())
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    g = torch.Generator().manual_seed(3)
    requests = [(torch.rand(3, 64, 64, generator=g), "what is it?", None), (None, "hello", None),
                (torch.rand(3, 64, 64, generator=g), "and this?", None)]
    requests = [(None if img is None else _pil(img), q, h) for img, q, h in requests]
    want = plain.generate(requests, top_k=1, max_new_tokens=12)
    assert packed.generate(requests, top_k=1, max_new_tokens=12) == want
    assert all(want)


def _pil(pixels: torch.Tensor):
    from PIL import Image

    return Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).astype("uint8"))
