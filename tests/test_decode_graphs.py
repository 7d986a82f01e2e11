"""The decode step built for CUDA graphs, checked on CPU: static buckets compiled once each, no host
sync inside a step, KV buffers that keep their addresses, in-place compaction that needs no
second cache, and the mask-free attention paths (`is_causal`, SDPA's own GQA)."""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import cogvlm.model as model_module
from cogvlm import CogVLM
from cogvlm.model import KVCache, decode_window, row_bucket
from cogvlm.prompt import PromptTokens, layout_batch
from cogvlm.tokenizer import Tokenizer
from tests.configs import tiny_test_config

from .conftest import randomize, tiny_cogvlm2_config

GREEDY = dict(top_k=1)


@pytest.fixture
def vlm(sp_model_path):
    """The tiny model with 2048 positions (room for 300 steps after a ~130-token chat prompt) that
    never says </s>: rows end when the test says."""
    model = randomize(model_module.CogVLMForCausalLM(tiny_test_config(vocab_size=400, max_position_embeddings=2048)))
    with torch.no_grad():
        model.lm_head.weight[model.config.eos_token_id] = 0
    return CogVLM(model.eval(), Tokenizer(sp_model_path))


# ---- a scenario with rows joining and leaving -------------------------------------------------

def prompts(vlm, n, offset=0):
    return [vlm.prompt_tokens(None, f"question {offset + i}: what {'is ' * (i % 3)}there?") for i in range(n)]


def drain_with_joins(vlm, steps, on_step=None):
    """6 rows (bucket 8) decode for `steps` steps; from step 20 one row joins every 40 steps and
    from step 40 the oldest row but row 0 leaves every 40, so the batch stays at 6-7 rows,
    inside one row bucket. No newcomer outlasts row 0, so every join fits the cache (no
    reallocation)."""
    long = vlm.sampling(max_new_tokens=steps + 1, **GREEDY)
    decoder = vlm.decoder(prompts(vlm, 6), [long] * 6)
    for i in range(steps):
        if i % 40 == 0 and i:
            decoder.finish(next(r for r in decoder.active if r and r not in decoder.ending))
        if i % 40 == 20:
            decoder.join(vlm.decoder(prompts(vlm, 1, 10 + i), [vlm.sampling(max_new_tokens=steps - i, **GREEDY)]))
        if on_step is not None:
            on_step(decoder)
        decoder.step()
    return decoder


# ---- compiled once per bucket, no graph breaks, buffers in place, eager's tokens --------------

@torch.no_grad()
def test_bucketed_step_compiles_once_per_bucket_and_matches_eager(vlm, fresh_dynamo):
    """compile_decode(graphs=True) is the CUDA-graph step (on CPU without the capture): fullgraph
    (a graph break raises), static shapes. Over 300 steps with rows joining and leaving, dynamo
    compiles exactly one graph per (row bucket, window, cache length) met, the KV buffers keep
    their addresses, and the greedy tokens equal the eager, unbucketed step's."""
    from torch._dynamo.utils import counters

    steps = 300
    eager = drain_with_joins(vlm, steps).generated
    vlm.model.compile_decode(graphs=True)
    compiled_step, keys = vlm.model._decode, set()

    def recording(tokens, positions, slot, k, v, valid, window, cross):
        keys.add((tokens.shape[0], window, k[0].stride()))
        return compiled_step(tokens, positions, slot, k, v, valid, window, cross)

    vlm.model._decode = recording
    pointers, sizes = set(), []

    def watch(decoder):
        if decoder.active:
            pointers.add(tuple(t.data_ptr() for t in decoder.cache._k + decoder.cache._v))
            sizes.append(len(decoder.active))

    graphs = counters["stats"]["unique_graphs"]
    compiled = drain_with_joins(vlm, steps, watch).generated
    assert compiled == eager
    assert counters["stats"]["unique_graphs"] - graphs == len(keys)  # one compile per bucket met
    assert {k[0] for k in keys} == {8} and set(sizes) == {6, 7}  # inside bucket 8
    assert len({k[1] for k in keys}) > 1  # the 300 steps crossed windows
    assert len(pointers) == 1  # joins and leaves worked inside the same buffers


# ---- at most one host sync per step ------------------------------------------------------------

SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


@contextmanager
def host_reads():
    """Counts, by name, every call that reads a tensor's values back to the host (on CUDA each
    waits for the GPU), and every `torch.tensor` built from host values (a host-to-device copy
    on CUDA). `torch.cuda.set_sync_debug_mode` is CUDA-only; on CPU these Python-level entry
    points are where the engine could sync, as it is written in Python."""
    counts: dict[str, int] = {}
    originals = {name: getattr(torch.Tensor, name) for name in SYNCS}
    tensor = torch.tensor

    def counting(name, fn):
        def call(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return fn(*args, **kwargs)
        return call

    for name, fn in originals.items():
        setattr(torch.Tensor, name, counting(name, fn))
    torch.tensor = counting("torch.tensor", tensor)
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        torch.tensor = tensor


@pytest.mark.parametrize("bucketed", [False, True])
@torch.no_grad()
def test_a_step_reads_back_only_its_tokens(vlm, bucketed):
    """One `tolist()` of the sampled tokens per step, nothing else, whatever the sampling (greedy,
    seeded top-p, a repetition penalty); host values go to the device only when the batch's rows
    change (its sampling tensors, the kept rows' indices)."""
    vlm.model.decode_buckets = bucketed
    params = [vlm.sampling(max_new_tokens=40, **GREEDY),
              vlm.sampling(max_new_tokens=40, top_k=0, top_p=0.9, temperature=1.2, seed=3),
              vlm.sampling(max_new_tokens=40, repetition_penalty=1.3, top_k=5, temperature=0.7, seed=4)]
    decoder = vlm.decoder(prompts(vlm, 3), params)
    for i in range(40):
        if i == 15:
            decoder.finish(1)
        if i == 25:
            decoder.join(vlm.decoder(prompts(vlm, 1, 7), [vlm.sampling(max_new_tokens=10, **GREEDY)]))
        before = list(decoder.active)
        with host_reads() as counts:
            decoder.step()
        changes = i == 0 or decoder.active != before  # a new sampler; the kept rows' indices
        assert counts.pop("tolist") == 1, i
        if not changes:
            assert counts == {}, i
        assert set(counts) <= {"torch.tensor"}, (i, counts)
    assert all(len(g) == 40 for g in (decoder.generated[0], decoder.generated[2]))


# ---- in-place compaction: outputs and peak memory ------------------------------------------------

class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage allocated since entering and still alive, and their peak: every
    op's new output storage is counted until a weak-reference finalizer sees it freed. Storages
    made before entering (the KV cache) are not counted, so `peak` is what a phase needs on top."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):  # a view or an in-place result is an input's storage: not new
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in self._seen and key not in inputs:
                    self._seen.add(key)
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, size)
        return out

    def _free(self, key: int, size: int) -> None:
        self.live -= size
        self._seen.discard(key)


def cache_bytes(cache: KVCache) -> int:
    return sum(t.numel() * t.element_size() for t in cache._k + cache._v) + cache._valid.numel()


@torch.no_grad()
def test_rows_leaving_compact_in_place_within_a_tenth_of_the_cache(vlm):
    """Six rows finish at six different steps. Each leaving moves the kept rows down inside the
    same buffers: the drain's extra memory, everything it allocates at its peak, stays under 10%
    of the cache (the old copy-on-leave took a second cache: ~80% here). Each row's tokens equal
    its decoding alone."""
    params = vlm.sampling(max_new_tokens=1000, max_length=1100, **GREEDY)
    rows = prompts(vlm, 6)
    decoder = vlm.decoder(rows, [params] * 6)
    size, pointers = cache_bytes(decoder.cache), {decoder.cache._k[0].data_ptr()}
    with LiveBytes() as memory:
        for i in range(61):
            if i and i % 10 == 0:
                decoder.finish(i // 10 - 1)
            decoder.step()
            pointers.add(decoder.cache._k[0].data_ptr() if decoder.active else None)
    assert decoder.done
    assert memory.peak < 0.1 * size, (memory.peak, size)
    assert pointers - {None} == {decoder.cache._k[0].data_ptr()}
    for row, prompt in enumerate(rows):
        alone = vlm.decoder([prompt], [vlm.sampling(max_new_tokens=len(decoder.generated[row]), **GREEDY)])
        list(alone.run())
        assert decoder.generated[row] == alone.generated[0], row


@torch.no_grad()
def test_joining_fills_free_rows_in_place_or_moves_one_layer_at_a_time(vlm):
    """A join that fits the running cache writes the newcomers into its free rows: no memory but
    theirs. One that does not allocates the bigger cache a layer at a time and frees each old
    layer as it moves: the peak is the new cache plus one old layer, not both whole caches."""
    vlm.model.decode_buckets = True  # 3 rows get 4 buffer rows: room for one more
    params = vlm.sampling(max_new_tokens=30, **GREEDY)
    running = vlm.decoder(prompts(vlm, 3), [params] * 3)
    running.step()
    running.step()
    newcomer = vlm.decoder(prompts(vlm, 1, 5), [params])
    pointer = running.cache._k[0].data_ptr()
    with LiveBytes() as memory:
        joined = KVCache.concat(running.cache, newcomer.cache, running.cache.length + 30)
    assert joined._k[0].data_ptr() == pointer and memory.peak < 0.02 * cache_bytes(joined)

    more = vlm.decoder(prompts(vlm, 2, 9), [params] * 2)
    old_layer = joined._k[0].numel() * joined._k[0].element_size()
    with LiveBytes() as memory:
        bigger = KVCache.concat(joined, more.cache, joined.length + 30)
    assert bigger.row_capacity == row_bucket(6) and bigger._k[0].data_ptr() != pointer
    assert memory.peak <= cache_bytes(bigger) + old_layer


def test_windows_and_row_buckets():
    assert [decode_window(s, 1024) for s in (1, 64, 65, 128, 129, 600, 1024)] == [64, 64, 128, 128, 256, 1024, 1024]
    assert decode_window(100, 80) == 80
    # eager steps (no graphs to keep few) read the used slots rounded up to 64
    assert [decode_window(s, 1024, False) for s in (1, 64, 65, 600, 1000)] == [64, 64, 128, 640, 1024]
    assert decode_window(700, 650, False) == 650
    assert [row_bucket(n) for n in (1, 2, 3, 5, 8, 9, 16, 17)] == [1, 2, 4, 8, 8, 16, 16, 24]


# ---- attention without masks: is_causal and SDPA's own grouped-query attention -------------------

def masked_sdpa(q, k, v, mask):
    """The reference path: an explicit mask always (causal, bottom-right aligned) and K, V
    repeated per query head, as before `is_causal` and `enable_gqa`."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    if mask is None:
        n, t = q.shape[-2], k.shape[-2]
        mask = torch.ones(n, t, dtype=torch.bool, device=q.device).tril(t - n)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def masked_attend_one(q, k, v, mask):
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask)


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@torch.no_grad()
def test_mask_free_attention_equals_the_masked_path(tiny_model, bpe_tokenizer_path, monkeypatch, gqa, padded):
    """Prefill (is_causal when nothing is padded, enable_gqa under GQA) and decode steps give the
    logits of the explicit-mask, repeated-K/V path to 1e-5 of the largest logit: fp32, and the
    two paths differ only in summation order inside SDPA (~1e-7 relative)."""
    model = randomize(model_module.CogVLMForCausalLM(tiny_cogvlm2_config(bpe_tokenizer_path)), seed=3).eval() \
        if gqa else tiny_model
    texts = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]] if not padded else [[5, 6, 7, 8, 9, 10], [11, 12]]
    chunk = layout_batch([PromptTokens(None, t) for t in texts], model.config)
    assert bool((~chunk.attention_mask).any()) == padded

    def run():
        cache = model.new_cache(2, chunk.input_ids.shape[1] + 4)
        out = [model(chunk, cache)]
        positions = chunk.position_ids[:, -1] + 1
        for i in range(3):
            out.append(model.decode_step(out[-1][:, -1].argmax(-1) if i == 0 else out[-1].argmax(-1),
                                         positions + i, cache))
        return out

    ours = run()
    monkeypatch.setattr(model_module, "sdpa", masked_sdpa)
    monkeypatch.setattr(model_module, "attend_one", masked_attend_one)
    reference = run()
    for a, b in zip(ours, reference):
        real = chunk.attention_mask if a.ndim == 3 else torch.ones(2, dtype=torch.bool)
        scale = b[real].abs().max()
        assert ((a - b)[real].abs().max() / scale).item() <= 1e-5


def test_grouped_one_query_math_equals_sdpa_with_repeated_heads():
    """attend_one's plain-math branch (CPU bf16, CPU fp32 with grouped heads, and inside
    torch.compile) reads each KV head for its group of query heads without copying: equal to
    SDPA on repeated K/V to bf16 rounding of the output (2^-8 relative; the math itself runs in
    fp32), and in fp32 to 1e-6 relative (summation order only)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g) for shape in ((3, 8, 1, 16), (3, 2, 40, 16), (3, 2, 40, 16)))
    mask = torch.rand(3, 1, 1, 40, generator=g) > 0.3
    mask[..., 0] = True
    want = masked_attend_one(q, k, v, mask)
    got = model_module.attend_one(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask).float()
    assert ((got - want).abs().max() / want.abs().max()).item() <= 2 ** -7  # bf16 inputs and output
    got = model_module.attend_one(q, k, v, mask)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-6
