"""Training over a memory-lean base: frozen weights in bf16, QLoRA over packed int4/int8 layers,
and LoRA adapters used at inference without merging."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cogvlm.api import CogVLM
from cogvlm.checkpoint import load_weights, read_config
from cogvlm.data.synthetic import make_dataset
from cogvlm.finetune import TrainArgs, Trainer, apply_lora, checkpointing, collate, finetune, loss_fn, merge_lora
from cogvlm.prompt import PromptTokens, layout_batch
from cogvlm.quantize import Int4Linear, QuantConfig
from tests.configs import tiny_test_config

IMAGE_SIZE = 56
GROUP = 32  # the tiny model's 64-wide layers hold two int4 groups


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qlora-data")
    train = make_dataset(root / "train", n_images=6, seed=1, image_size=IMAGE_SIZE)
    config = root / "config.json"
    config.write_text(json.dumps(tiny_test_config(vocab_size=400, template="vqa",
                                                  vision={"image_size": IMAGE_SIZE}).to_hf_dict()))
    return {"train": train if train.suffix == ".jsonl" else train / "data.jsonl", "config": config}


def args(data, out: Path, **kw) -> TrainArgs:
    base = dict(data=data["train"], out=out, steps=40, batch_size=4, lr=1e-2, warmup=2, progress=False, seed=0)
    base.update(kw)
    return TrainArgs(**base)


@pytest.fixture(scope="module")
def base(data, sp_model_path, tmp_path_factory) -> Path:
    """A float checkpoint that has learnt a little (so adapters have something to change)."""
    out = tmp_path_factory.mktemp("base")
    return finetune(args(data, out, init_config=data["config"], tokenizer=sp_model_path, train="all", steps=12,
                         lr=3e-3))


@pytest.fixture(scope="module")
def qlora(data, base, tmp_path_factory) -> Trainer:
    """~40 steps of QLoRA over an int4 base, adapters on the visual expert and the language
    layers, with gradient checkpointing (bf16 autocast: a quantized base computes in bf16)."""
    trainer = Trainer(args(data, tmp_path_factory.mktemp("qlora"), model=str(base), lora=True, lora_r=4, quant=4,
                           group_size=GROUP, train="vision_expert,language", grad_checkpointing=True,
                           eval_data=data["train"]))
    trainer.loss_before = trainer.evaluate()
    trainer.packed_before = {k: v.clone() for k, v in trainer.base.state_dict().items()
                             if k.endswith(("qweight", "scales_and_zeros"))}
    trainer.fit()
    trainer.loss_after = trainer.evaluate()
    return trainer


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_qlora_trains_adapters_over_packed_int4_layers(qlora):
    assert qlora.dtype == torch.bfloat16
    wrapped = {n: type(m.base_layer).__name__ for n, m in qlora.base.named_modules() if hasattr(m, "base_layer")}
    assert any("vision_expert" in n for n in wrapped) and any("language_expert" in n for n in wrapped)
    assert set(wrapped.values()) == {"Int4Linear"}  # every adapted layer's base is the packed one
    assert all(p.dtype == torch.float32 and "lora_" in n for n, p in qlora.model.named_parameters() if p.requires_grad)
    assert len(_losses(qlora.args.out)) == 40
    # over the (small) training set, so the drop is what the adapters learnt, not batch noise
    assert qlora.loss_after < qlora.loss_before - 0.05, (qlora.loss_before, qlora.loss_after)
    after = qlora.base.state_dict()
    assert qlora.packed_before and all(torch.equal(v, after[k]) for k, v in qlora.packed_before.items())


def _dequantized_copy(model: torch.nn.Module) -> None:
    """Each Int4Linear replaced, in place, by a bf16 nn.Linear holding its dequantized weight."""
    for name, m in list(model.named_modules()):
        if isinstance(m, Int4Linear):
            linear = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=torch.bfloat16)
            linear.weight.data = m.dequantize()[:m.out_features, :m.in_features].clone()
            if m.bias is not None:
                linear.bias.data = m.bias.clone()
            linear.requires_grad_(False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)


def test_gradients_reach_the_adapters_through_packed_layers(base, data, sp_model_path):
    """The adapters' gradients over the int4 base equal those over a bf16 copy of the same
    (dequantized) weights: the packed backward is grad @ W with the weight the kernel uses.
    Tolerance: 2% of the gradient's norm (bf16 activations, other summation orders)."""
    cfg = read_config(base)
    grads = []
    for packed in (True, False):
        model = load_weights(base, cfg, torch.bfloat16, quant=QuantConfig(4, GROUP))
        if not packed:
            _dequantized_copy(model)
        torch.manual_seed(0)
        lora = apply_lora(model, ["vision_expert", "language"], r=4, alpha=16)
        for n, p in lora.named_parameters():
            if "lora_B" in n:  # peft starts B at zero, which would leave A without a gradient
                torch.nn.init.normal_(p, std=0.1)
            if "lora_" in n:
                p.data = p.data.float()
        chunk, labels = collate(_examples(data, sp_model_path, cfg), cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = loss_fn(lora.train(), chunk, labels)
        loss.backward()
        grads.append({n: p.grad.float() for n, p in lora.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    # (the last layer's vision-expert outputs feed no answer token: their adapters get zeros)
    assert sum(g.norm() > 0 for g in grads[1].values()) > 8
    for name, g in grads[0].items():
        ref = grads[1][name]
        assert (g - ref).norm() <= 0.02 * ref.norm() + 1e-8, (name, (g - ref).norm() / ref.norm())


def _examples(data, sp_model_path, cfg):
    from cogvlm.data.records import read_records
    from cogvlm.finetune import make_examples
    from cogvlm.tokenizer import Tokenizer

    records, _ = read_records(data["train"])
    return make_examples(records[:4], Tokenizer(sp_model_path), cfg, cfg.max_position_embeddings)[0][:4]


@pytest.fixture(scope="module")
def lora(data, base, tmp_path_factory) -> Path:
    """A LoRA adapter trained over the float base."""
    out = tmp_path_factory.mktemp("lora")
    return finetune(args(data, out, model=str(base), lora=True, lora_r=4, steps=6, train="vision_expert,language"))


def _chunk(config):
    g = torch.Generator().manual_seed(0)
    return layout_batch([PromptTokens(torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=g), [5, 6, 7, 8])], config)


def test_adapter_over_a_float_base_equals_the_merged_model(base, lora, tmp_path):
    merged = CogVLM.from_pretrained(merge_lora(base, lora, tmp_path / "merged"))
    applied = CogVLM.from_pretrained(base, adapter=lora)
    plain = CogVLM.from_pretrained(base)
    chunk = _chunk(applied.config)
    with torch.no_grad():
        got, want, before = applied.model(chunk), merged.model(chunk), plain.model(chunk)
    assert (got - before).abs().max() > 1e-3  # the adapter is really there
    assert (got - want).abs().max() <= 1e-4
    image = Path(__file__).resolve().parent.parent / "cogvlm" / "web_examples" / "shapes-0.png"
    flags = ["--image", str(image), "--query", "What is here?", "--max_new_tokens", "6", "--temperature", "0",
             "--device", "cpu"]
    cli = subprocess.run([sys.executable, "-m", "cogvlm", "chat", "--model", str(base), "--adapter", str(lora),
                          *flags], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert merged.chat(str(image), "What is here?", max_new_tokens=6, temperature=0)[0] in cli.stdout


def test_adapter_over_an_int4_base_gives_the_trained_models_greedy_tokens(qlora, base):
    """What QLoRA trained (the in-memory model) and `--adapter` over a fresh int4 load agree."""
    trained = CogVLM(qlora.base.eval(), qlora.tokenizer)
    loaded = CogVLM.from_pretrained(base, quant=4, group_size=GROUP, adapter=qlora.args.out / "final")
    images = Path(__file__).resolve().parent.parent / "cogvlm" / "web_examples"
    requests = [(str(images / "shapes-0.png"), "what color is it?", None),
                (str(images / "shapes-4.png"), "describe the picture", None)]
    with torch.no_grad():
        chunk = _chunk(loaded.config)
        assert (trained.model(chunk) - loaded.model(chunk)).abs().max() < 1e-2
    want = trained.generate(requests, max_new_tokens=8, temperature=0)
    assert loaded.generate(requests, max_new_tokens=8, temperature=0) == want


def _broken(adapter: Path, tmp_path: Path, how: str) -> Path:
    out = tmp_path / how
    out.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    if how == "names":
        config["target_modules"] = "^model\\.layers\\.\\d+\\.no_such_layer$"
    elif how == "shapes":
        name = next(iter(tensors))
        tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
    elif how == "extra":
        tensors["base_model.model.model.layers.0.mlp.nothing.lora_A.weight"] = torch.zeros(4, 64)
    elif how == "missing":
        tensors.pop(next(iter(tensors)))
    (out / "adapter_config.json").write_text(json.dumps(config))
    if how != "pickle":
        save_file(tensors, str(out / "adapter_model.safetensors"))
    else:
        torch.save(tensors, out / "adapter_model.bin")
    return out


@pytest.mark.parametrize("how, message", [
    ("names", "cannot apply the adapter in"), ("shapes", "cannot apply the adapter in"),
    ("extra", "does not fit this model: has unknown 1 tensor(s)"), ("missing", "does not fit this model: lacks 1"),
    ("pickle", "holds no adapter_model.safetensors"),
])
def test_a_bad_adapter_is_one_line_and_exit_2(base, lora, tmp_path, how, message, capsys):
    from cogvlm.cli import main

    bad = _broken(lora, tmp_path, how)
    code = main(["chat", "--model", str(base), "--adapter", str(bad), "--query", "hi", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("flag, message", [
    (["--tp", "2"], "--adapter does not combine with --tp yet (the ranks' split layers take no adapter): merge it "
                    "first (cogvlm merge-lora BASE ADAPTER OUT) and load OUT with --tp"),
    (["--compile"], "--adapter runs uncompiled: drop --compile, or merge it first (cogvlm merge-lora BASE ADAPTER "
                    "OUT) and load OUT with --compile"),
])
def test_adapter_with_tp_or_compile_is_one_line_and_exit_2(base, lora, flag, message, capsys):
    from cogvlm.cli import main

    code = main(["chat", "--model", str(base), "--adapter", str(lora), *flag, "--query", "hi", "--device", "cpu"])
    assert code == 2 and capsys.readouterr().err == f"cogvlm chat: error: {message}\n"


def test_frozen_weights_stay_bf16_and_only_trainables_get_fp32_masters(data, base, tmp_path):
    trainer = Trainer(args(data, tmp_path / "bf16", model=str(base), dtype="bf16", train="vision_expert", steps=1))
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("vision_expert" in n or "vision_mlp" in n for n in trainable)
    for name, p in trainer.model.named_parameters():
        assert p.dtype == (torch.float32 if name in trainable else torch.bfloat16), name
    # no fp32 copy of a frozen weight anywhere: the fp32 bytes the model holds are the masters'
    fp32 = sum(t.numel() for t in [*trainer.model.parameters(), *trainer.model.buffers()] if t.dtype == torch.float32)
    masters = sum(trainer.model.get_parameter(n).numel() for n in trainable)
    assert fp32 - masters <= sum(b.numel() for b in trainer.model.buffers())  # RoPE tables only
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {
        id(trainer.model.get_parameter(n)) for n in trainable}
    trainer.fit()
    assert all(p.dtype == torch.bfloat16 for p in trainer.model.parameters() if not p.requires_grad)


def test_routed_frozen_linears_give_autograds_gradients():
    """`route_frozen_linears` changes where the input gradient is computed (a layout fast on
    CPUs without native bf16), not what it is: the same outputs, the same gradients up to bf16
    summation order (1% of the norm), and no weight gradient."""
    from cogvlm.finetune import route_frozen_linears

    torch.manual_seed(0)
    plain = torch.nn.Linear(64, 96).to(torch.bfloat16).requires_grad_(False)
    routed = torch.nn.Linear(64, 96).to(torch.bfloat16).requires_grad_(False)
    routed.load_state_dict(plain.state_dict())
    route_frozen_linears(routed)
    x = torch.randn(3, 5, 64)
    outs, grads = [], []
    for m in (plain, routed):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(xi)
        (y.float() * torch.linspace(-1, 1, 96)).sum().backward()
        outs.append(y)
        grads.append(xi.grad)
    assert "forward" in vars(routed) and torch.equal(outs[0], outs[1])
    assert (grads[0] - grads[1]).norm() <= 0.01 * grads[0].norm()
    assert routed.weight.grad is None


def test_resume_keeps_frozen_weights_in_the_load_dtype(data, base, tmp_path):
    """A bf16 run stopped at step 2 and resumed from its (fp32) checkpoint: the frozen weights
    are still bf16 (streamed into the parameters, no fp32 model built), and the losses are
    exactly those of the uninterrupted run."""
    kw = dict(model=str(base), dtype="bf16", train="vision_expert", steps=4, save_every=2)
    whole = Trainer(args(data, tmp_path / "whole", **kw))
    whole.fit()
    stopped = Trainer(args(data, tmp_path / "stopped", **{**kw, "steps": 2}))
    stopped.fit()
    stopped.save(tmp_path / "stopped" / "checkpoints" / "step-0000002")  # what save_every writes mid-run
    resumed = Trainer(args(data, tmp_path / "stopped", resume=True, **kw))
    assert resumed.step == 2
    assert {p.dtype for p in resumed.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in resumed.model.parameters() if p.requires_grad} == {torch.float32}
    resumed.fit()
    assert _losses(tmp_path / "stopped") == _losses(tmp_path / "whole")


def test_auto_dtype_follows_the_checkpoint(data, base, tmp_path):
    bf16 = finetune(args(data, tmp_path / "b", model=str(base), train="adapter", steps=1, save_dtype="bf16"))
    assert Trainer(args(data, tmp_path / "c", model=str(bf16), steps=1)).dtype == torch.bfloat16
    assert Trainer(args(data, tmp_path / "d", model=str(base), steps=1)).dtype == torch.float32


@pytest.mark.parametrize("flags, message", [
    (["--quant", "4"], "--quant freezes the quantized weights: add --lora"),
    (["--quant", "4", "--lora", "--dtype", "fp32"], "a quantized base computes in bf16"),
    (["--quant", "3", "--lora"], "--quant takes 4 or 8, not 3"),
])
def test_qlora_mistakes_are_one_line(flags, message, data, base, tmp_path, capsys):
    from cogvlm.cli import main

    assert main(["finetune", "--data", str(data["train"]), "--out", str(tmp_path / "o"), "--model", str(base),
                 *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cogvlm finetune: error: {message}") and err.count("\n") == 1, err


def _plan(capsys, *flags: str) -> tuple[int, str]:
    from cogvlm.cli import main

    code = main(["plan", *flags])
    return code, capsys.readouterr().out


def test_finetune_plans_by_hand(capsys):
    """CogVLM-17B (h 4096, intermediate 11008, qkv 12288, 32 layers, vocab 32000), by hand.
    Activations per token per layer: (7 h + qkv + 4 i) x 2 B = 169,984 B; logits 14 B x 32000."""
    from cogvlm.config import REGISTRY
    from cogvlm.plan import weight_bytes

    config = REGISTRY["cogvlm-chat-v1.1"].config
    per_token = (7 * 4096 + 12288 + 4 * 11008) * 2
    logits = 2048 * 32000 * 14
    # QLoRA int4, rank 8 on both experts' 4 linears: 8 x (in + out) each, 32 layers
    lora = 32 * 2 * 8 * ((4096 + 12288) + (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096))
    code, out = _plan(capsys, "cogvlm-chat-v1.1", "--finetune", "lora", "--quant", "4", "--lora-r", "8",
                      "--batch-size", "1", "--max-length", "2048", "--grad-checkpointing", "--gpu-memory", "24GB")
    activations = 32 * 2048 * 4096 * 2 + 2 * 2048 * per_token + logits  # layer inputs + one layer twice
    weights = weight_bytes(config, quant_bits=4)["total"]
    runtime = (512 + 64 + 256) * 2**20  # CUDA context, cuBLAS workspaces, allocator slack (one GPU: no NCCL)
    dequantized = 32000 * 4096 * 2  # the output head in bf16, the largest packed layer
    total = weights + 16 * lora + activations + dequantized + runtime
    assert code == 0 and f"{lora:,} parameters" in out and f"{activations:,} bytes" in out
    assert f"dequantized      {dequantized:>14,} bytes" in out
    assert f"total          {total:>16,} bytes" in out and "fits in 23.69 GiB" in out  # a 24 GB card's CUDA figure
    assert lora == 35_782_656 and total < 19 * 2**30
    # full fine-tuning of the visual expert (q/k/v, dense, gate/up/down: 202,375,168 per layer), FSDP 4 x 80 GB
    expert = 32 * (4096 * 12288 + 4096 * 4096 + 3 * 4096 * 11008)
    code, out = _plan(capsys, "cogvlm-chat-v1.1", "--finetune", "full", "--fsdp", "4", "--max-length", "2048",
                      "--gpu-memory", "80GB")
    frozen = (weight_bytes(config)["total"] - 2 * expert) // 4
    gather = 2 * (expert // 32 * (2 + 4) + 2 * 4096 * 2)  # a layer: language bf16, expert fp32, two norms
    activations = 32 * 2048 * per_token + logits
    runtime = (512 + 64 + 512 + 256) * 2**20  # as above, with NCCL's buffers over 4 GPUs
    total = frozen + gather + 16 * expert // 4 + activations + runtime
    assert code == 0 and f"{expert:,} parameters" in out and f"{gather:,} bytes" in out
    assert f"total          {total:>16,} bytes" in out and "fits in 79.18 GiB" in out  # an 80 GB card's


@pytest.mark.parametrize("model", ["cogvlm-chat-v1.1", "cogvlm2-llama3-chat-19B"])
def test_qlora_of_the_big_models_fits_one_24gb_gpu(model, capsys):
    code, out = _plan(capsys, model, "--finetune", "lora", "--quant", "4", "--batch-size", "1", "--max-length",
                      "2048", "--grad-checkpointing", "--gpu-memory", "24GB")
    assert code == 0 and "fits in 23.69 GiB per GPU" in out
    code, out = _plan(capsys, model, "--finetune", "lora", "--batch-size", "1", "--max-length", "2048",
                      "--gpu-memory", "24GB")  # a bf16 base does not
    assert code == 1 and "does NOT fit" in out


@pytest.mark.parametrize("bits", [4, 8])
def test_large_layers_backward_in_row_chunks(bits, monkeypatch):
    """A packed layer larger than BACKWARD_CHUNK weights (CogVLM2's output head: 1 GB in bf16) gives
    its input gradient from its weight dequantized a row range at a time: the ranges are whole row
    blocks that cover the weight in order (their dequantized rows bit-identical to the whole
    weight's), and the summed gradient equals grad @ W in float64 to bf16 rounding, as the
    unchunked product does: each entry rounded once to bf16 (relative error <= 2^-9), so the error's
    norm is within 2^-8 of the gradient's."""
    import cogvlm.quantize as q

    torch.manual_seed(0)
    weight = torch.randn(256, 128) * 0.05
    layer = q.empty_quantized(torch.nn.Linear(128, 256, bias=False), bits, GROUP)
    q.fill(layer, q.quantize_tensors(weight, bits, GROUP))
    whole = layer.dequantize().clone()
    chunks = layer.row_chunks(64 * layer.width)
    assert len(chunks) == 4 and chunks[0][0] == 0 and chunks[-1][1] == len(whole)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert torch.equal(torch.cat([layer.dequantize(c).clone() for c in chunks]), whole)

    x = torch.randn(5, 128, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(5, 256, dtype=torch.bfloat16)
    want = (grad.double() @ whole[:256, :128].double()).float()
    got = {}
    for chunk in (64 * layer.width, q.BACKWARD_CHUNK):  # four row chunks, then one
        monkeypatch.setattr(q, "BACKWARD_CHUNK", chunk)
        x.grad = None
        layer(x).backward(grad)
        got[chunk] = x.grad.float()
        assert (got[chunk] - want).norm() <= 2**-8 * want.norm(), (chunk, (got[chunk] - want).norm() / want.norm())


def test_qlora_recomputes_activations_unless_told_not_to(tmp_path, capsys):
    """--quant turns gradient checkpointing on (QLoRA is for small cards, as peft's
    prepare_model_for_kbit_training does); --no-grad-checkpointing turns it off; float runs keep
    it off unless asked. `plan --finetune` assumes what finetune would do."""
    from cogvlm.cli.main import build_parser

    def asked(*flags: str) -> bool:
        ns = build_parser().parse_args(["finetune", "--data", str(tmp_path), "--out", str(tmp_path), *flags])
        a = TrainArgs(**{k: getattr(ns, k) for k in TrainArgs.__dataclass_fields__})
        return checkpointing(a.grad_checkpointing, a.quant)

    assert asked("--quant", "4") and asked("--quant", "8")
    assert not asked("--quant", "4", "--no-grad-checkpointing")
    assert not asked() and asked("--grad-checkpointing")
    for flags, said in ((["--quant", "4"], "on"), (["--quant", "4", "--no-grad-checkpointing"], "off"), ([], "off")):
        out = _plan(capsys, "cogvlm-chat-v1.1", "--finetune", "lora", *flags)[1]
        assert f"gradient checkpointing {said}" in out, (flags, out)
