"""`cogvlm serve`: a real uvicorn server in a subprocess on a free loopback port, called with the
official openai client and with httpx. Answers must equal the API's (`CogVLM.chat`, greedy) for
the same inputs; every client mistake must get a 4xx code and an OpenAI-style error body."""

from __future__ import annotations

import base64
import functools
import io
import json
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from cogvlm import CogVLM
from cogvlm.data.synthetic import make_scene
from tests.processes import free_port, running
from tests.test_caption import ENV, ROOT

CONTEXT = 2048  # --max_length of the servers: room for an answer that outlasts a hang-up
MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS = 60_000, 250_000
KEY = "sekret"


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def scene(seed: int) -> bytes:
    return png(make_scene(seed, 48).image)


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def user(text: str, *urls: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}]
            + [{"type": "image_url", "image_url": {"url": u}} for u in urls]}


@contextmanager
def serving_process(model: Path, log: Path, *flags: str, context: int = CONTEXT) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m cogvlm serve` in a subprocess; yields its URL and process once /health answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    with running(["serve", "--model", str(model), "--port", str(port), "--max_length", str(context),
                  "--log-level", "warning", *flags], log, healthy, timeout=120, cwd=ROOT, env=ENV) as proc:
        yield url, proc


@contextmanager
def serving(model: Path, log: Path, *flags: str) -> Iterator[str]:
    with serving_process(model, log, *flags) as (url, _):
        yield url


def post(url: str, body: object, **headers: str) -> httpx.Response:
    """POST a JSON body as OpenAI clients do, any string allowed (a lone surrogate too: escaped)."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}/v1/chat/completions", content=content, timeout=60,
                      headers={"content-type": "application/json", **headers})


def assert_openai_error(response: httpx.Response, status: int | None = None) -> dict:
    """A 4xx (or the given status) with OpenAI's error body; returns the error object."""
    assert (response.status_code == status) if status else 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert error["type"] == "invalid_request_error", error
    return error


@pytest.fixture(scope="module")
def server(talkative: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serving(talkative, tmp_path_factory.mktemp("log") / "server.log", "--max-image-bytes", str(MAX_IMAGE_BYTES),
                 "--max-image-pixels", str(MAX_IMAGE_PIXELS)) as url:
        yield url


@pytest.fixture(scope="module")
def open_server(talkative: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """With an API key, and allowed to fetch remote images and read local files."""
    with serving(talkative, tmp_path_factory.mktemp("log") / "server.log", "--api-key", KEY,
                 "--allow-remote-images", "--allow-local-files") as url:
        yield url


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def reference(vlm: CogVLM, image: bytes | None, query: str, history=None, **sampling) -> str:
    return vlm.chat(image, query, history, top_k=1, max_length=CONTEXT, **sampling)[0]


def test_chat_completion_with_an_image(server, talkative, talkative_vlm):
    image = scene(1)
    reply = client(server).chat.completions.create(
        model=str(talkative), messages=[user("What is in the image?", data_url(image))], temperature=0, max_tokens=12)
    want = reference(talkative_vlm, image, "What is in the image?", max_new_tokens=12)
    assert reply.choices[0].message.content == want
    assert reply.choices[0].message.content and reply.choices[0].finish_reason == "length"
    prompt = talkative_vlm.prompt_length(talkative_vlm.prompt_tokens(image, "What is in the image?"))
    counts = reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens
    assert counts == (prompt, 12, prompt + 12)
    assert reply.model == str(talkative) and reply.object == "chat.completion"


def test_streamed_chunks_join_to_the_answer(server, talkative):
    request = dict(model=str(talkative), messages=[user("Describe it.", data_url(scene(2)))],
                   temperature=0, max_tokens=20)
    whole = client(server).chat.completions.create(**request)
    chunks = list(client(server).chat.completions.create(**request, stream=True,
                                                         stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1, "the answer should arrive in several pieces"
    assert "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_two_turn_conversation(server, talkative, talkative_vlm):
    image = scene(3)
    first = reference(talkative_vlm, image, "What is this?", max_new_tokens=6)
    reply = client(server).chat.completions.create(
        model=str(talkative), temperature=0, max_tokens=10,
        messages=[{"role": "system", "content": "ignored: CogVLM has no system prompt"},
                  user("What is this?", data_url(image)), {"role": "assistant", "content": first},
                  {"role": "user", "content": "And what colour is it?"}])
    want = reference(talkative_vlm, image, "And what colour is it?", [("What is this?", first)], max_new_tokens=10)
    assert reply.choices[0].message.content == want


def test_stop_strings_and_seeded_sampling(server, talkative, talkative_vlm):
    chat = client(server).chat.completions
    full = reference(talkative_vlm, None, "Tell me a story", max_new_tokens=30)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    reply = chat.create(model=str(talkative), messages=[user("Tell me a story")], temperature=0, max_tokens=30,
                        stop=[stop])
    want = reference(talkative_vlm, None, "Tell me a story", max_new_tokens=30, stop=[stop])
    assert reply.choices[0].message.content == want
    assert reply.choices[0].finish_reason == "stop" and len(reply.choices[0].message.content) < len(full)
    sampled = [chat.create(model=str(talkative), messages=[user("Tell me a story")], temperature=1.0, max_tokens=20,
                           seed=seed).choices[0].message.content for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_models_health_and_metrics(server, talkative):
    models = client(server).models.list()
    assert [m.id for m in models.data] == [str(talkative)]
    assert httpx.get(f"{server}/health").json() == {"status": "ok", "model": str(talkative)}
    metrics = httpx.get(f"{server}/metrics").json()
    assert metrics["max_batch"] == 16 and set(metrics) >= {"max_batch_seen", "batch_sizes", "requests"}
    wrong_method = httpx.get(f"{server}/v1/chat/completions")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["message"]


def test_api_key(open_server, talkative):
    with pytest.raises(openai.AuthenticationError):
        client(open_server).chat.completions.create(model=str(talkative), messages=[user("hi")], max_tokens=2)
    reply = client(open_server, KEY).chat.completions.create(model=str(talkative), messages=[user("hi")], max_tokens=2)
    assert reply.choices[0].message.content
    for path in ("/v1/models", "/metrics"):
        denied = httpx.get(f"{open_server}{path}", headers={"Authorization": "Bearer wrong"})
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{open_server}/health").status_code == 200  # for load balancers: no key needed


def test_remote_and_local_images_when_allowed(open_server, talkative, talkative_vlm, tmp_path):
    image = scene(4)
    (tmp_path / "scene.png").write_bytes(image)
    with serving_files(tmp_path) as files:
        urls = [f"{files}/scene.png", str(tmp_path / "scene.png"), f"file://{tmp_path / 'scene.png'}"]
        answers = [client(open_server, KEY).chat.completions.create(
            model=str(talkative), messages=[user("What is it?", url)], temperature=0, max_tokens=8,
        ).choices[0].message.content for url in urls]
    assert answers == [reference(talkative_vlm, image, "What is it?", max_new_tokens=8)] * 3


@contextmanager
def serving_files(folder: Path) -> Iterator[str]:
    """An http server for `folder` on a free loopback port; yields its URL."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as files:
        threading.Thread(target=files.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{files.server_address[1]}"
        finally:
            files.shutdown()


def _request(**overrides) -> dict:
    return {"messages": [user("What is in the image?", data_url(scene(5)))], "max_tokens": 4, **overrides}


def _noise_png(side: int) -> bytes:
    return png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)))


BAD_REQUESTS = {  # name: (body, status, param, code)
    "bad json": (b'{"messages": [', 400, None, "invalid_json"),
    "NaN": (b'{"messages": [], "temperature": NaN}', 400, None, "invalid_json"),
    "float past float64": (b'{"messages": [], "temperature": 1e999}', 400, None, "number_too_large"),
    "5000-digit integer": (b'{"messages": [], "max_tokens": ' + b"9" * 5000 + b"}", 400, None, "number_too_large"),
    "nested 100,000 deep": (b"[" * 100_000 + b"]" * 100_000, 400, None, "json_too_deep"),
    "nested 40 deep": (_request(metadata=functools.reduce(lambda x, _: [x], range(40), 0)), 400, None,
                       "json_too_deep"),
    "lone surrogate": (_request(messages=[user("what is \ud800 this?")]), 400, "messages", "invalid_text"),
    "unknown field": (_request(temprature=0.5), 400, "temprature", "unknown_parameter"),
    "unknown template": (_request(template="instruct"), 400, "template", "invalid_value"),
    "template not a string": (_request(template=1), 400, "template", "invalid_type"),
    "response_format json": (_request(response_format={"type": "json_object"}), 400, "response_format",
                             "unsupported_parameter"),
    "frequency_penalty": (_request(frequency_penalty=0.5), 400, "frequency_penalty", "unsupported_parameter"),
    "seed 2**64": (_request(seed=2**64, temperature=1), 400, "seed", "invalid_value"),
    "seed below -2**63": (_request(seed=-2**63 - 1, temperature=1), 400, "seed", "invalid_value"),
    "17 stop strings": (_request(stop=["x"] * 17), 400, "stop", "invalid_value"),
    "a stop string of 257 characters": (_request(stop=["x" * 257]), 400, "stop", "invalid_value"),
    "not an object": ([1, 2], 400, None, None),
    "unknown model": (_request(model="gpt-4o"), 404, "model", "model_not_found"),
    "no messages": ({"max_tokens": 4}, 400, "messages", None),
    "no user message": (_request(messages=[{"role": "system", "content": "hi"}]), 400, "messages",
                        "missing_user_message"),
    "two user messages in a row": (_request(messages=[user("a"), user("b")]), 400, "messages", "invalid_message_order"),
    "tool role": (_request(messages=[{"role": "tool", "content": "x"}]), 400, "messages[0].role", None),
    "bad content part": (_request(messages=[{"role": "user", "content": [{"type": "audio"}]}]), 400,
                         "messages[0].content[0]", None),
    "two images": (_request(messages=[user("a", data_url(scene(1)), data_url(scene(2)))]), 400,
                   "messages[0].content[2].image_url", "too_many_images"),
    "undecodable base64": (_request(messages=[user("a", "data:image/png;base64,@@not-base64@@")]), 400,
                           "messages[0].content[1].image_url", "invalid_base64"),
    "not an image": (_request(messages=[user("a", data_url(b"hello, I am text"))]), 400,
                     "messages[0].content[1].image_url", "invalid_image"),
    "image over --max-image-bytes": (_request(messages=[user("a", data_url(_noise_png(200)))]), 413,
                                     "messages[0].content[1].image_url", "image_too_large"),
    "image over --max-image-pixels": (_request(messages=[user("a", data_url(png(Image.new("RGB", (600, 600)))))]),
                                      413, "messages[0].content[1].image_url", "image_too_large"),
    "remote image not allowed": (_request(messages=[user("a", "http://127.0.0.1:9/x.png")]), 400,
                                 "messages[0].content[1].image_url", "image_url_not_allowed"),
    "local file not allowed": (_request(messages=[user("a", "/etc/hostname")]), 400,
                               "messages[0].content[1].image_url", "image_url_not_allowed"),
    "body over the limit": (_request(padding="x" * (MAX_IMAGE_BYTES * 2 + 2**20)), 413, None, "request_too_large"),
    "prompt over the context": (_request(messages=[user("word " * CONTEXT)]), 400, "messages",
                                "context_length_exceeded"),
    "negative temperature": (_request(temperature=-1), 400, "temperature", "invalid_value"),
    "temperature not a number": (_request(temperature="hot"), 400, "temperature", "invalid_type"),
    "top_p over 1": (_request(top_p=1.5), 400, "top_p", "invalid_value"),
    "max_tokens 0": (_request(max_tokens=0), 400, "max_tokens", "invalid_value"),
    "stop not strings": (_request(stop=[1]), 400, "stop", "invalid_type"),
    "n=2": (_request(n=2), 400, "n", "unsupported_parameter"),
    "tools": (_request(tools=[{"type": "function"}]), 400, "tools", "unsupported_parameter"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_requests_get_4xx_and_openai_errors(server, name):
    body, status, param, code = BAD_REQUESTS[name]
    error = assert_openai_error(post(server, body), status)
    assert (error["param"], error["code"]) == (param, code)


def test_only_json_bodies_and_known_hosts(server):
    """A web page may POST text/plain to any server without asking (CORS lets "simple" requests
    through), and DNS rebinding gives a page's own name the address 127.0.0.1: both refused."""
    body = json.dumps(_request()).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": content_type} if content_type else {}
        response = httpx.post(f"{server}/v1/chat/completions", content=body, headers=headers)
        assert assert_openai_error(response, 415)["code"] == "unsupported_media_type"
    assert post(server, _request(), **{"content-type": "application/json; charset=utf-8"}).status_code == 200
    for path in ("/health", "/v1/models"):
        response = httpx.get(f"{server}{path}", headers={"host": "attacker.example:8000"})
        assert assert_openai_error(response, 400)["code"] == "invalid_host"
    port = server.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        assert httpx.get(f"{server}/health", headers={"host": host}).status_code == 200


def test_endpoints_we_do_not_serve_name_the_ones_we_do(server):
    for method, path in [("POST", "/v1/completions"), ("POST", "/v1/embeddings"), ("GET", "/v1/files"),
                         ("POST", "/v1/images/generations"), ("GET", "/")]:
        response = httpx.request(method, f"{server}{path}", json={})
        error = assert_openai_error(response, 404)
        assert error["code"] == "unknown_url" and path in error["message"]
        assert "POST /v1/chat/completions" in error["message"] and "GET /v1/models" in error["message"]


def test_template_per_request(server, talkative, talkative_vlm):
    """Our extension: one server answers with every template (VQA and grounding need different ones)."""
    image = scene(6)
    for template in ("base", "vqa", "chat"):
        reply = post(server, {"messages": [user("What is it?", data_url(image))], "temperature": 0, "max_tokens": 8,
                              "template": template})
        assert reply.status_code == 200, reply.text
        want = reference(talkative_vlm, image, "What is it?", max_new_tokens=8, template=template)
        assert reply.json()["choices"][0]["message"]["content"] == want
    base = reference(talkative_vlm, image, "What is it?", max_new_tokens=8, template="base")
    assert base != reference(talkative_vlm, image, "What is it?", max_new_tokens=8, template="vqa")


def test_standard_fields_we_ignore_are_accepted(server):
    """OpenAI's fields that change nothing about an answer (or only at the neutral values) pass."""
    ignored = dict(user="u-1", metadata={"k": "v"}, store=False, service_tier="auto", parallel_tool_calls=True,
                   tool_choice="none", frequency_penalty=0, presence_penalty=0, logit_bias={}, logprobs=False,
                   response_format={"type": "text"}, tools=[])
    response = post(server, _request(**ignored))
    assert response.status_code == 200, response.text


def test_docs_only_on_a_keyless_loopback_server(server, open_server):
    assert httpx.get(f"{server}/docs").status_code == 200
    assert httpx.get(f"{server}/openapi.json").status_code == 200
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert_openai_error(httpx.get(f"{open_server}{path}"), 404)


@pytest.mark.parametrize("flags, env", [(["--api-key", ""], {}), ([], {"COGVLM_API_KEY": ""}),
                                        (["--api-key", "  ", "--host", "0.0.0.0"], {})])
def test_empty_api_keys_are_refused(flags, env, monkeypatch, capsys):
    """An empty key would silently mean "no auth" (before the slow model load: no model needed)."""
    from cogvlm.cli import main

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", "--model", "no-such-model", *flags]) == 2
    err = capsys.readouterr().err
    assert "API key is empty" in err and len(err.strip().splitlines()) == 1


def _metrics(url: str) -> dict:
    return httpx.get(f"{url}/metrics").json()


def test_concurrent_requests_decode_together(server, talkative, talkative_vlm):
    before = _metrics(server)["batch_sizes"]
    greedy = [(scene(10 + i) if i % 2 else None, f"question number {i}?") for i in range(4)]
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        if i < 4:
            image, query = greedy[i]
            messages, sampling = [user(query, *([data_url(image)] if image else []))], {"temperature": 0}
        else:  # sampled, long answers: they keep the batch busy while the others arrive
            messages, sampling = [user(f"story {i}")], {"temperature": 1.0, "seed": i}
        results[i] = client(server).chat.completions.create(
            model=str(talkative), messages=messages, max_tokens=16 if i < 4 else 64, **sampling
        ).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == list(range(8)) and all(results.values())
    assert [results[i] for i in range(4)] == [reference(talkative_vlm, img, q, max_new_tokens=16) for img, q in greedy]
    after = _metrics(server)
    together = {int(k): n - before.get(k, 0) for k, n in after["batch_sizes"].items()}
    assert max(k for k, n in together.items() if n > 0) > 1 and after["max_batch_seen"] > 1


def test_clients_that_hang_up_free_their_slots(server, talkative, talkative_vlm):
    cancelled = _metrics(server)["requests"]["finished"].get("cancelled", 0)
    long = _request(messages=[user("Tell me a very long story")], max_tokens=CONTEXT - 20, temperature=0)
    with httpx.stream("POST", f"{server}/v1/chat/completions", json={**long, "stream": True}, timeout=60) as response:
        for line in response.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # one real piece arrived: hang up mid-stream
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(f"{server}/v1/chat/completions", json=long, timeout=httpx.Timeout(60, read=0.3))
    others = [client(server).chat.completions.create(model=str(talkative), messages=[user(f"quick {i}")], temperature=0,
                                                     max_tokens=8).choices[0].message.content for i in range(3)]
    assert others == [reference(talkative_vlm, None, f"quick {i}", max_new_tokens=8) for i in range(3)]
    deadline = time.monotonic() + 30
    while _metrics(server)["requests"]["finished"].get("cancelled", 0) < cancelled + 2:
        assert time.monotonic() < deadline, "an abandoned request was never cancelled"
        time.sleep(0.1)
    assert _metrics(server)["requests"]["running"] == 0


def test_missing_serve_extra_gets_a_clear_message(monkeypatch, capsys):
    from cogvlm.cli import main

    monkeypatch.setitem(sys.modules, "fastapi", None)  # what an install without [serve] looks like
    assert main(["serve", "--model", "unused"]) == 2
    assert "pip install 'cogvlm[serve]'" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["serve", "web"])
def test_an_address_it_cannot_listen_on_is_one_line_before_the_load(verb, capsys):
    """A --host that is no address of this machine, or a --port another process holds: one line,
    exit 2, before the model loads (uvicorn itself would exit 3 after it; Gradio retries a bad
    host for ever)."""
    import socket

    from cogvlm.cli import main

    pytest.importorskip("fastapi" if verb == "serve" else "gradio")
    assert main([verb, "--model", "cogvlm-tiny", "--host", "999.1.1.1"]) == 2
    err = capsys.readouterr().err
    where = "999.1.1.1 port 8000" if verb == "serve" else "999.1.1.1"  # Gradio picks its port itself
    assert err.startswith(f"cogvlm {verb}: error: cannot listen on {where}: ") and len(err.splitlines()) == 1
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main([verb, "--model", "cogvlm-tiny", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == f"cogvlm {verb}: error: cannot listen on 127.0.0.1 port {port}: Address already in use\n"
