"""Soak: a live `cogvlm serve` under mixed good, bad and abandoned requests for a given time.

--clients threads each loop over a mix: greedy text and image questions (their answers must
never change: each is compared with the first answer to the same question), streamed answers,
clients that hang up mid-stream, requests that are refused (out-of-range seeds, 17 stop
strings, unknown fields, broken JSON, images over the limits) and requests that pass but used
to break the shared decode step (top_k 2^63, temperature 1e-300, top_p 1e-300). The server's
resident memory is sampled every second. The table counts, per kind, answers, 4xx, 5xx and
transport failures, wrong answers and latencies; then RSS at the start, its peak and at the
end, and what /metrics says is still running (it must be 0). Only 127.0.0.1 is contacted.

Beside them, --attackers threads (issue #37) loop over what an attacker sends: slow-loris
connections (headers a byte at a time, never finished: the server must close them), bodies over
the body limit (the server runs with --max-image-bytes 1000000, so 3 MB is over it), long thin
images (1 x 2,000,000 pixels, a few kB of PNG) and requests with a huge max_tokens that join the
running batch. Their outcomes are counted apart: the good clients must see no failure at all.

    pip install -e '.[serve]' && python benchmarks/soak.py [--seconds 60] [--clients 12] [--attackers 4]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import free_port, start_server  # noqa: E402  (the throughput benchmark's server helpers)

from cogvlm.data.synthetic import make_scene  # noqa: E402


def data_url(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def user(text: str, url: str | None = None) -> list[dict]:
    parts: list[dict] = [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts + ([{"type": "image_url", "image_url": {"url": url}}] if url else [])}]


SCENES = [data_url(make_scene(seed, 112).image) for seed in range(4)]
HUGE = data_url(Image.new("RGB", (7000, 7000)))  # 49 M pixels: over --max-image-pixels, refused from its header
THIN = data_url(Image.new("L", (1, 2_000_000)))  # 2 M pixels, 2,000,000:1: refused by shape before decoding
MAX_IMAGE_BYTES = 1_000_000  # the soak server's --max-image-bytes: its body limit is ~2.3 MB


def kinds() -> dict[str, tuple[bytes | dict, str]]:
    """name: (body, what must happen: 'answer', 'same' (greedy: the same answer each time), '4xx', 'hang up')."""
    return {
        "text (greedy)": ({"messages": user("How many objects are there?"), "temperature": 0, "max_tokens": 24}, "same"),
        "image (greedy)": ({"messages": user("What is in the image?", SCENES[0]), "temperature": 0}, "same"),
        "image (sampled)": ({"messages": user("Describe the image.", SCENES[1]), "temperature": 0.9, "seed": 5}, "same"),
        "streamed": ({"messages": user("How many objects are there?", SCENES[2]), "stream": True}, "answer"),
        "hang up mid-stream": ({"messages": user("Describe the image.", SCENES[3]), "stream": True}, "hang up"),
        "top_k 2^63, top_p 1e-300": ({"messages": user("hi"), "temperature": 1, "top_k": 2**63, "top_p": 1e-300},
                                     "answer"),
        "temperature 1e-300": ({"messages": user("hi", SCENES[1]), "temperature": 1e-300}, "answer"),
        "seed 2^64": ({"messages": user("hi"), "temperature": 1, "seed": 2**64}, "4xx"),
        "17 stop strings": ({"messages": user("hi"), "stop": ["x"] * 17}, "4xx"),
        "unknown field": ({"messages": user("hi"), "temprature": 1}, "4xx"),
        "broken JSON": (b'{"messages": [', "4xx"),
        "7000x7000 image": ({"messages": user("hi", HUGE)}, "4xx"),
    }


def attacks() -> dict[str, tuple[bytes | dict, str]]:
    """What the attackers loop over ('any': every HTTP answer is fine, only the good clients are judged)."""
    return {
        "slow loris (10 connections)": (b"", "loris"),
        "3 MB body (over the limit)": (b'{"messages": "' + b"x" * 3_000_000 + b'"}', "4xx"),
        "1 x 2,000,000 image": ({"messages": user("hi", THIN)}, "4xx"),
        "max_tokens 10^6": ({"messages": user("Describe the image.", SCENES[0]), "max_tokens": 10**6}, "any"),
        "max_tokens 1500 (joins)": ({"messages": user("Describe the image.", SCENES[1]), "max_tokens": 1500,
                                     "temperature": 1, "seed": 3}, "any"),
    }


def slow_loris(port: int, connections: int = 10, seconds: float = 30) -> str:
    """Open `connections` sockets that send a request line and then a header byte every second,
    never ending the headers: 'ok' when the server closed every one of them within `seconds`."""
    socks = []
    for _ in range(connections):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        socks.append(s)
    deadline, open_ = time.monotonic() + seconds, set(range(connections))
    while open_ and time.monotonic() < deadline:
        for i in list(open_):
            try:
                socks[i].sendall(b"X")
            except OSError:  # reset or closed by the server
                open_.discard(i)
        time.sleep(1)
    for s in socks:
        s.close()
    return "ok" if not open_ else "wrong"


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.first: dict[str, str] = {}

    def add(self, kind: str, outcome: str, seconds: float) -> None:
        with self.lock:
            self.counts[kind][outcome] += 1
            self.latency[kind].append(seconds)

    def same(self, kind: str, answer: str) -> bool:
        with self.lock:
            return self.first.setdefault(kind, answer) == answer


def one(client: httpx.Client, kind: str, body: bytes | dict, expect: str, tally: Tally) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    start = time.perf_counter()
    try:
        if expect == "loris":
            outcome = slow_loris(int(str(client.base_url).rsplit(":", 1)[1].rstrip("/")))
        elif expect == "any":
            r = client.post("/v1/chat/completions", content=content, headers=headers)
            outcome = "ok" if r.status_code == 200 else "5xx" if r.status_code >= 500 else "4xx"
        elif expect == "hang up" or (isinstance(body, dict) and body.get("stream")):
            with client.stream("POST", "/v1/chat/completions", content=content, headers=headers) as r:
                lines = r.iter_lines()
                if expect == "hang up":
                    next(lines)
                    outcome = "ok"
                else:
                    text = "".join(lines)
                    outcome = "ok" if r.status_code == 200 and "[DONE]" in text and '"error"' not in text else "5xx"
        else:
            r = client.post("/v1/chat/completions", content=content, headers=headers)
            if r.status_code >= 500:
                outcome = "5xx"
            elif r.status_code >= 400:
                outcome = "4xx" if expect == "4xx" and "error" in r.json() else "wrong"
            elif expect == "4xx":
                outcome = "wrong"
            else:
                answer = r.json()["choices"][0]["message"]["content"]
                outcome = "ok" if expect != "same" or tally.same(kind, answer) else "wrong"
    except httpx.HTTPError:
        outcome = "transport"
    tally.add(kind, outcome, time.perf_counter() - start)


def print_table(tally: Tally, names: list[str]) -> None:
    print(f"{'kind':<28} {'sent':>5} {'ok':>5} {'4xx':>5} {'5xx':>5} {'transport':>9} {'wrong':>5} {'p50 ms':>7} "
          f"{'p95 ms':>7}")
    for kind in names:
        c, lat = tally.counts[kind], sorted(tally.latency[kind])
        if not lat:
            continue
        p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
        print(f"{kind:<28} {len(lat):>5} {c['ok']:>5} {c['4xx']:>5} {c['5xx']:>5} {c['transport']:>9} "
              f"{c['wrong']:>5} {1000 * statistics.median(lat):>7.0f} {1000 * p95:>7.0f}")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cogvlm-tiny", help="registry name or folder (default cogvlm-tiny)")
    parser.add_argument("--seconds", type=float, default=60, help="how long to load the server (default 60)")
    parser.add_argument("--clients", type=int, default=12, help="concurrent client threads (default 12)")
    parser.add_argument("--attackers", type=int, default=4, help="concurrent attacker threads (default 4)")
    args = parser.parse_args()
    load, hostile = kinds(), attacks()
    names, hostile_names = list(load), list(hostile)
    tally, attacked = Tally(), Tally()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = start_server(args.model, port, Path(tmp) / "server.log", "--max-image-bytes", str(MAX_IMAGE_BYTES))
        memory: list[int] = []
        try:
            url = f"http://127.0.0.1:{port}"
            start_rss = rss(server.pid)
            stop = time.monotonic() + args.seconds

            def client_loop(offset: int) -> None:
                with httpx.Client(base_url=url, timeout=120) as client:
                    i = offset
                    while time.monotonic() < stop:
                        kind = names[i % len(names)]
                        one(client, kind, *load[kind], tally)
                        i += 1

            def attacker_loop(offset: int) -> None:
                with httpx.Client(base_url=url, timeout=120) as client:
                    i = offset
                    while time.monotonic() < stop:
                        kind = hostile_names[i % len(hostile_names)]
                        one(client, kind, *hostile[kind], attacked)
                        i += 1

            threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(args.clients)]
            threads += [threading.Thread(target=attacker_loop, args=(k,)) for k in range(args.attackers)]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                memory.append(rss(server.pid))
                time.sleep(1)
            time.sleep(2)  # cancelled rows leave at the next step
            metrics = httpx.get(f"{url}/metrics").json()
            end_rss = rss(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
    mb = 2**20
    total = sum(sum(c.values()) for c in tally.counts.values())
    print(f"model: {args.model}; {args.clients} clients and {args.attackers} attackers for {args.seconds:.0f} s; "
          f"{total} client requests; torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print_table(tally, names)
    failures = sum(c["5xx"] + c["transport"] + c["wrong"] for c in tally.counts.values())
    print(f"client failures (5xx, transport, wrong answers): {failures}")
    print("attackers:")
    print_table(attacked, hostile_names)
    print(f"server RSS: {start_rss / mb:.0f} MB at start, {max(memory, default=0) / mb:.0f} MB peak, "
          f"{end_rss / mb:.0f} MB at the end; /metrics running: {metrics['requests']['running']}, "
          f"finished: {metrics['requests']['finished']}")
    step = max(1, len(memory) // 12)
    print("server RSS over time (MB): " + " ".join(f"{m / mb:.0f}" for m in memory[::step]))


if __name__ == "__main__":
    main()
