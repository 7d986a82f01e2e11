"""Tensor parallelism when things go wrong (issue #36): commands that carry CPU tensors only, a
rank that fails mid-call ending every rank with a `TensorParallelError` that names it (never a
hang), and GPU problems found in one line before anything loads. Real processes over gloo."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist

from cogvlm import CogVLM
from cogvlm.cli import main
from cogvlm.tp import Driver
from tests.processes import free_port
from tests.test_caption import ENV, ROOT
from tests.test_server import client, data_url, scene, user
from tests.test_tp import IMAGE, healthy, on_two_ranks


class ClaimsGPU(torch.Tensor):
    """A CPU tensor that says it lives on cuda:0, as a GPU rank 0's tensors do; only `.to()`
    (what a conversion calls) gives back a plain tensor on the device asked for. Pickled as it
    is, it would reach the other ranks still claiming cuda:0."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", 0)

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        return self.as_subclass(torch.Tensor).to(*args, **kwargs)


def claim_gpu(obj: Any) -> Any:
    """Every tensor in a command argument (a `Chunk`'s fields too) as a `ClaimsGPU`."""
    if isinstance(obj, torch.Tensor):
        return obj.as_subclass(ClaimsGPU)
    if is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: claim_gpu(getattr(obj, f.name)) for f in fields(obj) if f.init})
    return obj


def tensors_in(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in tensors_in(x)]
    if is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in fields(obj) for t in tensors_in(getattr(obj, f.name))]
    return []


@pytest.fixture(scope="module")
def two_ranks(talkative: Path):
    yield from on_two_ranks(talkative)


def decode_apart(vlm: CogVLM) -> list[list[int]]:
    """Three requests decoded together whose rows end at steps 3, 7 and 12 (each ending drops
    its row from the cache: `keep_rows`)."""
    image = IMAGE.read_bytes()
    prompts = [vlm.prompt_tokens(image, "What is in the image?"), vlm.prompt_tokens(None, "Hi"),
               vlm.prompt_tokens(image, "Describe it in detail.")]
    decoder = vlm.decoder(prompts, [vlm.sampling(top_k=1, max_new_tokens=n) for n in (3, 7, 12)])
    for _ in decoder.run():
        pass
    return decoder.generated


@pytest.mark.slow
def test_rows_ending_apart_equal_one_process_and_commands_carry_cpu_tensors(two_ranks, talkative_vlm, monkeypatch):
    """Rows that end at different steps give the one-process answers, and every tensor a
    command broadcasts is a plain CPU tensor. On this CPU machine every tensor is on the CPU
    anyway, so the test makes that check able to fail: each command's tensor arguments are
    handed to the driver as `ClaimsGPU` tensors (they report cuda:0 as a GPU rank 0's would),
    and the spy on `broadcast_object_list` refuses any tensor that is not a plain tensor on the
    CPU. Only a driver that converts each argument (`.to("cpu")`) passes; one that pickles its
    arguments as given sends `ClaimsGPU`s, which the spy catches. The local call still runs on
    the original tensors (the driver's body), so the answers are unchanged."""
    sent: dict[str, int] = {}  # tensors checked, per op
    ops: set[str] = set()
    original_command, original_broadcast = Driver.command, dist.broadcast_object_list

    def command(self: Driver, op: str, *args: Any) -> Any:
        return original_command(self, op, *[claim_gpu(a) for a in args])

    def spy(objects: list, src: int = 0, **kwargs: Any) -> None:
        if dist.get_rank() == src and isinstance(objects[0], tuple) and len(objects[0]) == 4:
            _, op, _, args = objects[0]
            ops.add(op)
            for t in tensors_in(args):
                assert type(t) is torch.Tensor and t.device.type == "cpu", f"{op} sent {type(t).__name__} on {t.device}"
                sent[op] = sent.get(op, 0) + 1
        original_broadcast(objects, src=src, **kwargs)

    monkeypatch.setattr(Driver, "command", command)
    monkeypatch.setattr(dist, "broadcast_object_list", spy)
    assert decode_apart(two_ranks) == decode_apart(talkative_vlm)
    assert sent.get("forward") and sent.get("decode_step"), sent  # the checks ran
    assert "keep_rows" in ops  # rows left the batch (their indices travel as plain ints)


# Runs as one rank of a torchrun-style job (its environment says which); with FAIL_RANK == this
# rank it raises inside its third decode step, before that step's first collective.
RANK_SCRIPT = r"""
import os, sys
from cogvlm import CogVLM
from cogvlm.model import CogVLMForCausalLM
from cogvlm.options import LoadOptions
from cogvlm.tp import TensorParallelError

if os.environ["RANK"] == os.environ["FAIL_RANK"]:
    original, calls = CogVLMForCausalLM.decode_step, []

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return original(self, *args)

    CogVLMForCausalLM.decode_step = failing
vlm = CogVLM.load(LoadOptions(sys.argv[1], device="cpu", tp_timeout=3))  # ranks > 0 serve inside, then exit
try:
    vlm.generate([(None, "Hello", None), (None, "Hi there", None)], top_k=1, max_new_tokens=8)
except TensorParallelError as e:
    print(e)
    sys.exit(3)
print("no error")
"""


@pytest.mark.slow
@pytest.mark.parametrize("fail_rank", [0, 1])
def test_a_rank_that_fails_mid_call_ends_every_rank_naming_it(talkative, fail_rank):
    """Rank `fail_rank` raises inside a decode step while the other waits in that step's
    all-reduce: the wait gives up after --tp-timeout (3 s here), the ranks agree on what
    happened, rank 0 raises `TensorParallelError` naming the failed rank and its error, and the
    other rank exits non-zero. The ranks are started as torchrun would (no watchdog to help)."""
    port = free_port()
    env = {**ENV, "TORCHELASTIC_RUN_ID": "test", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "FAIL_RANK": str(fail_rank)}
    start = time.monotonic()
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(talkative)], cwd=ROOT,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        outputs = [p.communicate(timeout=60) for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
    elapsed = time.monotonic() - start
    (out0, err0), (_, err1) = outputs
    assert ranks[0].returncode == 3, err0
    assert out0.strip() == f"tensor-parallel rank {fail_rank} failed in decode_step: RuntimeError: injected failure"
    assert ranks[1].returncode == 1, err1
    assert elapsed < 30


@pytest.mark.slow
def test_the_server_answers_503_and_exits_when_a_rank_fails(talkative, tmp_path):
    """`cogvlm serve --tp 2`: the started rank fails in its 5th decode step (a sitecustomize
    that only that process acts on patches it); the request in flight gets a 503 naming the
    rank, and the server exits non-zero with one line."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    from cogvlm.model import CogVLMForCausalLM\n"
        "    original, calls = CogVLMForCausalLM.decode_step, []\n"
        "    def failing(self, *args):\n"
        "        calls.append(1)\n"
        "        if len(calls) == 5:\n"
        "            raise RuntimeError('injected failure')\n"
        "        return original(self, *args)\n"
        "    CogVLMForCausalLM.decode_step = failing\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    env = {**ENV, "PYTHONPATH": f"{inject}:{ENV['PYTHONPATH']}"}
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "cogvlm", "serve", "--model", str(talkative), "--tp", "2",
                                   "--tp-timeout", "3", "--device", "cpu", "--port", str(port),
                                   "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 240
        while not healthy(url):
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        with pytest.raises(Exception) as failed:
            client(url).with_options(max_retries=0).chat.completions.create(
                model=str(talkative), messages=[user("What is in the image?", data_url(scene(1)))], temperature=0,
                max_tokens=12)
        assert getattr(failed.value, "status_code", None) == 503, failed.value
        assert "tensor-parallel rank 1 failed in decode_step: RuntimeError: injected failure" in str(failed.value)
        code = server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert code == 2, log.read_text()
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith("cogvlm serve: error: tensor-parallel rank 1 failed in decode_step"), log.read_text()


# ---- GPU problems: one line, before anything loads or starts ------------------------------------

@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch):
    """Fake CUDA GPUs (`set(count, capability, name)`); starting a rank or planning memory fails
    the test, so an error seen proves the check came first."""
    import cogvlm.api
    import cogvlm.tp

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("got past the GPU checks")

    monkeypatch.setattr(cogvlm.tp.subprocess, "Popen", forbidden)
    monkeypatch.setattr(cogvlm.api, "check_fits", forbidden)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def set_gpus(count: int, capability: tuple[int, int], name: str) -> None:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capability)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda i=0: SimpleNamespace(name=name, total_memory=32 * 2**30))
    return set_gpus


def one_line_error(capsys: pytest.CaptureFixture, args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_tp_2_on_one_gpu_is_one_line(tiny_checkpoint, fake_gpus, capsys):
    fake_gpus(1, (9, 0), "NVIDIA H100 80GB HBM3")
    err = one_line_error(capsys, ["chat", "--model", str(tiny_checkpoint), "--tp", "2", "--device", "cuda",
                                  "--query", "hi"])
    assert err.startswith("cogvlm chat: error: tp=2 needs 2 GPUs; 1 are visible"), err


def test_bf16_and_quantized_on_sm70_are_one_line(tiny_checkpoint, fake_gpus, capsys):
    fake_gpus(2, (7, 0), "Tesla V100-SXM2-32GB")
    base = ["chat", "--model", str(tiny_checkpoint), "--device", "cuda", "--query", "hi"]
    err = one_line_error(capsys, [*base, "--tp", "2"])  # bf16, the CUDA default
    assert err == ("cogvlm chat: error: Tesla V100-SXM2-32GB (cuda:0) has compute capability 7.0; bfloat16 needs "
                   "8.0 or later: use --fp16\n")
    err = one_line_error(capsys, [*base, "--quant", "8"])
    assert "bfloat16 needs 8.0 or later: quantized models compute in bfloat16" in err
    err = one_line_error(capsys, [*base, "--quant", "4"])
    assert "int4 (tinygemm) needs 8.0 or later" in err
    with pytest.raises(AssertionError, match="got past the GPU checks"):  # fp16 runs there
        main([*base, "--fp16", "--tp", "2"])
