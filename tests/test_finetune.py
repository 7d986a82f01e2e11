"""The fine-tuning pipeline on a tiny model and a small synthetic data set."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cogvlm.checkpoint import load_model
from tests.configs import tiny_test_config
from cogvlm.data.synthetic import make_dataset
from cogvlm.finetune import TrainArgs, Trainer, finetune
from cogvlm.prompt import PromptTokens, layout_batch

IMAGE_SIZE = 56  # 4x4 patches: small enough for many steps in seconds


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    train = make_dataset(root / "train", n_images=40, seed=1, image_size=IMAGE_SIZE)
    held = make_dataset(root / "held", n_images=10, seed=2, image_size=IMAGE_SIZE)
    config = root / "config.json"
    cfg = tiny_test_config(vocab_size=400, template="vqa", vision={"image_size": IMAGE_SIZE})
    config.write_text(json.dumps(cfg.to_hf_dict()))
    return {"train": _jsonl(train), "held": _jsonl(held), "config": config}


def _jsonl(path: Path) -> Path:
    return path if path.suffix == ".jsonl" else path / "data.jsonl"


def args(data, sp_model_path, out, **kw) -> TrainArgs:
    base = dict(data=data["train"], out=out, init_config=data["config"], tokenizer=sp_model_path, train="all",
                steps=12, batch_size=4, lr=3e-3, warmup=2, progress=False, seed=0)
    base.update(kw)
    return TrainArgs(**base)


def losses(out: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (out / "log.jsonl").read_text().splitlines()]


def test_labels_sit_on_the_token_before_each_answer_token(tiny_config):
    from cogvlm.finetune import Example, collate

    image = Path(__file__).resolve().parent.parent / "cogvlm" / "web_examples" / "shapes-0.png"
    caption = Example(image, [], [40, 41, 2], 1)  # empty prompt: eoi predicts the first answer token
    vqa = Example(image, [7, 8, 9, 10, 11], [42, 2], 2)
    chunk, labels = collate([caption, vqa], tiny_config)
    eoi = 1 + tiny_config.image_tokens - 1
    assert labels[0].tolist().count(-100) == labels.shape[1] - 3
    assert labels[0, eoi].item() == 40 and labels[0, -3:-1].tolist() == [41, 2]
    assert not chunk.attention_mask[0, eoi + 1:-3].any()  # padding between eoi and the answer
    assert labels[1, -3:-1].tolist() == [42, 2] and labels[1, -1].item() == -100


def test_example_averaging_weighs_each_answer_the_same(tiny_config):
    """'token': the sum of per-token losses over all answer tokens; 'example': each row's
    own mean, summed, and the units are rows. Checked against log-softmax by hand."""
    from cogvlm.finetune import Example, collate, loss_fn
    from cogvlm.model import CogVLMForCausalLM

    torch.manual_seed(0)
    model = CogVLMForCausalLM(tiny_config).eval()
    image = Path(__file__).resolve().parent.parent / "cogvlm" / "web_examples" / "shapes-0.png"
    long_answer = Example(image, [7, 8], [40, 41, 42, 43, 44, 45, 2], 1)
    short_answer = Example(None, [7, 8, 9], [46, 2], 2)
    chunk, labels = collate([long_answer, short_answer], tiny_config)
    with torch.no_grad():
        logp = model(chunk).log_softmax(-1)
    answer = labels != -100
    nll = -logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0] * answer
    by_token, tokens = loss_fn(model, chunk, labels, "token")
    by_example, rows = loss_fn(model, chunk, labels, "example")
    assert (tokens, rows) == (9, 2)
    assert torch.allclose(by_token, nll.sum(), rtol=1e-5)
    assert torch.allclose(by_example, (nll.sum(1) / answer.sum(1)).sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="loss average must be one of"):
        loss_fn(model, chunk, labels, "sentence")


def test_logits_at_labelled_positions_are_the_full_logits_there(tiny_config):
    """`forward(at=mask)` runs the head only where the mask is true, in row-major order: the
    same values as the full logits at those positions (the head's product over fewer rows may
    block differently: fp32 rounding, 1e-5)."""
    from cogvlm.finetune import Example, collate
    from cogvlm.model import CogVLMForCausalLM

    torch.manual_seed(0)
    model = CogVLMForCausalLM(tiny_config).eval()
    image = Path(__file__).resolve().parent.parent / "cogvlm" / "web_examples" / "shapes-0.png"
    chunk, labels = collate([Example(image, [7, 8], [40, 41, 2], 1), Example(None, [7, 8, 9], [46, 2], 2)],
                            tiny_config)
    at = labels != -100
    with torch.no_grad():
        full, some = model(chunk), model(chunk, at=at)
    assert some.shape == (5, tiny_config.vocab_size)
    torch.testing.assert_close(some, full[at], rtol=1e-5, atol=1e-5)


def test_init_gives_each_patch_position_features_as_large_as_its_content():
    from cogvlm.finetune import init_weights
    from cogvlm.model import CogVLMForCausalLM

    cfg = tiny_test_config(vision={"image_size": 56})  # a 4 x 4 patch grid
    model = CogVLMForCausalLM(cfg)
    init_weights(model)
    emb = model.model.vision.patch_embedding
    pos = emb.position_embedding.weight.detach()
    assert not pos[0].any()  # CLS
    quarter = cfg.vision.hidden_size // 4
    for index, (row, col) in [(1, (0, 0)), (1 + 4 * 2 + 3, (2, 3)), (16, (3, 3))]:
        f = 10000.0 ** (-torch.arange(quarter) / quarter)
        want = torch.cat([(row * f).sin(), (row * f).cos(), (col * f).sin(), (col * f).cos()])
        assert torch.allclose(pos[index], want, atol=1e-6)
    assert len({tuple(r.tolist()) for r in pos}) == pos.shape[0]  # every patch tells where it is
    with torch.no_grad():
        content = emb.proj(torch.randn(2, 3, 56, 56)).flatten(2).transpose(1, 2)
    ratio = pos[1:].pow(2).mean().sqrt() / content.pow(2).mean().sqrt()
    assert 0.3 < ratio < 3, ratio  # not buried under the patch vectors (std 0.02 gave ~0.02)


def test_short_training_lowers_held_out_loss(data, sp_model_path, tmp_path):
    a = args(data, sp_model_path, tmp_path / "run", eval_data=data["held"], steps=40, eval_every=40)
    trainer = Trainer(a)
    before = trainer.evaluate()
    trainer.fit()
    log = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["eval_loss"] < 0.8 * before
    assert log[-1]["loss"] < log[0]["loss"]
    final, _ = load_model(tmp_path / "run" / "final")  # a checkpoint CogVLM.from_pretrained loads
    assert (tmp_path / "run" / "final" / "tokenizer.model").is_file()
    inner = trainer.inner.state_dict()
    assert all(torch.equal(v, inner[k]) for k, v in final.state_dict().items())
    # final/ is a model to use: its config names the dtype it holds, and no optimizer state rides along
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["torch_dtype"] == "float32"
    assert not (tmp_path / "run" / "final" / "trainer_state.pt").exists()


def test_the_next_steps_batches_are_made_while_a_step_trains(data, sp_model_path, tmp_path):
    """After each step the next one's micro-batches are already being collated (images decoded,
    pixels made) in a background thread; they are bit for bit what the step would have made
    itself, and after the last step nothing is made ahead."""
    trainer = Trainer(args(data, sp_model_path, tmp_path / "run", steps=2, grad_accum=2))
    trainer.train_step()
    step, ahead = trainer._ahead
    assert step == 1
    for (chunk, labels), (want_chunk, want_labels) in zip(ahead.result(), trainer._batches(1), strict=True):
        assert torch.equal(labels, want_labels) and torch.equal(chunk.input_ids, want_chunk.input_ids)
        assert torch.equal(chunk.images, want_chunk.images)
    trainer.train_step()
    assert trainer._ahead is None


def _cli(a: TrainArgs) -> list[str]:
    cmd = [sys.executable, "-m", "cogvlm", "finetune", "--no-progress"]
    for k, v in vars(a).items():
        if v is None or isinstance(v, bool):
            continue
        cmd += ["--" + k.replace("_", "-"), str(v)]
    return cmd


@pytest.mark.slow
def test_resume_after_a_kill_continues_exactly(data, sp_model_path, tmp_path):
    full = args(data, sp_model_path, tmp_path / "full", steps=10)
    finetune(full)
    stopped = args(data, sp_model_path, tmp_path / "stopped", steps=10, save_every=4)
    proc = subprocess.Popen(_cli(stopped), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = tmp_path / "stopped" / "checkpoints" / "step-0000004"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), proc.stderr.read().decode()
    assert len(losses(tmp_path / "stopped")) < 10  # it really stopped early
    out = subprocess.run(_cli(stopped) + ["--resume"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "resumed from" in out.stdout
    assert losses(tmp_path / "stopped") == losses(tmp_path / "full")


def test_lora_merged_equals_lora_applied(data, sp_model_path, tmp_path):
    base = finetune(args(data, sp_model_path, tmp_path / "base", steps=3))
    lora = args(data, sp_model_path, tmp_path / "lora", steps=6, lr=1e-2, lora=True, lora_r=4,
                train="vision_expert,language", init_config=None, model=str(base))
    trainer = Trainer(lora)
    trainer.fit()
    adapter = tmp_path / "lora" / "final"
    assert (adapter / "adapter_config.json").is_file()
    out = subprocess.run([sys.executable, "-m", "cogvlm", "merge-lora", str(base), str(adapter),
                          str(tmp_path / "merged")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    merged, _ = load_model(tmp_path / "merged")
    plain, _ = load_model(base)
    g = torch.Generator().manual_seed(0)
    chunk = layout_batch([PromptTokens(torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=g), [5, 6, 7, 8])], merged.config)
    trainer.model.eval()
    with torch.no_grad():
        applied, got, before = trainer.model(chunk), merged(chunk), plain(chunk)
    assert (applied - before).abs().max() > 1e-3  # the adapter really changed the model
    assert (applied - got).abs().max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_process_torchrun_matches_one_process(data, sp_model_path, tmp_path, sharding):
    one = args(data, sp_model_path, tmp_path / "one", steps=5, batch_size=4)
    finetune(one)
    two = args(data, sp_model_path, tmp_path / "two", steps=5, batch_size=2, fsdp=sharding == "fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cogvlm"] + _cli(two)[3:] + (["--fsdp"] if two.fsdp else [])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "on 2 process(es)" in out.stdout
    if sharding == "ddp":  # replicas must agree; FSDP holds one copy, in shards
        assert "weights identical on all 2 ranks" in out.stdout
    merged, _ = load_model(tmp_path / "two" / "final")  # sharded or not, one full checkpoint
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in load_model(tmp_path / "one" / "final")[0].parameters())
    # Same global batch (2 ranks x 2 = 1 x 4), so the same losses up to summation order. Adam's
    # early updates are ~lr * sign(grad), which turns rounding noise in near-zero gradients into
    # lr-sized steps, so only the first steps can be held to 1e-4; later ones drift slowly.
    two_losses, one_losses = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert two_losses[:3] == pytest.approx(one_losses[:3], rel=1e-4)
    assert two_losses == pytest.approx(one_losses, rel=1e-2)


def test_bad_records_are_reported_with_line_numbers(data, sp_model_path, tmp_path):
    lines = data["train"].read_text().splitlines()[:6]
    lines.insert(1, "{not json")
    lines.insert(3, json.dumps({"image": "images/missing.png", "template": "vqa",
                                "turns": [{"query": "q", "answer": "a"}]}))
    bad = data["train"].parent / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    out = subprocess.run(_cli(args({**data, "train": bad}, sp_model_path, tmp_path / "bad", steps=1)),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"{bad}:2: skipped:" in out.stdout and f"{bad}:4: skipped:" in out.stdout
    assert "2 skipped" in out.stdout


def test_cli_offers_the_loss_averages_and_rejects_others(capsys):
    from cogvlm.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["finetune", "--help"])
    assert stop.value.code == 0 and "--loss-average {token,example}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main(["finetune", "--data", "d.jsonl", "--out", "o", "--loss-average", "sentence"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert "argument --loss-average: invalid choice: 'sentence'" in err and "Traceback" not in err


@pytest.mark.parametrize("flags, message", [
    ([], "give exactly one of --model (start from weights) or --init-config (random start)"),
    (["--init-config", "CONFIG"], "--init-config needs --tokenizer PATH"),
])
def test_finetune_user_mistakes_give_one_line_and_exit_2(flags, message, data, tmp_path, capsys):
    from cogvlm.cli import main

    flags = [str(data["config"]) if f == "CONFIG" else f for f in flags]
    assert main(["finetune", "--data", str(data["train"]), "--out", str(tmp_path / "out"), *flags]) == 2
    assert capsys.readouterr().err == f"cogvlm finetune: error: {message}\n"


MAPPED_AFTER_A_STEP = r"""
import ctypes, sys
import torch
from cogvlm.finetune import return_freed_blocks
if sys.argv[1] == "fixed":
    assert return_freed_blocks()
libc = ctypes.CDLL(None)
class MallInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = MallInfo
torch.ones(16 << 20, dtype=torch.uint8)  # a step's activation freed: left alone, glibc's mmap threshold rises to it
mapped = libc.mallinfo2().hblkhd
x = torch.ones(1 << 20, dtype=torch.uint8)  # the next step's activation
print((libc.mallinfo2().hblkhd - mapped) >> 10)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_freed_activations_go_back_to_the_os() -> None:
    """What `cogvlm finetune` sets: a block of 128 KiB or more is a mapping of its own (glibc
    unmaps it when freed) even after larger blocks were freed; left alone, glibc serves it from a
    heap that keeps what is freed, and a run's peak grows step by step."""
    mapped_kib = {mode: int(subprocess.run([sys.executable, "-c", MAPPED_AFTER_A_STEP, mode], capture_output=True,
                                           text=True, check=True).stdout) for mode in ("default", "fixed")}
    assert mapped_kib["default"] == 0, mapped_kib  # the problem is real here: the 1 MiB block came from the heap
    assert mapped_kib["fixed"] >= 1024, mapped_kib
