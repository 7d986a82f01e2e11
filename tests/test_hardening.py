"""Issue #37 (server and data): what an attacker or a careless user does to `cogvlm serve` must
hurt only their own request. Each test reproduces one attack on a real server on loopback (a
subprocess, as tests/test_server.py starts them) or on real files, and failed before the fix."""

from __future__ import annotations

import json
import resource
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.processes import free_port, running
from tests.test_caption import ENV, ROOT

from tests.test_server import assert_openai_error, post, user


@contextmanager
def serve(model: Path, log: Path, *flags: str, context: int = 2048,
          env: dict[str, str] | None = None, host: str = "127.0.0.1") -> Iterator[tuple[str, int]]:
    """`python -m cogvlm serve` on a free loopback port; yields its URL and pid once /health answers."""
    port = free_port()
    url = f"http://{host}:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    with running(["serve", "--model", str(model), "--host", host, "--port", str(port), "--max_length", str(context),
                  "--log-level", "warning", *flags], log, healthy, timeout=120, cwd=ROOT,
                 env={**ENV, **(env or {})}) as proc:
        yield url, proc.pid


def vm_size(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


LONG = 2**20  # positions of the long-context copy of the talkative model


@pytest.fixture(scope="module")
def long_model(talkative: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The talkative tiny model with 2^20 positions: a KV cache row of its full length takes
    1 GiB (1 kB a slot), so a large max_tokens is a large allocation."""
    import shutil

    out = tmp_path_factory.mktemp("long") / "ckpt"
    shutil.copytree(talkative, out)
    config = json.loads((out / "config.json").read_text())
    config["max_position_embeddings"] = LONG
    (out / "config.json").write_text(json.dumps(config))
    return out


# ---- 1, 13: KV cache memory -------------------------------------------------------------------

def test_a_large_max_tokens_join_fails_the_newcomer_alone(long_model, tmp_path):
    """Four requests decode; a fifth with max_tokens 400,000 (400 MB of cache alone) arrives,
    whose join would grow the batch's cache to 5 rows of 400,000 slots (2 GB). The server's
    address space is capped at 1.2 GiB above its size: before, the grown cache's allocation
    failed inside the decode step and all five requests failed; now the newcomer alone gets a
    503 `server_busy`, the four answer in full, and the same request alone is admitted."""
    with serve(long_model, tmp_path / "server.log", context=LONG, env={"MALLOC_ARENA_MAX": "2"}) as (url, pid):
        ask = {"messages": [user("tell a story")], "max_tokens": 600, "temperature": 0}
        threads = [threading.Thread(target=post, args=(url, ask)) for _ in range(4)]  # warm: threads, arenas
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        resource.prlimit(pid, resource.RLIMIT_AS, (vm_size(pid) + 1200 * 2**20, resource.RLIM_INFINITY))
        results: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: results.append(post(url, ask))) for _ in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/metrics").json()["requests"]["running"] < 4:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        big = post(url, {**ask, "max_tokens": 400_000})
        for t in threads:
            t.join()
        assert [r.status_code for r in results] == [200] * 4, [r.text for r in results]
        assert all(r.json()["usage"]["completion_tokens"] == 600 for r in results)
        assert big.status_code == 503 and big.json()["error"]["code"] == "server_busy", big.text
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60, headers={"content-type": "application/json"},
                          content=json.dumps({**ask, "max_tokens": 400_000, "stream": True})) as alone:
            assert alone.status_code == 200
            lines = (line for line in alone.iter_lines() if line.startswith("data: "))
            next(lines)  # the role chunk
            assert "content" in json.loads(next(lines)[6:])["choices"][0]["delta"]  # it decodes


def test_a_cache_that_cannot_fit_is_refused_before_it_is_allocated(long_model, tmp_path):
    """A model with 2^20 positions and the server's default max_length: a question without
    max_tokens asks for a 1 GiB cache row. Under a 600 MiB address-space margin, before, the
    allocation failed for the request; on a machine without the cap the OOM killer ended the
    server. Now it is a 400 `context_length_exceeded` naming max_tokens, and the server lives."""
    with serve(long_model, tmp_path / "server.log", context=LONG, env={"MALLOC_ARENA_MAX": "2"}) as (url, pid):
        assert post(url, {"messages": [user("hi")], "max_tokens": 4}).status_code == 200
        resource.prlimit(pid, resource.RLIMIT_AS, (vm_size(pid) + 600 * 2**20, resource.RLIM_INFINITY))
        error = assert_openai_error(post(url, {"messages": [user("hi")]}), 400)
        assert error["code"] == "context_length_exceeded" and "max_tokens" in error["message"], error
        assert post(url, {"messages": [user("hi")], "max_tokens": 4}).status_code == 200


# ---- 12: remote and local image sources ---------------------------------------------------------

@pytest.fixture(scope="module")
def open_server(talkative: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve(talkative, tmp_path_factory.mktemp("log") / "server.log", "--allow-remote-images",
               "--allow-local-files") as (url, _):
        yield url


@contextmanager
def dripping_server(seconds: float) -> Iterator[str]:
    """An HTTP server that promises a 1 MB PNG and sends one byte every 0.2 s for `seconds`:
    every socket read succeeds, so a per-read timeout never fires."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Drip(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            end = time.monotonic() + seconds
            try:
                while time.monotonic() < end:
                    self.wfile.write(b"\x89")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:  # the client gave up: what the server under test should do
                pass

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/img.png"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_dripping_downloads_end_at_their_deadline_and_leave_room_for_others(open_server):
    """40 requests name a URL that drips a byte every 0.2 s for 40 s. Before, each held one of
    the server's 40 worker threads for the whole 40 s (urllib's 20 s timeout is per read) and a
    normal request waited behind them. Now at most 8 download at once (the rest: 429 at once),
    each ends by its 10 s deadline with a 4xx, and the normal request is answered meanwhile."""
    normal = {"messages": [user("hello")], "max_tokens": 4}
    with dripping_server(40) as drip:
        answers: list[tuple[httpx.Response, float]] = []

        def fetch() -> None:
            start = time.monotonic()
            response = post(open_server, {"messages": [user("what is it?", drip)], "max_tokens": 2})
            answers.append((response, time.monotonic() - start))

        threads = [threading.Thread(target=fetch) for _ in range(40)]
        for t in threads:
            t.start()
        time.sleep(1)
        start = time.monotonic()
        assert post(open_server, normal).status_code == 200
        assert time.monotonic() - start < 8
        for t in threads:
            t.join(timeout=60)
    codes = {r.json()["error"]["code"] for r, _ in answers}
    assert len(answers) == 40 and all(400 <= r.status_code < 500 for r, _ in answers), codes
    assert codes <= {"image_download_failed", "image_downloads_busy"} and max(s for _, s in answers) < 16


def test_local_images_must_be_regular_files(open_server, tmp_path):
    """Before, /dev/zero (size 0) was read until memory ran out and a FIFO blocked its worker
    for good; now both, and a directory, are refused at once by name; a real file is read."""
    import os

    from tests.test_server import scene

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    image = tmp_path / "scene.png"
    image.write_bytes(scene(3))
    for name in ("/dev/zero", str(fifo), str(tmp_path)):
        start = time.monotonic()
        response = httpx.post(f"{open_server}/v1/chat/completions", timeout=20, headers={"content-type": "application/json"},
                              content=json.dumps({"messages": [user("a", f"file://{name}")], "max_tokens": 2}))
        error = assert_openai_error(response)
        assert error["code"] == "image_not_found" and time.monotonic() - start < 5, error
    assert post(open_server, {"messages": [user("a", str(image))], "max_tokens": 2}).status_code == 200


# ---- 15: loopback and the API key ---------------------------------------------------------------

KEY = "clé-🔑"


def test_all_of_127_8_is_loopback_and_keys_are_bytes_with_any_case_scheme(talkative, tmp_path):
    """--host 127.0.0.2 is as private as 127.0.0.1: before, it turned the Host check off and
    warned that anyone could reach it. A non-ASCII --api-key, sent as its UTF-8 bytes, now
    authenticates (before, never), and so does the scheme written `bearer` (RFC 7235: any case)."""
    log = tmp_path / "server.log"
    with serve(talkative, log, "--api-key", KEY, host="127.0.0.2") as (url, _):
        def models(**headers: str | bytes) -> int:
            return httpx.get(f"{url}/v1/models", headers=headers, timeout=10).status_code

        assert models(authorization=f"Bearer {KEY}".encode()) == 200
        assert models(authorization=f"bearer {KEY}".encode()) == 200
        assert models(authorization=f"BEARER  {KEY}".encode()) == 200
        assert models(authorization="Bearer cle") == 401 and models() == 401
        assert models(authorization=KEY.encode()) == 401  # no scheme
        auth = f"Bearer {KEY}".encode()
        assert models(authorization=auth, host="evil.example") == 400  # DNS rebinding: refused
        assert models(authorization=auth, host="localhost") == 200
    assert "anyone" not in log.read_text()


def test_loopback_addresses():
    from cogvlm.server import is_loopback, loopback_hosts

    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "127.255.255.254", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "128.0.0.1", "example.com"]))
    assert "127.0.0.2" in loopback_hosts("127.0.0.2") and loopback_hosts("::1") == ("127.0.0.1", "localhost", "[::1]")


# ---- 3: large JSON bodies -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_server(talkative: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve(talkative, tmp_path_factory.mktemp("log") / "server.log") as (url, _):
        yield url


def test_a_large_json_body_does_not_freeze_the_server(plain_server):
    """29 MB of `[],[],...` (under the 29 MB body limit that the default 20 MiB images allow) took
    the event loop 7 s to parse and 26 s to check for depth: /health and every stream stopped.
    Now it is refused (413) in well under a second and /health keeps answering throughout."""
    body = b'{"messages": [' + b"[]," * 9_500_000 + b"1]}"
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            start = time.monotonic()
            httpx.get(f"{plain_server}/health", timeout=60)
            latencies.append(time.monotonic() - start)
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    start = time.monotonic()
    response = post(plain_server, body)
    took = time.monotonic() - start
    time.sleep(0.3)
    done.set()
    poller.join()
    assert took < 5 and max(latencies) < 1, (took, max(latencies))
    assert response.status_code == 413 and response.json()["error"]["code"] == "json_too_large", response.text
    assert post(plain_server, {"messages": [user("hi")], "max_tokens": 2}).status_code == 200


# ---- 8: connections that never finish ------------------------------------------------------------

def test_slow_connections_are_dropped_and_floods_do_not_flood_the_log(talkative, tmp_path):
    """100 slow-loris connections drip a header byte a second; one sends 10 bytes of a 1,000
    byte body and stops. Before, uvicorn kept them all for good (1,100 exhausted a 1,024-file
    limit) and logged every malformed request. Now each loris is closed once its headers are
    10 s late, the stalled body gets a 408 at 20 s, a normal client is served meanwhile, and
    200 malformed requests log their warning at most 20 times."""
    import socket

    log = tmp_path / "server.log"
    with serve(talkative, log) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        loris = []
        for _ in range(100):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            loris.append(s)
        body = socket.create_connection(("127.0.0.1", port))
        body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"messages\"")
        body.settimeout(30)
        start = time.monotonic()
        assert post(url, {"messages": [user("hi")], "max_tokens": 2}).status_code == 200
        open_ = set(range(len(loris)))
        while open_ and time.monotonic() - start < 16:
            for i in list(open_):
                try:
                    loris[i].sendall(b"X")
                except OSError:  # closed by the server
                    open_.discard(i)
            time.sleep(1)
        assert not open_, f"{len(open_)} slow connections still open after {time.monotonic() - start:.0f} s"
        reply = b""
        while b"request_timeout" not in reply and (part := body.recv(4096)):  # head and body may come apart
            reply += part
        assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply, reply
        for s in [*loris, body]:
            s.close()
        for _ in range(200):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"GARBAGE \x00\r\n\r\n")
                s.recv(100)
        assert httpx.get(f"{url}/health").status_code == 200
    assert log.read_text().count("Invalid HTTP request") <= 20


# ---- 2: long thin images ---------------------------------------------------------------------------

def test_long_thin_images_are_refused_by_shape(plain_server):
    """A 1 x 1,000,000 PNG (a few kB) passes the pixel limit; resizing it to the model's square
    allocates side x 1,000,000 x 3 bytes (with 1 x 40,000,000, 4 requests took a server to
    10.8 GB under the 1 GiB --max-image-memory). Now anything past 50:1 is a 400 by name before
    decoding, and a 50:1 image is still answered."""
    from tests.test_server import data_url, png
    from PIL import Image

    thin = png(Image.new("L", (1, 1_000_000)))
    error = assert_openai_error(post(plain_server, {"messages": [user("a", data_url(thin))], "max_tokens": 2}), 400)
    assert error["code"] == "invalid_image" and "50:1" in error["message"], error
    ok = png(Image.new("RGB", (500, 10), (200, 10, 10)))
    assert post(plain_server, {"messages": [user("a", data_url(ok))], "max_tokens": 2}).status_code == 200
