"""Serving throughput: a live `cogvlm serve` on loopback under 1, 4 and 16 concurrent clients.

Each client sends short chat requests (every other one with a small image as a data URL),
greedy, for at most --max-tokens new tokens. For each concurrency the table shows completion
tokens/s over the wall time, p50/p95 request latency and the largest decode batch the server
formed; the last line is the throughput at 16 clients as a multiple of that at 1: what decoding
concurrent requests together (continuous batching) buys. The load is bounded: --requests in
all per concurrency, sent only to 127.0.0.1.

Without --model, a random tiny CogVLM (the test suite's shape) and a tokenizer trained on the
spot are written to a temp folder; its </s> logit is zeroed so answers run to --max-tokens.

    pip install -e '.[serve,test]' && python benchmarks/serve.py [--model PATH] [--requests 32 64 128]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import sentencepiece as spm
import torch

from cogvlm.checkpoint import save_hf
from tests.configs import tiny_test_config
from cogvlm.data.synthetic import make_scene
from cogvlm.model import CogVLMForCausalLM

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = (1, 4, 16)
CORPUS = ["A red circle sits left of a small blue square on a grey table.",
          "Question: What colour is the triangle? Answer: green, and it is large.",
          "Two dogs run in the park; one of them carries a yellow ball home."]


def tiny_checkpoint(folder: Path) -> Path:
    """A random tiny model that never ends early, with a sentencepiece tokenizer beside it."""
    (folder / "corpus.txt").write_text("\n".join(CORPUS * 50))
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"),
                                   model_type="bpe", vocab_size=320, byte_fallback=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    torch.manual_seed(0)
    model = CogVLMForCausalLM(tiny_test_config(vocab_size=320))
    with torch.no_grad():
        model.lm_head.weight[model.config.eos_token_id] = 0
    out = folder / "model"
    save_hf(model.state_dict(), model.config, out)
    (out / "tokenizer.model").write_bytes((folder / "tokenizer.model").read_bytes())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, log: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cogvlm", "serve", "--model", model, "--port", str(port),
                                 "--max-batch", str(max(CONCURRENCY)), "--log-level", "warning", *flags],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    sys.exit(f"the server did not start:\n{log.read_text()}")


def requests(n: int, max_tokens: int) -> list[dict]:
    buffer = io.BytesIO()
    make_scene(0, 64).image.save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    out = []
    for i in range(n):
        content: list[dict] = [{"type": "text", "text": f"Question {i}: what is in the picture?"}]
        if i % 2:
            content.append({"type": "image_url", "image_url": {"url": url}})
        out.append({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0})
    return out


def measure(client: httpx.Client, load: list[dict], concurrency: int) -> dict[str, float]:
    def one(body: dict) -> tuple[float, int]:
        start = time.perf_counter()
        response = client.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        return time.perf_counter() - start, response.json()["usage"]["completion_tokens"]

    before = client.get("/metrics").json()["batch_sizes"]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, load))
    wall = time.perf_counter() - start
    after = client.get("/metrics").json()["batch_sizes"]
    latencies = sorted(seconds for seconds, _ in results)
    return {"tokens_per_s": sum(tokens for _, tokens in results) / wall,
            "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
            "max_batch": max((int(k) for k, n in after.items() if n > before.get(k, 0)), default=0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder or registry name (default: a random tiny one made here)")
    parser.add_argument("--requests", type=int, nargs=3, default=[32, 64, 128], metavar="N",
                        help="requests sent at concurrency 1, 4 and 16 (default 32 64 128)")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per answer (default 32)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(tiny_checkpoint(Path(tmp)))
        port = free_port()
        server = start_server(model, port, Path(tmp) / "server.log")
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300,
                              limits=httpx.Limits(max_connections=max(CONCURRENCY))) as client:
                measure(client, requests(4, args.max_tokens), 4)  # warm-up
                rows = {c: measure(client, requests(n, args.max_tokens), c) for c, n in zip(CONCURRENCY, args.requests)}
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"model: {args.model or 'random tiny CogVLM (made here)'}; {args.max_tokens} new tokens per request, "
          f"greedy; torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"{'concurrency':>11} {'requests':>8} {'tokens/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'max batch':>9}")
    for (c, row), n in zip(rows.items(), args.requests):
        print(f"{c:>11} {n:>8} {row['tokens_per_s']:>9.1f} {row['p50_ms']:>8.0f} {row['p95_ms']:>8.0f} "
              f"{row['max_batch']:>9}")
    print(f"throughput at 16 clients: {rows[16]['tokens_per_s'] / rows[1]['tokens_per_s']:.1f}x that at 1")


if __name__ == "__main__":
    main()
