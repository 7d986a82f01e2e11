"""Tensor parallelism on CPU: one process vs two (gloo), side by side, on the mid-size model of
benchmarks/generate.py (language hidden 1024, 8 layers, 16 heads; ViT 12 layers at 224 px), fp32.

Both load the same Hugging Face-layout folder through `CogVLM.from_pretrained(folder, tp=N)`; the
two-process run splits the cores between its ranks (one thread each on a 2-core machine); the
one-process run is measured on all cores and on as many as one rank gets. Measured, best of several repeats: the prefill of one image
prompt, and greedy decoding (batch 1) in tokens/s. "collectives" is the share of rank 0's decode
time spent inside all-reduce / all-gather (waiting for the other rank included), with their
count and bytes per step.

    python benchmarks/tp.py [--new-tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.distributed as dist

from cogvlm.checkpoint import load_model, save_hf
from cogvlm.prompt import PromptTokens, layout_batch
from cogvlm.quantize import prepack_model
from cogvlm.tp import load_parallel
from generate import CONFIG, PROMPT_LEN, random_model


class CollectiveClock:
    """Wraps torch.distributed's all_reduce / all_gather in this process to count and time them."""

    def __init__(self) -> None:
        self.seconds, self.calls, self.bytes = 0.0, 0, 0
        for name in ("all_reduce", "all_gather"):
            setattr(dist, name, self._timed(getattr(dist, name)))

    def _timed(self, fn):
        def wrapper(tensor_or_list, *args, **kwargs):
            start = time.perf_counter()
            out = fn(tensor_or_list, *args, **kwargs)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            sent = args[0] if isinstance(tensor_or_list, list) else tensor_or_list
            self.bytes += sent.numel() * sent.element_size()
            return out
        return wrapper

    def reset(self) -> None:
        self.seconds, self.calls, self.bytes = 0.0, 0, 0


def measure(model, chunk, new_tokens: int, repeats: int, clock: CollectiveClock | None) -> dict:
    best_prefill, best_decode, tokens = float("inf"), float("inf"), []
    with torch.no_grad():
        for _ in range(repeats):
            cache = model.new_cache(1, chunk.input_ids.shape[1] + new_tokens + 1)
            start = time.perf_counter()
            logits = model(chunk, cache, last_only=True)
            best_prefill = min(best_prefill, time.perf_counter() - start)
            position = chunk.position_ids[:, -1] + 1
            tokens = [int(logits.argmax())]
            if clock:
                clock.reset()
            start = time.perf_counter()
            for _ in range(new_tokens):
                logits = model.decode_step(torch.tensor(tokens[-1:]), position, cache)
                tokens.append(int(logits.argmax()))
                position = position + 1
            seconds = time.perf_counter() - start
            if seconds < best_decode:
                best_decode = seconds
                share = (clock.seconds / seconds, clock.calls / new_tokens, clock.bytes / new_tokens) if clock else None
    return {"prefill": best_prefill, "tok_s": new_tokens / best_decode, "tokens": tokens, "comm": share}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    threads = torch.get_num_threads()
    chunk = layout_batch([PromptTokens(torch.randn(3, 224, 224, generator=torch.Generator().manual_seed(0)),
                                       list(range(10, 10 + PROMPT_LEN)))], CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        model = random_model(torch.float32)
        folder = save_hf(model.state_dict(), CONFIG, f"{tmp}/mid")
        del model
        results = {}
        # one process on all cores, one process on one core, then two on one core each (starting
        # tp 2 gives this process its share of the cores)
        for tp, n in ((1, threads), (1, max(1, threads // 2)), (2, max(1, threads // 2))):
            if (tp, n) in results:
                continue
            torch.set_num_threads(n)
            model = load(folder, tp)
            results[tp, n] = measure(model, chunk, args.new_tokens, args.repeats, CollectiveClock() if tp > 1 else None)
            if tp > 1:
                model.close()
            del model
    one = results[1, threads]
    share, calls, sent = results[2, max(1, threads // 2)]["comm"]
    print(f"torch {torch.__version__}, {threads} CPU threads, fp32, image prompt of {chunk.input_ids.shape[1]} "
          f"tokens, {args.new_tokens} new tokens, best of {args.repeats}\n")
    print("| ranks | threads per rank | image prefill ms | decode tok/s | collectives: share of decode time "
          "| per token: calls / bytes | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for (tp, n), r in results.items():
        comm = f"{share:.0%} | {calls:.0f} / {sent / 1024:.0f} KiB" if tp > 1 else "- | -"
        same = "-" if r is one else ("yes" if r["tokens"] == one["tokens"] else "NO")
        print(f"| {tp}{' (gloo)' if tp > 1 else ''} | {n} | {r['prefill'] * 1e3:.0f} | {r['tok_s']:.1f} | {comm} | {same} |")


def load(folder, tp: int):
    """The model as `CogVLM.from_pretrained(folder, device="cpu", tp=tp)` loads it (random weights:
    no tokenizer to find): oneDNN-prepacked, split over `tp` processes when tp > 1."""
    if tp == 1:
        return prepack_model(load_model(folder)[0])
    return load_parallel(folder, tp, torch.float32, torch.device("cpu"), prepack=True)[0]


if __name__ == "__main__":
    main()
