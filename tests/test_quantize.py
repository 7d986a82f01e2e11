"""Inference weight formats: weight-only quantization keeps the model's answers close and its
decoder weights small; oneDNN prepacking keeps them the same."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cogvlm import CogVLM
from cogvlm.checkpoint import CheckpointError, quantize_checkpoint
from cogvlm.kernels import cpu_kernels
from cogvlm.model import Chunk, CogVLMForCausalLM
from cogvlm.prompt import PromptTokens, layout_batch
from cogvlm.tp import TensorParallelError
from cogvlm.quantize import (GROUP_SIZES, PLAIN_ROWS, Int4Linear, Int8Linear, PackedLinear, QuantConfig, can_prepack, empty_quantized, fill,
                             prepack_model, quantize_model, quantize_tensors)

needs_onednn = pytest.mark.skipif(not can_prepack(torch.device("cpu"), torch.float32),
                                  reason="this torch build has no oneDNN")
# oneDNN packs bf16 weights only on CPUs with AVX-512 (BW/VL/DQ); can_prepack says no elsewhere
needs_bf16_packing = pytest.mark.skipif(not can_prepack(torch.device("cpu"), torch.bfloat16),
                                        reason="oneDNN's bf16 packing needs AVX-512, which this CPU lacks")


# Bounds from the formats: int8 rounds each weight to the nearest of 255 levels spaced
# amax/127 apart (error <= half a step, + bf16 rounding of the scale: 2^-9 of amax); int4 to the
# nearest of 16 levels spaced (max-min)/15 apart within its group (half a step). The layers'
# outputs are bf16: relative error ~2^-8 on top.
@pytest.mark.parametrize("shape", [(48, 128), (300, 688), (40, 100)])
def test_int8_layer_is_within_half_a_step_of_the_float_one(shape):
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(shape[1], shape[0])
    with torch.no_grad():
        linear.weight.copy_(torch.randn(shape, generator=g))
    layer = quantized(linear, 8, 128)
    q = layer.qweight[:, :shape[1]].float() * layer.scales.float()[:, None]
    step = linear.weight.abs().amax(1, keepdim=True) / 127
    assert ((q - linear.weight).abs() <= step * (0.5 + 2**-8)).all()
    assert (layer.qweight[:, shape[1]:] == 0).all()  # padded to 16 columns with zeros
    x = torch.randn(2, 5, shape[1], generator=g)
    want = x.bfloat16().float() @ q.T + linear.bias.bfloat16().float()
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 5, shape[0])
    assert (got.float() - want).abs().max() <= 2**-7 * want.abs().max()  # bf16 output rounding
    assert (got.float() - linear(x)).norm() <= 0.01 * linear(x).norm()  # 0.4% measured


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("shape", [(48, 256), (300, 688)])  # 688 and 300: padded inputs and rows
def test_int4_layer_is_within_half_a_step_of_the_float_one(shape, group_size):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g)
    tensors = Int4Linear.quantize(w, group_size)
    rows, width = tensors["qweight"].shape[0], 2 * tensors["qweight"].shape[1]
    assert rows % 16 == 0 and width % group_size == 0 and rows - shape[0] < 16 and width - shape[1] < group_size
    nibbles = torch.stack([tensors["qweight"] >> 4, tensors["qweight"] & 15], -1).view(rows, width).float()
    scale, zero = tensors["scales_and_zeros"].float().unbind(-1)  # (groups, rows) each
    deq = ((nibbles.view(rows, -1, group_size) - 8) * scale.T[..., None] + zero.T[..., None]).view(rows, width)
    groups = F.pad(w, (0, width - shape[1])).view(shape[0], -1, group_size)
    step = (groups.amax(-1) - groups.amin(-1)) / 15
    err = (deq[:shape[0]] - F.pad(w, (0, width - shape[1]))).view(shape[0], -1, group_size).abs().amax(-1)
    assert (err <= step * (0.5 + 2**-6)).all()  # + bf16 rounding of scale and zero
    layer = quantized(torch.nn.Linear(shape[1], shape[0], bias=False), 4, group_size, weight=w)
    x = torch.randn(3, shape[1], generator=g)
    want = x.bfloat16().float() @ deq[:shape[0], :shape[1]].T
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (3, shape[0])
    assert (got.float() - want).abs().max() <= 2**-7 * want.abs().max()  # the kernel's bf16 rounding
    # gaussian groups span ~4.1-5.4 sigma (32-128 values): rms error step/sqrt(12) = 8-10.5% of sigma
    assert (got.float() - x @ w.T).norm() <= 0.12 * (x @ w.T).norm()


CPU_KERNELS = cpu_kernels()
needs_cpu_kernels = pytest.mark.skipif(CPU_KERNELS is None,
                                       reason="this CPU has no AVX512-BF16 (or no compiler): PyTorch's kernel runs")


# cogvlm's int4 CPU kernels (csrc/int4_cpu.cpp) read PyTorch's packed layout, so they must give
# PyTorch's numbers: the exact product of the bf16 activations and the dequantized weights,
# rounded once to bf16 (2^-8 relative), plus fp32 summation noise (2^-14 of the output's largest
# magnitude; measured: none above 2^-16). The row counts cover each kernel's passes: 4 rows at a
# time for vdpbf16ps, 16 for AMX, and a partial pass after (AMX: from a zero-padded copy).
@needs_cpu_kernels
@pytest.mark.parametrize("tiles", [False, True])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_cpu_int4_kernels_give_the_exact_product_rounded_once(tiles, group_size):
    if tiles and not CPU_KERNELS.amx:
        pytest.skip("this CPU (or OS) gives no AMX")
    g = torch.Generator().manual_seed(3)
    n, k = 192, 1024
    tensors = Int4Linear.quantize(torch.randn(n, k, generator=g) * 0.02, group_size)
    layer = Int4Linear(k, n, group_size)
    fill(layer, dict(tensors))
    assert layer.kernels == CPU_KERNELS  # rows a multiple of 64: the layout's blocks
    nibbles = torch.stack([tensors["qweight"] >> 4, tensors["qweight"] & 15], -1).view(n, k).double()
    scale, zero = tensors["scales_and_zeros"].double().unbind(-1)
    deq = ((nibbles.view(n, -1, group_size) - 8) * scale.T[..., None] + zero.T[..., None]).view(n, k)
    for rows in (1, 2, 3, 4, 5, 16, 17, 40):
        x = torch.randn(rows, k, generator=g).bfloat16()
        want = x.double() @ deq.T
        got = torch.ops.cogvlm.int4_mm(x, layer.qweight, group_size, layer.scales_and_zeros, tiles)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        assert ((got.double() - want).abs() <= 2**-8 * want.abs() + 2**-14 * want.abs().max()).all(), rows


@needs_cpu_kernels
def test_int4_layers_pick_the_kernel_by_row_count(monkeypatch):
    layer = quantized(torch.nn.Linear(256, 128, bias=False), 4, 64)
    calls, real = [], torch.ops.cogvlm.int4_mm  # a spy: records `tiles`, runs the real kernel
    monkeypatch.setattr(torch.ops.cogvlm, "int4_mm", lambda *a: calls.append(a[4]) or real(*a))
    x = torch.randn(40, 256)
    row_counts = (1, 2, 3, 16, 40)
    for rows in row_counts:
        want = torch.ops.aten._weight_int4pack_mm_for_cpu(x[:rows].bfloat16(), layer.qweight, 64,
                                                          layer.scales_and_zeros)
        assert (layer(x[:rows]).float() - want.float()).abs().max() <= 2**-7 * want.float().abs().max()
    kinds = [CPU_KERNELS.int4_rows(rows) for rows in row_counts]
    assert calls == [kind == "tiles" for kind in kinds if kind]
    # one row: vdpbf16ps; more: AMX where there is one, else PyTorch's kernel from 3 rows on
    assert kinds == ["dot"] + (["tiles"] * 4 if CPU_KERNELS.amx else ["dot", None, None, None])
    odd = quantized(torch.nn.Linear(256, 80, bias=False), 4, 64)  # 80 rows: not whole 64-row blocks
    assert odd.kernels is None


def quantized(linear: torch.nn.Linear, bits: int, group_size: int, weight: torch.Tensor | None = None):
    weight = linear.weight if weight is None else weight
    layer = empty_quantized(linear, bits, group_size)
    fill(layer, quantize_tensors(weight, bits, group_size), linear.bias)
    return layer


def mid_size_model() -> CogVLMForCausalLM:
    """A random model of 8 layers of width 512 with LLaMA-like weight scales (std 0.02
    matrices, unit norms), so the quantization noise adds up over the layers as in a real model."""
    from tests.configs import tiny_test_config

    config = tiny_test_config(vocab_size=1000, hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8)
    g = torch.Generator().manual_seed(7)
    model = CogVLMForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if p.ndim == 1 and "norm" in name else torch.randn(p.shape, generator=g) * 0.02)
    return model


# Logit drift of a quantized mid-size model against the same model in bf16 (what quantized
# models run in), relative to the logits' RMS and to their largest magnitude. Per matmul the
# rounding noise is step/sqrt(12): ~0.9% of a gaussian row's spread for int8 (step amax/127),
# ~11% for int4 (step (max-min)/15 in groups of 128); over 8 layers x 5 matmuls on a token's path
# it adds up to 3.0% RMS / 3.1% max for int8 and 34% RMS / 31% max for int4 (measured; bf16
# itself drifts 1.1% from fp32). Random weights are the worst case: every group spans its
# full range. Bounds: 1.5x the measurements.
@pytest.mark.parametrize("bits, rms_bound, max_bound", [(8, 0.045, 0.047), (4, 0.5, 0.47)])
def test_quantized_model_logits_drift_within_bounds(bits, rms_bound, max_bound):
    model = mid_size_model()
    g = torch.Generator().manual_seed(1)
    size = model.config.vision.image_size
    chunk = layout_batch([PromptTokens(torch.randn(3, size, size, generator=g), list(range(5, 40))),
                          PromptTokens(None, list(range(50, 70)))], model.config)
    with torch.no_grad():
        want = model.to(torch.bfloat16)(chunk)
        quantize_model(model, QuantConfig(bits))
        got = model(chunk)
    n_quant = sum(isinstance(m, Int8Linear if bits == 8 else Int4Linear) for m in model.modules())
    assert n_quant == model.config.num_layers * 10 + 1  # 2 experts x (qkv, dense, 3 mlp) + head
    assert not any(isinstance(m, torch.nn.Linear) and not name.startswith("model.vision.")
                   for name, m in model.named_modules())
    rms = want.pow(2).mean().sqrt()
    drift = got - want
    assert drift.pow(2).mean().sqrt() <= rms_bound * rms
    assert drift.abs().max() <= max_bound * want.abs().max()


@needs_onednn
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5),
                                        pytest.param(torch.bfloat16, 0.02, marks=needs_bf16_packing)])
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


def random_linear() -> tuple[torch.nn.Linear, torch.Generator]:
    """A 96 -> 40 Linear with seeded weights, and the generator to draw its inputs from."""
    g = torch.Generator().manual_seed(4)
    linear = torch.nn.Linear(96, 40)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 96, generator=g))
    return linear, g


@needs_onednn
def test_packed_linear_sends_one_row_and_long_inputs_to_the_plain_weight_in_fp32():
    # fp32 keeps the plain weight for one-row inputs (MKL's matrix-vector product) and for
    # PLAIN_ROWS rows or more (MKL's GEMM, as fast there): the very kernel and values nn.Linear
    # uses, so bit-equal; the rows between take the packed weight (rounding)
    linear, g = random_linear()
    with torch.no_grad():
        packed = PackedLinear(linear.weight, linear.bias)
        one, rows = torch.randn(1, 96, generator=g), torch.randn(5, 96, generator=g)
        assert torch.equal(packed(one), linear(one))
        assert torch.equal(packed(one[None]), linear(one[None]))
        assert torch.allclose(packed(rows), linear(rows), atol=1e-5, rtol=0)
        wide = torch.randn(48, 1024, generator=g)  # wide enough for the two kernels to round apart
        long = torch.randn(1, PLAIN_ROWS + 3, 1024, generator=g)
        assert torch.equal(PackedLinear(wide)(long), F.linear(long, wide))
        assert packed.plain_weight.data_ptr() == linear.weight.data_ptr()  # shared, not copied


@needs_bf16_packing
def test_packed_linear_keeps_only_the_packed_weight_in_bf16():
    linear, g = random_linear()
    with torch.no_grad():
        one = torch.randn(1, 96, generator=g)
        bf16 = PackedLinear(linear.weight.bfloat16())
        assert bf16.plain_weight is None  # bf16: the packed kernel is the faster one, kept alone
        assert torch.allclose(bf16(one.bfloat16()).float(), linear(one) - linear.bias, atol=0.05, rtol=0.02)


@needs_onednn
def test_from_pretrained_prepacks_on_cpu_and_answers_the_same(talkative):

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


@pytest.mark.parametrize("bits, vision_bits", [(4, None), (8, 8)])
def test_quantized_checkpoint_loads_bit_identical_to_quantizing_while_loading(tiny_checkpoint, tmp_path,
                                                                               bits, vision_bits):
    from cogvlm.checkpoint import load_model, read_quant

    quant = QuantConfig(bits, 32, vision_bits)
    out = quantize_checkpoint(tiny_checkpoint, tmp_path / "q", quant)
    assert read_quant(out) == quant and (out / "tokenizer.model").is_file()
    stored, _ = load_model(out, torch.bfloat16)  # no quant= needed: config.json says how
    live, _ = load_model(tiny_checkpoint, torch.bfloat16, quant=quant)
    n_vision = sum(isinstance(m, Int8Linear) for n, m in stored.named_modules() if n.startswith("model.vision."))
    assert n_vision == (0 if vision_bits is None else 4 * 2 + 4)  # qkv, dense, fc1, fc2 per ViT layer + adapter
    for (name, a), (_, b) in zip(stored.state_dict().items(), live.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name  # packed weights and scales alike
    g = torch.Generator().manual_seed(3)
    chunk = layout_batch([PromptTokens(torch.randn(3, 28, 28, generator=g), [5, 6, 7, 8])], stored.config)
    with torch.no_grad():
        assert torch.equal(stored(chunk), live(chunk))
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    full = sum(f.stat().st_size for f in tiny_checkpoint.glob("*.safetensors"))
    assert size < (0.45 if bits == 4 else 0.6) * full  # fp32 source; tiny dims pad int4 rows to 16
    with pytest.raises(CheckpointError, match="quantized already"):
        load_model(out, torch.bfloat16, quant=QuantConfig(8))


def test_a_damaged_quantized_checkpoint_gives_one_message(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    from cogvlm.checkpoint import load_model, quantize_checkpoint

    out = quantize_checkpoint(tiny_checkpoint, tmp_path / "q", QuantConfig(4, 32))
    shard = next(out.glob("*.safetensors"))
    blob = shard.read_bytes()
    shard.write_bytes(blob[:len(blob) - 100])  # truncated
    with pytest.raises(CheckpointError, match=r"cannot read .*(truncated|ended)"):
        load_model(out, torch.bfloat16)
    shard.write_bytes(blob)
    name = "model.layers.0.mlp.language_mlp.down_proj.qweight"
    state = load_file(str(shard))
    state[name] = state[name][:, :-8].contiguous()  # wrong shape
    save_file(state, str(shard))
    with pytest.raises(CheckpointError, match=r"1 with the wrong shape: " + name.replace(".", r"\.")):
        load_model(out, torch.bfloat16)


def test_quantize_command_and_quant_flag_on_cpu(talkative, tmp_path, capsys):
    """`cogvlm quantize` writes a checkpoint that `chat` loads with no flag; `chat --quant 4`
    quantizes while loading on CPU; both answer the same; bad requests exit 2 in one line."""
    from cogvlm.cli import main

    assert main(["quantize", str(talkative), str(tmp_path / "q4"), "--quant", "4", "--group-size", "32"]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'q4'}\n"
    ask = ["chat", "--device", "cpu", "--query", "hello", "--max_new_tokens", "6", "--top_k", "1"]
    assert main(ask + ["--model", str(tmp_path / "q4")]) == 0
    stored = capsys.readouterr().out
    assert main(ask + ["--model", str(talkative), "--quant", "4", "--quant-group-size", "32"]) == 0
    assert capsys.readouterr().out == stored and stored.strip()
    assert main(["quantize", str(tmp_path / "q4"), str(tmp_path / "again"), "--quant", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "quantized already" in err and not (tmp_path / "again").exists()


def test_quantize_takes_the_old_spelling_for_one_release_with_a_note(talkative, tmp_path, capsys):
    """`--bits/--vision-bits` are `--quant/--quant-vision` on every other verb; the old names
    still write the same checkpoint, saying so; a disagreement or no bits at all is one line."""
    from safetensors.torch import load_file

    from cogvlm.cli import main

    new, old = tmp_path / "new", tmp_path / "old"
    assert main(["quantize", str(talkative), str(new), "--quant", "4", "--group-size", "32"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["quantize", str(talkative), str(old), "--bits", "4", "--group-size", "32"]) == 0
    assert "--bits is now --quant" in capsys.readouterr().err
    for shard in sorted(new.glob("*.safetensors")):
        a, b = load_file(str(shard)), load_file(str(old / shard.name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["quantize", str(talkative), str(tmp_path / "x"), "--quant", "4", "--bits", "8"]) == 2
    assert main(["quantize", str(talkative), str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-2].startswith("cogvlm quantize: error: --bits 8 and --quant 4 disagree")
    assert err[-1] == "cogvlm quantize: error: say how many bits: --quant 4 or --quant 8"
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# The README's examples (cogvlm/web_examples) that fp32 cogvlm-tiny answers correctly (checked by
# eye: shapes-0 has a purple circle, an orange circle and an orange square; shapes-4 four
# objects; shapes-9 a red circle, top right, and a green triangle). Quantized, it must still.
TINY_QUESTIONS = [("shapes-0.png", "What color is the square?", "orange"),
                  ("shapes-0.png", "How many objects are there?", "3"),
                  ("shapes-4.png", "How many objects are there?", "4"),
                  ("shapes-9.png", "What color is the circle?", "red"),
                  ("shapes-9.png", "What shape is the red object?", "circle"),
                  ("shapes-9.png", "How many objects are there?", "2")]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cogvlm_tiny_still_answers_the_readme_examples(bits):
    from importlib.resources import files

    from cogvlm.grounding import parse_boxes

    examples = files("cogvlm") / "web_examples"
    vlm = CogVLM.from_pretrained(device="cpu", quant=bits)
    assert vlm.model.dtype == torch.bfloat16
    answers = vlm.generate([(str(examples / img), q, None) for img, q, _ in TINY_QUESTIONS], template="vqa", top_k=1)
    assert answers == [a for _, _, a in TINY_QUESTIONS]
    box = vlm.generate([(str(examples / "shapes-9.png"), "Where is the red circle? answer in [[x0,y0,x1,y1]] format.",
                         None)], template="base", top_k=1)[0]
    b, = parse_boxes(box).phrases[0].boxes  # fp32 says [[696,045,920,268]]
    assert abs(b.x0 - 696) + abs(b.y0 - 45) + abs(b.x1 - 920) + abs(b.y1 - 268) <= 40


@torch.no_grad()
def forced_logits(model: CogVLMForCausalLM, chunk: Chunk, tokens: list[torch.Tensor]) -> torch.Tensor:
    """The cached prefill's last logits, then one decode step per entry of `tokens`: two models
    compared this way see the same inputs (bf16 near-ties would let their greedy paths part)."""
    cache = model.new_cache(chunk.input_ids.shape[0], chunk.input_ids.shape[1] + len(tokens))
    out = [model(chunk, cache, last_only=True)]
    positions = chunk.position_ids[:, -1] + 1
    for t in tokens:
        out.append(model.decode_step(t, positions, cache))
        positions = positions + 1
    return torch.stack(out)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_compiled_quantized_decode_matches_eager(tiny_checkpoint, bits, fresh_dynamo):
    """compile=True with quant=: inductor fuses the small per-token ops around the packed kernels
    (1.36x faster int4 decoding, docs/quantization.md). Both decode the same random tokens
    (`forced_logits`): bf16 activations, fused in another order, round apart by a few bf16
    steps of the logits' size (measured <= 0.0095 of the logits' max here, at 2 threads)."""
    from torch._dynamo.utils import counters

    eager = CogVLM.from_pretrained(tiny_checkpoint, device="cpu", quant=bits).model
    compiled = CogVLM.from_pretrained(tiny_checkpoint, device="cpu", quant=bits, compile=True).model
    g = torch.Generator().manual_seed(8)
    prompts = [PromptTokens(torch.randn(3, 28, 28, generator=g), [5, 6, 7]), PromptTokens(None, [9, 10])]
    graphs = counters["stats"]["unique_graphs"]
    for rows in (prompts[:1], prompts):
        chunk = layout_batch(rows, eager.config)
        tokens = [torch.randint(3, 400, (len(rows),), generator=g) for _ in range(6)]
        want, got = (forced_logits(m, chunk, tokens)[1:] for m in (eager, compiled))  # the decode steps
        assert (got - want).abs().max().item() <= 0.02 * want.abs().max().item()
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    assert counters["stats"]["unique_graphs"] > graphs  # the compiled step did run


@pytest.mark.slow  # a second process
def test_tensor_parallel_quantizes_each_ranks_share(tmp_path, sp_model_path):
    """tp=2 with quant: each rank quantizes its float slices while loading. int4 groups of 32
    inside each rank's half of a row-split layer (64 and 128 inputs: 32 and 64 per rank) are the
    one-device groups, so both hold the same int4 weights and differ only in the order bf16
    partial sums are added (measured <= 0.016 of the logits' max), in a prefill and in cached
    decoding."""
    import shutil

    from cogvlm.checkpoint import save_hf
    from tests.configs import tiny_test_config

    from .conftest import randomize

    config = tiny_test_config(vocab_size=400, intermediate_size=128, template="chat")
    save_hf(randomize(CogVLMForCausalLM(config), seed=7).state_dict(), config, tmp_path / "ckpt")
    shutil.copy(sp_model_path, tmp_path / "ckpt" / "tokenizer.model")
    one = CogVLM.from_pretrained(tmp_path / "ckpt", device="cpu", quant=4, group_size=32)
    two = CogVLM.from_pretrained(tmp_path / "ckpt", device="cpu", quant=4, group_size=32, tp=2)
    try:
        down = two.model.model.layers[0].mlp.language_mlp.down_proj
        assert isinstance(down, Int4Linear) and down.in_features == 64  # half of the MLP width, in int4
        g = torch.Generator().manual_seed(0)
        chunk = layout_batch([PromptTokens(torch.randn(3, 28, 28, generator=g), [5, 6, 7, 8]),
                              PromptTokens(None, [9, 10])], config)
        tokens = [torch.tensor([token, token + 1]) for token in range(20, 26)]

        @torch.no_grad()
        def logits(model: CogVLMForCausalLM) -> torch.Tensor:  # an uncached prefill, then as forced_logits
            return torch.cat([model(chunk)[:, -1][None], forced_logits(model, chunk, tokens)])

        want, got = logits(one.model), logits(two.model)
        assert (got - want).abs().max().item() <= 0.03 * want.abs().max().item()
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.85  # 16 of 16 measured; ties may flip
    finally:
        two.close()
    with pytest.raises(TensorParallelError, match="quantized checkpoint, which loads on one device"):
        CogVLM.from_pretrained(quantize_checkpoint(tmp_path / "ckpt", tmp_path / "q", QuantConfig(4, 32)),
                               device="cpu", tp=2)
