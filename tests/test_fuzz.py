"""Hardening: what an attacker or a careless client sends must never hurt anyone else.

Against a real `cogvlm serve` on loopback: fuzzed bodies, headers and images never get a 5xx,
always an OpenAI-style JSON error (or an answer), while a normal client in another thread keeps
getting exactly the answer it should; bad requests do not grow the server's memory; a bad
request in a running batch leaves its neighbours' answers untouched. Below the server: the
decoder and the scheduler confine a failure to its own row; any sampling values SamplingParams
accepts can be sampled; config.json and CLI mistakes end in exit 2 and one line. Mutators: images of every
format Pillow writes, byte-mutated (the server and `load_image`); checkpoints with config.json values
and safetensors header fields mutated, or cut short (load or a named error; convert one line).
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cogvlm.data.synthetic import make_scene
from cogvlm.generate import MAX_STOP_CHARS, MAX_STOPS, SamplingParams, sample
from tests.test_caption import ENV
from tests.test_server import assert_openai_error, data_url, post, scene, serving_process, user

CONTEXT = 96  # the fuzz server's --max_length: any answer a fuzzed request asks for stays short
MAX_IMAGE_MEMORY = 400_000  # bytes of decoded images in flight: a 200x200 RGBA image (280 kB) fits, 240x240 not
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))


def rss(pid: int) -> int:
    """Resident memory of a process in bytes (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def fuzz_server(talkative: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    log = tmp_path_factory.mktemp("log") / "server.log"
    with serving_process(talkative, log, "--max-image-bytes", "200000", "--max-image-pixels", "250000",
                         "--max-image-memory", str(MAX_IMAGE_MEMORY), context=CONTEXT) as (url, proc):
        yield url, proc.pid


NORMAL = {"messages": [user("What is in the image?", data_url(scene(21)))], "temperature": 0, "max_tokens": 6}


class Bystander:
    """A normal client asking the same greedy question again and again in its own thread: its
    answer must never change, whatever the fuzzed requests next to it do."""

    def __init__(self, url: str, want: str) -> None:
        self.url, self.want, self.answers, self.failures = url, want, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not (self._stop.is_set() and (self.answers or self.failures)):  # at least one, however quick the test
            response = post(self.url, NORMAL)
            if response.status_code != 200:
                self.failures.append(response.text)
            else:
                self.answers.append(response.json()["choices"][0]["message"]["content"])

    def __enter__(self) -> Bystander:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=120)
        assert not self.failures, self.failures[:3]
        assert self.answers and set(self.answers) == {self.want}


@pytest.fixture(scope="module")
def normal_answer(talkative_vlm) -> str:
    """The API's answer to the bystander's question (greedy, the server's context)."""
    return talkative_vlm.chat(scene(21), "What is in the image?", top_k=1, max_new_tokens=6, max_length=CONTEXT)[0]


@pytest.fixture
def bystander(fuzz_server, normal_answer) -> Iterator[Bystander]:
    """Asking throughout the test that uses it; checked when that test ends."""
    with Bystander(fuzz_server[0], normal_answer) as b:
        yield b


def check(response: httpx.Response) -> None:
    """Never a 5xx: an answer, or a 4xx with OpenAI's error body."""
    assert response.status_code < 500, response.text
    if response.status_code == 200:
        choice = response.json()["choices"][0]
        assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
    else:
        assert_openai_error(response)


# ---- request bodies ---------------------------------------------------------------------------

def _containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30) | st.sampled_from(["\ud800", "", "x" * 300, "user", "base", "data:image/png;base64,"]),
    _containers, max_leaves=12)
FIELDS = ["model", "messages", "temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens", "stop",
          "seed", "n", "stream", "stream_options", "repetition_penalty", "template", "user", "logprobs", "tools",
          "response_format", "frequency_penalty", "unknown"]
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", 3]),
     "content": json_values | st.lists(st.fixed_dictionaries(
         {"type": st.sampled_from(["text", "image_url", "audio"]), "text": json_values,
          "image_url": json_values | st.fixed_dictionaries({"url": json_values})}), max_size=3)}), max_size=4)
bodies = st.fixed_dictionaries({"messages": messages | json_values},
                               optional={f: json_values for f in FIELDS if f != "messages"}) | json_values


@FUZZ
@given(body=bodies)
def test_fuzzed_bodies(fuzz_server, bystander, body):
    url, _ = fuzz_server
    check(post(url, body))


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_fuzzed_raw_bytes(fuzz_server, bystander, raw):
    check(post(fuzz_server[0], raw))


header_values = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=40)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(headers=st.dictionaries(st.sampled_from(["authorization", "content-type", "host", "accept", "x-anything",
                                                "openai-organization", "content-encoding"]), header_values,
                               max_size=4))
def test_fuzzed_headers(fuzz_server, bystander, headers):
    url, _ = fuzz_server
    body = json.dumps({"messages": [user("hi")], "max_tokens": 2}).encode()
    try:
        response = httpx.post(f"{url}/v1/chat/completions", content=body, headers=headers, timeout=60)
    except (httpx.LocalProtocolError, UnicodeEncodeError):  # the client itself refuses to send these
        return
    check(response)


# ---- images -----------------------------------------------------------------------------------

FORMATS = {"PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I"], "JPEG": ["L", "RGB", "CMYK"],
           "GIF": ["L", "P"], "BMP": ["1", "L", "RGB"], "WEBP": ["RGB", "RGBA"], "TIFF": ["L", "RGB", "F", "CMYK"]}


@st.composite
def image_files(draw) -> bytes:
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(FORMATS[fmt]))
    size = (draw(st.integers(1, 260)), draw(st.integers(1, 260)))
    out = io.BytesIO()
    Image.new(mode, size, draw(st.integers(0, 255)) if mode != "F" else 0.5).save(out, fmt)
    data = out.getvalue()
    cut = draw(st.none() | st.integers(0, len(data)))  # truncated files
    return data if cut is None else data[:cut] + draw(st.binary(max_size=8))


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=image_files())
def test_fuzzed_images(fuzz_server, bystander, data):
    url, _ = fuzz_server
    check(post(url, {"messages": [user("What is it?", data_url(data))], "max_tokens": 2}))


# Every format Pillow can write but we do not read (QOI, IM, DDS, BLP, ICNS, EPS, SGI, TGA, ...), and
# the byte-level mutations that found #37's crashes (a short IDAT, decoders raising SyntaxError,
# IndexError, KeyError, ...): each file goes to the server as an upload and to the CLI's reader.
OTHER_FORMATS = sorted(set(Image.SAVE) - set(FORMATS) - {"PDF", "WMF", "BUFR", "GRIB", "HDF5", "MPO", "DIB"})


@st.composite
def mutated_images(draw) -> bytes:
    """An image in any format Pillow writes, then mutated: bytes flipped, a run of bytes repeated
    or cut out, the header of one format spliced onto the body of another, or cut short."""
    fmt = draw(st.sampled_from(sorted(FORMATS) + OTHER_FORMATS))
    out = io.BytesIO()
    size = (draw(st.integers(1, 64)), draw(st.integers(1, 64)))
    try:
        Image.new("RGB", size, draw(st.integers(0, 255))).save(out, fmt)
    except (OSError, ValueError, KeyError):  # a writer that needs another mode or size
        Image.new("L", (16, 16)).save(out, "PNG")
    data = bytearray(out.getvalue())
    for _ in range(draw(st.integers(0, 4))):
        kind, at = draw(st.sampled_from(["flip", "repeat", "cut", "splice"])), draw(st.integers(0, len(data)))
        if kind == "flip" and data:
            data[min(at, len(data) - 1)] ^= draw(st.integers(1, 255))
        elif kind == "repeat":
            data[at:at] = data[at:at + draw(st.integers(1, 64))] * draw(st.integers(1, 8))
        elif kind == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        else:
            data[:at] = draw(st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"RIFF",
                                              b"II*\x00", b"qoif", b"DDS ", b"%!PS-Adobe-3.0 EPSF-3.0\n"]))
    return bytes(data)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=mutated_images())
def test_mutated_images_of_every_format(fuzz_server, bystander, data):
    """The server answers a 4xx or an answer; the CLI's reader (`load_image`, which chat, caption
    and eval use) raises ImageError or gives an RGB image."""
    from cogvlm.errors import ImageError
    from cogvlm.image import load_image

    check(post(fuzz_server[0], {"messages": [user("What is it?", data_url(data))], "max_tokens": 2}))
    try:
        assert load_image(data).mode == "RGB"
    except ImageError:
        pass


def test_image_memory_admission(fuzz_server):
    """An image whose decoding alone takes more than --max-image-memory is refused by name; one
    under it is answered (the per-image pixel limit, 250,000, lets both through)."""
    url, _ = fuzz_server

    def rgba(side: int) -> bytes:
        out = io.BytesIO()
        Image.new("RGBA", (side, side), (1, 2, 3, 4)).save(out, "PNG")
        return out.getvalue()

    error = assert_openai_error(post(url, {"messages": [user("a", data_url(rgba(240)))], "max_tokens": 2}), 413)
    assert error["code"] == "image_too_large" and "--max-image-memory" in error["message"]
    assert post(url, {"messages": [user("a", data_url(rgba(200)))], "max_tokens": 2}).status_code == 200


def test_image_memory_waits_then_refuses():
    """Requests decoding at once share the budget: one that finds no room waits, then gets a 429."""
    from cogvlm.server import APIError, ImageMemory

    budget = ImageMemory(limit=100, wait=0.2)
    with budget.reserve((b"", 80), "a"):
        with pytest.raises(APIError) as refused:
            with budget.reserve((b"", 30), "b"):
                pass
        assert (refused.value.status, refused.value.code) == (429, "image_memory_busy")
        with budget.reserve((b"", 20), "c"):  # fits next to the first
            assert budget.used == 100
    assert budget.used == 0
    with budget.reserve((b"", 100), "d"):
        pass


# ---- neighbours and memory --------------------------------------------------------------------

# each passed validation before, and then failed inside the shared decode step, or leaked its job
NASTY = [dict(temperature=1, top_k=2**63), dict(temperature=1e-300), dict(temperature=5e-324),
         dict(temperature=1, top_p=1e-300), dict(temperature=1, seed=2**64), dict(temperature=1, seed=-2**63 - 1),
         dict(temperature=1, top_k=2**63, top_p=1e-300, seed=2**64 - 1), dict(stop=["a"] * 10_000),
         dict(repetition_penalty=1e-300), dict(messages=[user("\ud800")])]


def test_a_bad_request_in_a_running_batch_leaves_its_neighbours_alone(fuzz_server, bystander):
    """Each NASTY request joins the batch the bystander's request decodes in (or is refused at
    the door); the bystander's answers stay exactly the same."""
    url, _ = fuzz_server
    seen = len(bystander.answers)
    for round_ in range(2):
        for extra in NASTY:
            check(post(url, {"messages": [user(f"story {round_}")], "max_tokens": 30, **extra}))
    deadline = time.monotonic() + 60
    while len(bystander.answers) < seen + 3:
        assert time.monotonic() < deadline and not bystander.failures, bystander.failures[:3]
        time.sleep(0.05)
    assert set(bystander.answers) == {bystander.want}


@pytest.mark.slow
def test_memory_stays_bounded_after_bad_requests(tmp_path):
    """The issue's reproduction, on the shipped cogvlm-tiny: before, each request with an
    out-of-range seed kept its 4 MB KV cache (512 positions) for good, and /metrics counted it
    as running forever (2,000 took a server from 0.4 to 8.7 GB). After 300 bad or abandoned
    requests the server may be at most 60 MB bigger than after the first round (allocator
    slack; 60 leaked caches alone would be 240 MB), and nothing may still be running."""
    with serving_process("cogvlm-tiny", tmp_path / "server.log", context=512) as (url, proc):
        image = data_url(scene(22))

        def round_(i: int) -> None:
            for extra in NASTY:
                check(post(url, {"messages": [user(f"How many objects are there? {i}", image)], **extra}))
            with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60, content=json.dumps(
                    {"messages": [user("hang up")], "stream": True}), headers={"content-type": "application/json"}) as r:
                next(r.iter_lines())  # hang up after the first chunk

        round_(0)  # every path once: caches, thread pools, allocator arenas
        start = rss(proc.pid)
        for i in range(1, 28):
            round_(i)
        deadline = time.monotonic() + 30
        while (metrics := httpx.get(f"{url}/metrics").json())["requests"]["running"]:
            assert time.monotonic() < deadline, metrics
            time.sleep(0.1)
        grown = rss(proc.pid) - start
    assert grown < 60 * 2**20, f"RSS grew by {grown / 2**20:.0f} MB"


# ---- below the server: decoder and scheduler ----------------------------------------------------

def test_a_row_whose_sampling_fails_leaves_the_batch_alone(talkative_vlm):
    """NaN logits in one row (what a broken weight does) make its sampling fail: that row ends
    with its error, the others decode exactly as they would alone."""
    vlm = talkative_vlm
    params = vlm.sampling(max_new_tokens=6, top_k=0, temperature=1.0, top_p=1.0, seed=3)
    prompts = [vlm.prompt_tokens(None, q) for q in ("first question", "second question", "third one")]
    alone = vlm.decoder(prompts[:1], [params])
    for _ in alone.run():
        pass
    batch = vlm.decoder(prompts, [params] * 3)
    batch.logits[1] = float("nan")
    for _ in batch.run():
        pass
    assert list(batch.failed) == [1] and batch.generated[1] == []
    assert batch.generated[0] == alone.generated[0] and len(batch.generated[2]) == 6


def test_a_batch_that_never_drains_does_not_grow(talkative_vlm):
    """A busy server's batch never empties: rows keep joining as others leave. The cache's slots
    are shared columns, so without dropping the ones no row uses any more it would grow by one
    every step (memory and attention cost without bound); and each new row must still decode
    exactly as alone."""
    vlm = talkative_vlm
    params = vlm.sampling(max_new_tokens=4, top_k=1)
    prompt = vlm.prompt_tokens(None, "a question")
    alone = vlm.decoder([prompt], [params])
    for _ in alone.run():
        pass
    batch = vlm.decoder([prompt], [params])
    rows, lengths = [0], []
    for step in range(60):
        if step % 2:
            rows += batch.join(vlm.decoder([prompt], [params]))
        batch.step()
        lengths.append(batch.cache.length)
    for _ in batch.run():
        pass
    assert max(lengths[-20:]) <= vlm.prompt_length(prompt) + 16, lengths  # without the trim: + 60 and rising
    assert all(batch.generated[r] == alone.generated[0] for r in rows)


def test_a_prompt_that_fails_its_prefill_fails_alone(talkative_vlm):
    """Newcomers are prefilled together; when that fails, each is retried alone: only the bad one
    ends with an error, and every job ends exactly once."""
    from cogvlm.prompt import PromptTokens
    from cogvlm.scheduler import GenerationError, Scheduler

    vlm = talkative_vlm
    scheduler = Scheduler(vlm, max_batch=8)
    try:
        params = vlm.sampling(max_new_tokens=5, top_k=1)
        good = [vlm.prompt_tokens(None, f"question {i}") for i in range(3)]
        broken = PromptTokens(torch.zeros(3, 5, 5), good[0].text_ids)  # pixels of the wrong size
        jobs = [scheduler.submit(p, params) for p in (good[0], broken, good[1], good[2])]
        for job in jobs[::2] + jobs[3:]:
            job.result(timeout=60)
        with pytest.raises(GenerationError):
            jobs[1].result(timeout=60)
        assert [j.finish_reason for j in jobs] == ["length", "error", "length", "length"]
        assert [j.answer for j in jobs[2:]] == [vlm.chat(None, f"question {i}", max_new_tokens=5, top_k=1)[0]
                                                for i in (1, 2)]
    finally:
        scheduler.close()


sampling_values = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                            st.sampled_from([1e-300, 5e-324, 1e300, 2**63, 2**64, -2**63 - 1]))


@settings(max_examples=200, deadline=None)
@given(temperature=sampling_values, top_k=sampling_values, top_p=sampling_values, penalty=sampling_values,
       seed=sampling_values, stop=st.lists(st.text(max_size=MAX_STOP_CHARS + 2), max_size=MAX_STOPS + 2))
def test_sampling_values_are_refused_by_name_or_can_be_sampled(temperature, top_k, top_p, penalty, seed, stop):
    """The one rule for every surface: SamplingParams refuses a value naming it, or sampling with
    what it accepted works (no overflow, no NaN probabilities, no generator error)."""
    given_ = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty, seed=seed,
                  stop=stop)
    try:
        params = SamplingParams.build(**given_)
    except ValueError as e:
        assert str(e).startswith("invalid ") and str(e).split("=")[0][8:] in given_
        return
    logits = torch.randn(2, 50) * 10
    seen = torch.zeros(2, 50, dtype=torch.bool)
    seen[:, :5] = True
    generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
    tokens = sample(logits, [params, SamplingParams()], seen, [generator, None])
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 50


# ---- config.json and the command line ---------------------------------------------------------

CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "max_position_embeddings", "rms_norm_eps", "eos_token_id", "vision_config"]
bad_values = st.one_of(st.none(), st.text(max_size=5), st.integers(-5, 0), st.just([1]), st.just({}),
                       st.floats(allow_nan=True), st.just(7))


@pytest.fixture(scope="module")
def config_source(tiny_checkpoint: Path) -> dict:
    return json.loads((tiny_checkpoint / "config.json").read_text())


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(CONFIG_KEYS), value=bad_values, nested=st.booleans())
def test_bad_config_values_end_in_one_line(config_source, tiny_checkpoint, tmp_path_factory, capsys, key, value,
                                           nested):
    """`cogvlm convert` and loading (from_pretrained, every --model flag) read config.json the same
    way: a bad value is exit 2 and one line (or a config that still describes a working model)."""
    from cogvlm import CogVLM
    from cogvlm.checkpoint import CheckpointError
    from cogvlm.cli import main

    folder = tmp_path_factory.mktemp("cfg")
    for f in tiny_checkpoint.iterdir():
        (folder / f.name).symlink_to(f)
    config = json.loads(json.dumps(config_source))
    (config["vision_config"] if nested and key in config["vision_config"] else config)[key] = value
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(config))
    code = main(["convert", str(folder), str(folder / "out")])
    err = capsys.readouterr().err
    if code == 0:  # the value still made a model: then it must load
        CogVLM.from_pretrained(folder / "out", device="cpu")
        return
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("cogvlm convert: error: "), err
    with pytest.raises(CheckpointError):
        CogVLM.from_pretrained(folder, device="cpu")
    assert not (folder / "out").exists()


# ---- checkpoints: a mutator over config.json and the safetensors header ----------------------------

SAFETENSORS_FIELDS = {"dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "BOOL", "F64", "X", ""]) | st.integers(),
                      "shape": st.lists(st.integers(-2, 2**40), max_size=3) | st.text(max_size=3) | st.none(),
                      "data_offsets": st.lists(st.integers(-8, 2**62), max_size=3) | st.none()}


@st.composite
def checkpoint_mutations(draw) -> list[tuple[str, str, object]]:
    """Up to three changes: ("config", key, value) sets a config.json value (nested ones in
    vision_config), ("tensor", field, value) one field of one tensor's header entry, ("cut", "",
    fraction) cuts the weights file short."""
    changes = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["config", "tensor", "cut"]))
        if kind == "config":
            changes.append(("config", draw(st.sampled_from(CONFIG_KEYS + ["quantization", "torch_dtype",
                                                                         "vision_config.image_size",
                                                                         "vision_config.patch_size"])), draw(bad_values)))
        elif kind == "tensor":
            field = draw(st.sampled_from(sorted(SAFETENSORS_FIELDS)))
            changes.append(("tensor", field, draw(SAFETENSORS_FIELDS[field])))
        else:
            changes.append(("cut", "", draw(st.floats(0, 0.99))))
    return changes


def _mutate(folder: Path, changes: list[tuple[str, str, object]], pick: int) -> None:
    from tests.test_crafted_checkpoints import SHARD, header, write_header

    config = json.loads((folder / "config.json").read_text())
    head, data = header(folder / SHARD)
    names = sorted(k for k in head if k != "__metadata__")
    for kind, key, value in changes:
        if kind == "config":
            where, _, name = key.rpartition(".")
            (config[where] if where else config)[name] = value
        elif kind == "tensor":
            head[names[pick % len(names)]][key] = value
        else:
            data = data[:int(len(data) * value)]
    (folder / "config.json").write_text(json.dumps(config))
    write_header(folder / SHARD, head, data)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(changes=checkpoint_mutations(), pick=st.integers(0, 10**6))
def test_mutated_checkpoints_load_or_are_named(tiny_checkpoint, tmp_path_factory, capsys, changes, pick):
    """A checkpoint with any such mutations loads (then answers) or raises a named error; `cogvlm
    convert` of it is one line and exit 2, or a checkpoint that loads."""
    import shutil

    from cogvlm import CogVLM
    from cogvlm.cli import main
    from cogvlm.errors import CogVLMError

    folder = tmp_path_factory.mktemp("mutated") / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    _mutate(folder, changes, pick)
    try:
        vlm = CogVLM.from_pretrained(folder, device="cpu")
    except CogVLMError:
        pass
    else:
        assert isinstance(vlm.chat(None, "hi", max_new_tokens=2, top_k=1)[0], str)
    code = main(["convert", str(folder), str(folder.parent / "out")])
    err = capsys.readouterr().err
    assert code == 0 or (code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err), err


def test_whole_config_not_an_object(tiny_checkpoint, tmp_path, capsys):
    from cogvlm.cli import main

    for text in ("[1, 2]", '"config"', "null", "{"):
        for f in tiny_checkpoint.iterdir():
            if not (tmp_path / f.name).exists():
                (tmp_path / f.name).symlink_to(f)
        (tmp_path / "config.json").unlink()
        (tmp_path / "config.json").write_text(text)
        assert main(["chat", "--model", str(tmp_path), "--query", "hi"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "config.json" in err, err


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(flag=st.sampled_from(["--temperature", "--top_p", "--top_k", "--max_new_tokens", "--seed", "--max_length"]),
       value=st.sampled_from(["nan", "inf", "-1", "1e-300", "abc", "", str(2**64), str(-2**63 - 1), "0", "1e999"]))
def test_bad_sampling_flags_end_in_one_line(capsys, flag, value):
    """Refused before the model loads (argparse's own message, or ours naming the flag)."""
    from cogvlm.cli import main

    try:
        code = main(["chat", "--model", "no-such-model", "--query", "hi", flag, value])
    except SystemExit as e:  # argparse: a value that is not a number
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and err, err
    ours = [line for line in err.splitlines() if not line.startswith(("usage:", " "))]  # argparse: usage first
    assert len(ours) == 1 and ours[0].startswith("cogvlm chat: error: "), err


# ---- commands: one line and exit 2, never a traceback -------------------------------------------

def one_line_error(result: subprocess.CompletedProcess | tuple[int, str], verb: str) -> str:
    code, err = (result.returncode, result.stderr) if isinstance(result, subprocess.CompletedProcess) else result
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cogvlm {verb}: error: "), err
    return lines[0]


def run_main(capsys, *argv: str) -> tuple[int, str]:
    from cogvlm.cli import main

    code = main(list(argv))
    return code, capsys.readouterr().err


def test_chat_mistakes_end_in_one_line(capsys, tmp_path):
    assert "File name too long" in one_line_error(run_main(capsys, "chat", "--image", "a" * 5000, "--query", "hi"),
                                                  "chat")
    assert "not valid Unicode" in one_line_error(run_main(capsys, "chat", "--query", "what is \udcff?"), "chat")


@pytest.mark.slow
def test_chat_with_binary_stdin_ends_in_one_line(tmp_path):
    garbage = bytes(range(128, 256)) * 20
    result = subprocess.run([sys.executable, "-m", "cogvlm", "chat"], input=b"\n" + garbage + b"\nstop\n",
                            capture_output=True, env={**ENV, "PYTHONIOENCODING": "utf-8:strict"}, timeout=300)
    result = subprocess.CompletedProcess(result.args, result.returncode, result.stdout, result.stderr.decode())
    assert "standard input is not UTF-8" in one_line_error(result, "chat")


def test_merge_lora_refuses_pickled_adapters(capsys, tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    line = one_line_error(run_main(capsys, "merge-lora", "cogvlm-tiny", str(tmp_path), str(tmp_path / "out")),
                          "merge-lora")
    assert "adapter_model.safetensors" in line and not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE stands in for a full disk")
def test_caption_on_a_full_disk_reports_the_write_error(tmp_path):
    """A file-size limit makes every write past 100 bytes fail as a full disk does: the first error
    is the one reported, in one line (before, closing the journal failed again and hid it)."""
    for i in range(2):
        make_scene(i, 48).image.save(tmp_path / f"scene{i}.png")
    script = ("import resource, signal, sys\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "from cogvlm.cli import main\nresource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))\n"
              "sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", script, "caption", str(tmp_path), "--output",
                             str(tmp_path / "out" / "captions.jsonl")], capture_output=True, text=True, env=ENV,
                            timeout=300)
    progress = re.compile(r"cogvlm caption: \d+/\d+ img")  # its log lines off a terminal
    err = "\n".join(line for line in result.stderr.splitlines() if not progress.match(line))
    assert "cannot write" in one_line_error((result.returncode, err), "caption")


# ---- weights: bad files are refused with one message naming the tensors ------------------------

def _with_state(tiny_checkpoint: Path, out: Path, change) -> Path:
    from safetensors.torch import load_file

    from cogvlm.checkpoint import read_config, save_hf

    state = {}
    for shard in sorted(tiny_checkpoint.glob("*.safetensors")):
        state.update(load_file(shard))
    change(state)
    return save_hf(state, read_config(tiny_checkpoint), out, extra_files=(tiny_checkpoint / "tokenizer.model",))


def test_unusable_weights_are_named(tiny_checkpoint, tmp_path, capsys):
    from cogvlm import CogVLM
    from cogvlm.checkpoint import CheckpointError

    def spoil(state):
        state["model.norm.weight"][3] = float("nan")
        state["lm_head.weight"][0, 0] = float("inf")
        state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"].double()
        state["model.vision.boi"] = state["model.vision.boi"].to(torch.int64)

    folder = _with_state(tiny_checkpoint, tmp_path / "bad", spoil)
    with pytest.raises(CheckpointError) as bad:
        CogVLM.from_pretrained(folder, device="cpu")
    message = str(bad.value)
    assert "\n" not in message
    for name in ("model.norm.weight", "lm_head.weight", "model.embed_tokens.weight (float64)",
                 "model.vision.boi (int64)"):
        assert name in message
    one_line_error(run_main(capsys, "convert", str(folder), str(tmp_path / "out")), "convert")
    assert not (tmp_path / "out").exists()


def test_fp16_overflow_is_caught_when_loading(tiny_checkpoint, tmp_path):
    """Finite in the file, inf once loaded in float16 (past 65504): checked after conversion."""
    from cogvlm import CogVLM
    from cogvlm.checkpoint import CheckpointError

    folder = _with_state(tiny_checkpoint, tmp_path / "big", lambda s: s["model.norm.weight"].__setitem__(0, 1e6))
    CogVLM.from_pretrained(folder, device="cpu")
    with pytest.raises(CheckpointError, match="NaN or inf values: model.norm.weight"):
        CogVLM.from_pretrained(folder, device="cpu", dtype=torch.float16)


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "a/../../x.safetensors", 7])
def test_weight_files_stay_inside_the_checkpoint(tiny_checkpoint, tmp_path, target):
    from cogvlm import CogVLM
    from cogvlm.checkpoint import HF_INDEX, CheckpointError

    folder = _with_state(tiny_checkpoint, tmp_path / "ckpt", lambda s: None)
    (tmp_path / "outside.safetensors").write_bytes((folder / "model-00001-of-00001.safetensors").read_bytes())
    index = json.loads((folder / HF_INDEX).read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = target
    (folder / HF_INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not inside the checkpoint folder"):
        CogVLM.from_pretrained(folder, device="cpu")


def test_pre_zip_sat_checkpoints_load(tiny_model, tmp_path):
    """torch.save files from before torch 1.6 cannot be memory-mapped; they are read whole."""
    from cogvlm.checkpoint import load_model
    from tests.test_checkpoint import same_weights, write_sat

    write_sat(tmp_path / "sat", tiny_model)
    for f in (tmp_path / "sat").rglob("*.pt"):
        blob = torch.load(f, weights_only=True)
        torch.save(blob, f, _use_new_zipfile_serialization=False)
    loaded, _ = load_model(tmp_path / "sat")
    same_weights(loaded, tiny_model)
