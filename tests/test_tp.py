"""Tensor parallelism on CPU with gloo: real processes, real checkpoints in both layouts.

Each rank's slices are checked bit-for-bit against the authors' split (sat-names.md, written out
independently in tests.test_checkpoint.rank_slice); the split model's logits against the
single-process model's within 1e-5 in fp32 (a row-split layer sums two partial dot products where
one process sums one: a reordered fp32 sum of O(1) terms moves them by ~1e-6); greedy answers
token for token through every API entry, the chat CLI and the OpenAI server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import torch

from cogvlm import CogVLM
from cogvlm.checkpoint import iter_tensors, load_model, save_hf
from cogvlm.prompt import PromptTokens, layout_batch
from cogvlm.sharding import Split, check_split, merge_ranks, rank_shape, split_rule, take_rank
from cogvlm.tp import TensorParallelError
from tests.configs import tiny_test_config
from tests.conftest import tiny_cogvlm2_config
from tests.processes import free_port
from tests.test_caption import ENV, ROOT
from tests.test_checkpoint import rank_slice, write_sat
from tests.test_server import client, data_url, scene, user

GREEDY = {"top_k": 1, "max_new_tokens": 10}
IMAGE = ROOT / "cogvlm" / "web_examples" / "shapes-0.png"


def rank_parts(folder: Path, rank: int, world: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for group in iter_tensors(folder, rank=rank, world=world):
        out.update(group)
    return out


# ---- slicing and per-rank reading (one process) -------------------------------------------------

def test_every_rank_reads_its_slices_from_safetensors(tiny_model, tmp_path):
    folder = save_hf(tiny_model.state_dict(), tiny_model.config, tmp_path / "hf", max_shard_bytes=60_000)
    for world in (2, 4):
        for rank in range(world):
            got = rank_parts(folder, rank, world)
            assert got.keys() == tiny_model.state_dict().keys()
            for name, full in tiny_model.state_dict().items():
                assert torch.equal(got[name], rank_slice(name, full, rank, world)), (name, rank, world)


def test_take_rank_inverts_merge_ranks(tiny_model):
    for name, full in tiny_model.state_dict().items():
        rule = split_rule(name)
        parts = [take_rank(full, rule, r, 4) for r in range(4)]
        assert torch.equal(merge_ranks(parts, rule), full), name
        assert all(p.shape == rank_shape(name, full.shape, 4) for p in parts), name  # what plan and tp count


def test_sat_ranks_load_straight_from_their_own_file(tiny_model, tmp_path):
    """With as many mp_rank files as ranks, rank 1 reads mp_rank_01 only: it loads even when
    mp_rank_00 is garbage. Other counts are merged and re-sliced."""
    write_sat(tmp_path / "sat2", tiny_model, world=2)
    write_sat(tmp_path / "sat4", tiny_model, world=4)
    for rank in range(2):
        got = rank_parts(tmp_path / "sat4", rank, 2)
        for name, full in tiny_model.state_dict().items():
            assert torch.equal(got[name], rank_slice(name, full, rank, 2)), (name, rank)
    (tmp_path / "sat2" / "1000" / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
    got = rank_parts(tmp_path / "sat2", 1, 2)
    for name, full in tiny_model.state_dict().items():
        assert torch.equal(got[name], rank_slice(name, full, 1, 2)), name


def test_split_must_divide_every_width(bpe_tokenizer_path):
    check_split(tiny_test_config(vocab_size=400), 4)
    with pytest.raises(TensorParallelError, match=r"over 3 ranks .*attention heads 4.*possible rank counts: 1, 2, 4$"):
        check_split(tiny_test_config(vocab_size=400), 3)
    gqa = tiny_cogvlm2_config(bpe_tokenizer_path)  # 4 query heads on 2 KV heads
    check_split(gqa, 2)
    with pytest.raises(TensorParallelError, match=r"^cannot split this model over 4 ranks \(KV heads 2 do not divide\); "
                                                  r"possible rank counts: 1, 2$"):
        check_split(gqa, 4)


def count_split_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The world of every `check_split` call in this process from now on, through whichever
    cogvlm module made it (each binds the function under its own name)."""
    import cogvlm.sharding

    original, calls = cogvlm.sharding.check_split, []

    def spy(config, world: int) -> None:
        calls.append(world)
        original(config, world)

    for name, module in list(sys.modules.items()):
        if name.startswith("cogvlm") and getattr(module, "check_split", None) is original:
            monkeypatch.setattr(module, "check_split", spy)
    return calls


def test_a_cuda_load_checks_the_split_once(tiny_checkpoint, monkeypatch):
    """The plan before a CUDA load (its weight count, and the quantized rank it builds on the
    meta device) and `load_parallel` trust the load's one check. Two 80 GB cards are faked;
    the load stops at the GPU count, before any process starts."""
    from types import SimpleNamespace

    calls = count_split_checks(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(TensorParallelError, match="tp=2 needs 2 GPUs; 1 are visible"):
        CogVLM.from_pretrained(tiny_checkpoint, device="cuda", tp=2, quant=8)
    assert calls == [2]


def gqa_slice(name: str, t: torch.Tensor, rank: int, world: int, config) -> torch.Tensor:
    """Rank `rank`'s part under grouped-query attention, written out from docs/spec/cogvlm2.md section 4:
    the decoder's QKV rows are [q: H heads | k: H_kv | v: H_kv]; a rank takes its 1/N of each."""
    if ".self_attn." not in name or "query_key_value" not in name:
        return rank_slice(name, t, rank, world)
    hd = config.head_dim
    q, k, v = t.split([config.num_heads * hd, config.num_key_value_heads * hd, config.num_key_value_heads * hd])
    return torch.cat([q.chunk(world)[rank], k.chunk(world)[rank], v.chunk(world)[rank]])


def test_gqa_ranks_read_their_query_and_kv_heads(cogvlm2_model, tmp_path):
    """Each rank reads its query heads and the KV heads they share, from both experts' QKV
    weights and the vision expert's QKV bias; merging the parts gives the tensor back."""
    config = cogvlm2_model.config
    state = cogvlm2_model.state_dict()
    assert state["model.layers.0.self_attn.vision_expert_query_key_value.bias"].shape == (config.qkv_size,)
    folder = save_hf(state, config, tmp_path / "hf", max_shard_bytes=60_000)
    for rank in range(2):
        got = rank_parts(folder, rank, 2)
        for name, full in state.items():
            if name.endswith("inv_freq"):
                continue  # derived buffers are not read
            assert torch.equal(got[name], gqa_slice(name, full, rank, 2, config)), (name, rank)
    qkv = "model.layers.1.self_attn.vision_expert_query_key_value.weight"
    assert got[qkv].shape == ((config.num_heads + 2 * config.num_key_value_heads) // 2 * config.head_dim,
                              config.hidden_size)
    for name, full in state.items():
        parts = [Split(config, r, 2).take(name, full) for r in range(2)]
        assert torch.equal(Split(config, 0, 2).merge(name, parts), full), name


# ---- two processes through the Python API --------------------------------------------------------

@pytest.fixture(scope="module")
def sat2(talkative: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The talkative checkpoint as the authors ship theirs: SAT, two model-parallel ranks."""
    model, _ = load_model(talkative)
    out = tmp_path_factory.mktemp("sat") / "mp2"
    write_sat(out, model, world=2)
    shutil.copy(talkative / "tokenizer.model", out / "tokenizer.model")
    return out


def on_two_ranks(folder: Path) -> Iterator[CogVLM]:
    """`folder` loaded with tp=2 on this process and one it starts; at teardown the other rank
    must stop cleanly."""
    vlm = CogVLM.from_pretrained(folder, device="cpu", tp=2)
    yield vlm
    procs = vlm.model.driver.procs
    vlm.close()
    assert [p.poll() for p in procs] == [0], "the other rank did not stop cleanly"


@pytest.fixture(scope="module")
def split(sat2: Path):
    """The SAT 2-rank checkpoint on two processes (this one and one it starts), no merge."""
    yield from on_two_ranks(sat2)


@pytest.mark.slow
def test_a_two_rank_load_checks_the_split_once(tiny_checkpoint, monkeypatch):
    """Rank 0 checks the split once; `load_parallel` and its `ParallelCogVLM` trust it (the
    other rank, started after the check, does not check at all)."""
    calls = count_split_checks(monkeypatch)
    vlm = CogVLM.from_pretrained(tiny_checkpoint, device="cpu", tp=2)
    vlm.close()
    assert calls == [2]


def mixed_batch(config):
    """An image row and a shorter text-only row: padding in both the image span and the text."""
    g = torch.Generator().manual_seed(0)
    size = config.vision.image_size
    return layout_batch([PromptTokens(torch.randn(3, size, size, generator=g), [5, 6, 7, 8]),
                         PromptTokens(None, [9, 10])], config)


def assert_same_logits(one, two, chunk) -> None:
    """Every position of a prefill, then a cached prefill and 3 decode steps, within 1e-5."""
    with torch.no_grad():
        torch.testing.assert_close(two(chunk), one(chunk), rtol=1e-5, atol=1e-5)  # every position
        rows = chunk.input_ids.shape[0]
        cache1, cache2 = one.new_cache(rows, 64), two.new_cache(rows, 64)
        assert cache2.k[0].shape[1] == one.config.num_key_value_heads // 2  # the KV cache is split by heads
        first1, first2 = one(chunk, cache1, last_only=True), two(chunk, cache2, last_only=True)
        torch.testing.assert_close(first2, first1, rtol=1e-5, atol=1e-5)
        tokens, positions = first1.argmax(-1), chunk.position_ids[:, -1] + 1
        for _ in range(3):
            step1 = one.decode_step(tokens, positions, cache1)
            step2 = two.decode_step(tokens, positions, cache2)
            torch.testing.assert_close(step2, step1, rtol=1e-5, atol=1e-5)
            tokens, positions = step1.argmax(-1), positions + 1


@pytest.mark.slow
def test_prefill_and_decode_logits_equal_one_process(split, talkative_vlm):
    chunk = mixed_batch(talkative_vlm.config)
    assert chunk.attention_mask is not None and not chunk.attention_mask.all()
    assert_same_logits(talkative_vlm.model, split.model, chunk)


@pytest.mark.slow
def test_greedy_answers_equal_one_process(split, talkative_vlm):
    image = IMAGE.read_bytes()
    for vlm in (split, talkative_vlm):
        assert vlm.chat(image, "What is in the image?", **GREEDY)[0]
    want = talkative_vlm.chat(image, "What is in the image?", **GREEDY)[0]
    assert split.chat(image, "What is in the image?", **GREEDY)[0] == want
    assert "".join(split.stream(image, "What is in the image?", **GREEDY)) == want
    requests = [(image, "What is in the image?", None), (None, "Hello", None), (image, "Describe it.", [("a", "b")])]
    assert split.generate(requests, **GREEDY) == talkative_vlm.generate(requests, **GREEDY)
    answers = []
    for vlm in (split, talkative_vlm):
        session = vlm.session(image, **GREEDY)
        answers.append([session.ask(q) for q in ("What is in the image?", "And the colour?", "Why?")])
        session.clear()
        answers[-1].append(session.ask("Again?"))
    assert answers[0] == answers[1]


@pytest.mark.slow
def test_joined_batches_and_dropped_rows_equal_one_process(split, talkative_vlm):
    """The server's continuous batching: rows end at different steps (dropped from the cache on
    every rank) and a second batch joins mid-way (the caches are concatenated on every rank)."""
    image = IMAGE.read_bytes()

    def run(vlm: CogVLM) -> list[list[int]]:
        prompts = [vlm.prompt_tokens(image, "What is in the image?"), vlm.prompt_tokens(None, "Hi")]
        first = vlm.decoder(prompts, [vlm.sampling(top_k=1, max_new_tokens=n) for n in (3, 9)])
        for _ in range(2):
            first.step()
        later = vlm.decoder([vlm.prompt_tokens(image, "Colour?")], [vlm.sampling(top_k=1, max_new_tokens=6)])
        first.join(later)
        while not first.done:
            first.step()
        return first.generated

    assert run(split) == run(talkative_vlm)


# ---- two processes through the commands ----------------------------------------------------------

@pytest.mark.slow
def test_chat_command_answers_as_one_process(talkative, talkative_vlm):
    query = "What is in the image?"
    out = subprocess.run([sys.executable, "-m", "cogvlm", "chat", "--model", str(talkative), "--tp", "2",
                          "--device", "cpu", "--image", str(IMAGE), "--query", query, "--json",
                          "--max_new_tokens", "10", "--no-draw"],
                         capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1, out.stdout  # the other rank prints nothing
    want = talkative_vlm.session(IMAGE.read_bytes()).ask(query, max_new_tokens=10)
    assert json.loads(lines[0])["answer"] == want


@pytest.mark.slow
def test_server_answers_as_one_process_and_exits_when_a_rank_dies(talkative, talkative_vlm, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "cogvlm", "serve", "--model", str(talkative), "--tp", "2",
                                   "--device", "cpu", "--port", str(port), "--log-level", "warning"],
                                  stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=ENV)
    try:
        deadline = time.monotonic() + 240
        while not healthy(url):
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        image = scene(1)
        reply = client(url).chat.completions.create(
            model=str(talkative), messages=[user("What is in the image?", data_url(image))], temperature=0,
            max_tokens=12)
        want = talkative_vlm.chat(image, "What is in the image?", top_k=1, max_new_tokens=12)[0]
        assert reply.choices[0].message.content == want
        # three requests of different lengths at once: decoded in one batch whose rows end at
        # different steps (each end compacts the ranks' caches), each answered as one process would
        asks = [(scene(2), "Describe the image.", 3), (None, "Hi there", 7), (scene(3), "What shapes are there?", 12)]

        def ask(job: tuple) -> str:
            img, query, n = job
            content = [user(query, data_url(img))] if img is not None else [{"role": "user", "content": query}]
            return client(url).chat.completions.create(model=str(talkative), messages=content, temperature=0,
                                                       max_tokens=n).choices[0].message.content

        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(ask, asks))
        assert got == [talkative_vlm.chat(img, q, top_k=1, max_new_tokens=n)[0] for img, q, n in asks]
        [worker] = [int(c) for task in Path(f"/proc/{server.pid}/task").iterdir()
                    for c in (task / "children").read_text().split()]
        os.kill(worker, signal.SIGKILL)
        start = time.monotonic()
        code = server.wait(timeout=30)
        assert time.monotonic() - start < 10, "rank 0 did not stop within 10 s of its peer's death"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert code != 0
    assert "tensor-parallel rank 1" in log.read_text() and "signal 9" in log.read_text(), log.read_text()


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


# ---- cogvlm plan ---------------------------------------------------------------------------------

def replicated_params(cfg) -> int:
    """What every rank holds whole (sat-names.md): adapter, norms, patch / CLS / position
    embeddings, boi / eoi, and the biases added after a row-split layer (ViT dense and fc2)."""
    v, h, i = cfg.vision, cfg.hidden_size, cfg.intermediate_size
    adapter = v.hidden_size * h + 2 * h + 3 * h * i
    vit = (v.hidden_size * 3 * v.patch_size ** 2 + v.hidden_size + v.hidden_size + v.num_positions * v.hidden_size
           + v.num_layers * (4 * v.hidden_size + 2 * v.hidden_size))
    conv = v.hidden_size ** 2 * v.downsample ** 2 + v.hidden_size if v.downsample > 1 else 0  # CogVLM2's 2x2 merge
    return adapter + vit + conv + (2 * cfg.num_layers + 1) * h + 2 * h


def test_plan_counts_each_ranks_weights_from_the_shapes():
    from cogvlm.config import REGISTRY
    from cogvlm.plan import plan, usable_memory

    cfg = REGISTRY["cogvlm-chat-v1.1"].config
    one = plan(cfg, tp=1, dtype=torch.bfloat16, batch=1, max_length=2048)
    assert one.weights == 35_279_370_752 == 17_639_685_376 * 2
    rep = replicated_params(cfg)
    two = plan(cfg, tp=2, dtype=torch.bfloat16, batch=1, max_length=2048)
    assert two.weights == 2 * ((17_639_685_376 - rep) // 2 + rep) == 17_786_505_984
    assert two.kv_cache == 2 * 32 * 2048 * 2048 * 2 + 2048  # 16 of 32 heads per rank, and the slot mask
    card = {size: usable_memory(size)[0] for size in ("24GB", "80GB")}
    assert two.fits(card["24GB"]) and not one.fits(card["24GB"]) and one.fits(card["80GB"])


def test_plan_splits_cogvlm2_by_query_and_kv_heads(capsys):
    from cogvlm.cli import main
    from cogvlm.config import REGISTRY
    from cogvlm.plan import plan

    cfg = REGISTRY["cogvlm2-llama3-chat-19B"].config
    rep = replicated_params(cfg)
    rope = 32 * 64 * 2  # each layer's stored bf16 inv_freq, whole on every rank
    two = plan(cfg, tp=2, dtype=torch.bfloat16, batch=1, max_length=8192)
    assert two.weights == 2 * ((19_503_105_280 - rep) // 2 + rep) + rope == 19_717_991_168
    assert two.kv_cache == 2 * 32 * 8192 * (8 // 2) * 128 * 2 + 8192  # 4 of the 8 KV heads per rank
    assert main(["plan", "cogvlm2-llama3-chat-19B", "--tp", "2"]) == 0  # by default its 8K context
    out = capsys.readouterr().out
    assert f"weights      {two.weights:>16,} bytes" in out and "max length 8192" in out
    assert f"KV cache     {two.kv_cache:>16,} bytes" in out
    assert main(["plan", "cogvlm2-llama3-chat-19B", "--tp", "16"]) == 2
    assert "(KV heads 8 do not divide); possible rank counts: 1, 2, 4, 8" in capsys.readouterr().err


def test_plan_command_says_what_fits(capsys):
    from cogvlm.cli import main

    assert main(["plan", "cogvlm-chat-v1.1", "--tp", "2", "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "17,786,505,984 bytes" in out and "fits in 23.69 GiB" in out  # a 24 GB card offers CUDA 23.69 GiB
    assert main(["plan", "cogvlm-chat-v1.1", "--gpu-memory", "24GB"]) == 1
    assert "does NOT fit" in (out := capsys.readouterr().out) and "--tp 2 (2 GPUs" in out
    assert main(["plan", "cogvlm-chat-v1.1", "--tp", "3"]) == 2
    assert "possible rank counts: 1, 2, 4" in capsys.readouterr().err
    assert main(["plan", "no-such-model"]) == 2


def test_plan_counts_what_a_rank_builds(bpe_tokenizer_path):
    from cogvlm.plan import rank_weight_bytes
    from cogvlm.tp import ParallelCogVLM

    for cfg, world in [(tiny_test_config(vocab_size=400), w) for w in (1, 2, 4)] + [
            (tiny_test_config(vocab_size=400, template="inst", cross_vision={}), 2),
            (tiny_cogvlm2_config(bpe_tokenizer_path), 2)]:
        with torch.device("meta"):
            rank = ParallelCogVLM(cfg, world - 1, world)
        assert rank_weight_bytes(cfg, world, torch.float32) == sum(t.numel() * 4 for t in rank.state_dict().values())


def test_a_split_that_does_not_divide_is_one_line_before_any_process_starts(capsys):
    from cogvlm.cli import main

    assert main(["chat", "--tp", "3", "--device", "cpu", "--query", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cogvlm chat: error: cannot split this model over 3 ranks") and err.count("\n") == 1


COGAGENT_CHECK = r"""
import sys, torch
from cogvlm.checkpoint import load_model
from cogvlm.prompt import PromptTokens, layout_batch
from cogvlm.tp import load_parallel
from tests.test_cogagent import HIGH, LOW
one, _ = load_model(sys.argv[1])
two, _ = load_parallel(sys.argv[1], 2, torch.float32, torch.device("cpu"), prepack=True)
g = torch.Generator().manual_seed(0)
chunk = layout_batch([PromptTokens(torch.randn(3, LOW, LOW, generator=g), [5, 6, 7], torch.randn(3, HIGH, HIGH, generator=g))], one.config)
worst = 0.0
with torch.no_grad():
    c1, c2 = one.new_cache(1, 64), two.new_cache(1, 64)
    l1, l2 = one(chunk, c1, last_only=True), two(chunk, c2, last_only=True)
    tok, pos = l1.argmax(-1), chunk.position_ids[:, -1] + 1
    for _ in range(3):
        worst = max(worst, (l1 - l2).abs().max().item())
        l1, l2 = one.decode_step(tok, pos, c1), two.decode_step(tok, pos, c2)
        tok, pos = l1.argmax(-1), pos + 1
two.close()
print(worst)
"""


@pytest.mark.slow
def test_cogagent_cross_attention_splits_by_heads(tmp_path):
    """CogAgent: the cross-attention's heads split like the others, its high-resolution tower
    stays whole; prefill (both images) and decode logits within 1e-5 of one process."""
    from tests.test_cogagent import randomize_all, tiny_cogagent_config

    from cogvlm.model import CogVLMForCausalLM

    config = tiny_cogagent_config()
    save_hf(randomize_all(CogVLMForCausalLM(config)).state_dict(), config, tmp_path / "agent")
    out = subprocess.run([sys.executable, "-c", COGAGENT_CHECK, str(tmp_path / "agent")], capture_output=True,
                         text=True, cwd=ROOT, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[-1]) <= 1e-5
