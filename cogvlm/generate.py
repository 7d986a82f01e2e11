"""Decoding: sampling parameters, the batched decode loop over a preallocated KV cache, and
incremental detokenization that always yields valid UTF-8.

Everything that talks to users (API, CLI, web demo, server, captioning) goes through
`BatchDecoder` and `TextStream`; none of them decodes on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterable, Sequence

import torch

from .errors import ContextLengthError  # noqa: F401  (importable from here, as before)
from .model import CogVLMForCausalLM, KVCache
from .tokenizer import Tokenizer


# The one place the sampling ranges live (API, CLI, web demo and server all build SamplingParams).
# Values inside the ranges but past what float32 or torch can represent are clamped, so that no
# request can make the shared decode step fail (see SamplingParams).
MIN_TEMPERATURE = 1e-5  # 0 < temperature below this: greedy (logits / t would overflow float32)
MIN_TOP_P = 1e-6  # 0 < top_p below this: 1e-6, only the likeliest token (1e-300 is 0 in float32)
MAX_TOP_K = 2**31 - 1  # larger top_k: 0, no limit (no vocabulary is larger; int64 would overflow)
PENALTY_RANGE = (0.01, 100.0)
SEED_RANGE = (-2**63, 2**64)  # what torch.Generator.manual_seed takes
MAX_STOPS, MAX_STOP_CHARS = 16, 256  # every stop string is checked after every token of its row


def _number(x: Any) -> bool:
    """A finite real that converts to float (10**400 does not)."""
    try:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    except OverflowError:
        return False


def _integer(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """The authors' defaults: top-k 1 makes it greedy; max_length counts image slots too.

    Ranges (checked here, once, for every surface): temperature >= 0 (0 greedy; below 1e-5 counts
    as 0); top_k an integer >= 0 (0 no limit, 1 greedy; above 2^31-1 counts as 0); top_p in (0, 1]
    (below 1e-6 counts as 1e-6); repetition_penalty in [0.01, 100] (1 off); max_new_tokens an
    integer >= 1; max_length an integer >= 2; seed an integer in [-2^63, 2^64); stop at most 16
    non-empty strings of at most 256 characters. Numbers must be finite.
    """

    temperature: float = 0.8
    top_k: int = 1
    top_p: float = 0.4
    repetition_penalty: float = 1.0
    max_new_tokens: int | None = None
    max_length: int = 2048
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if isinstance(stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(stop))
        low, high = PENALTY_RANGE
        checks = [
            ("temperature", _number(self.temperature) and self.temperature >= 0, "must be a finite number >= 0 (0 means greedy)"),
            ("top_k", _integer(self.top_k) and self.top_k >= 0, "must be an integer >= 0 (0 = no limit, 1 = greedy)"),
            ("top_p", _number(self.top_p) and 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("repetition_penalty", _number(self.repetition_penalty) and low <= self.repetition_penalty <= high,
             f"must be in [{low}, {high:g}] (1 = off)"),
            ("max_new_tokens", self.max_new_tokens is None or (_integer(self.max_new_tokens) and self.max_new_tokens >= 1), "must be an integer >= 1"),
            ("max_length", _integer(self.max_length) and self.max_length >= 2, "must be an integer >= 2"),
            ("seed", self.seed is None or (_integer(self.seed) and SEED_RANGE[0] <= self.seed < SEED_RANGE[1]),
             "must be an integer in [-2**63, 2**64)"),
            ("stop", isinstance(self.stop, tuple) and len(self.stop) <= MAX_STOPS, f"must be at most {MAX_STOPS} strings"),
            ("stop", all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop),
             f"must be non-empty strings of at most {MAX_STOP_CHARS} characters"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"invalid {name}={_short(getattr(self, name))}: {why}")
        temperature = float(self.temperature)
        object.__setattr__(self, "temperature", 0.0 if temperature < MIN_TEMPERATURE else temperature)
        object.__setattr__(self, "top_p", max(float(self.top_p), MIN_TOP_P))
        if self.top_k > MAX_TOP_K:
            object.__setattr__(self, "top_k", 0)

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0

    @classmethod
    def build(cls, base: SamplingParams | None = None, **overrides: Any) -> SamplingParams:
        """`base` with the given keyword overrides; None values mean "keep the default"."""
        names = {f.name for f in fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {sorted(unknown)}; known: {sorted(names)}")
        return replace(base or cls(), **{k: v for k, v in overrides.items() if v is not None})


def _short(value: Any) -> str:
    """repr() cut to a readable length: the value may be a 5,000-digit number or 8,000 strings."""
    try:
        text = repr(value)
    except ValueError:  # past Python's int-to-string limit
        return f"<an integer of {value.bit_length()} bits>"
    return text if len(text) <= 60 else text[:57] + "..."


def _on(device: torch.device, values: list, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A few host values on `device` without waiting for it: a plain host-to-device copy on CUDA
    synchronizes the stream, one from pinned memory with `non_blocking` does not."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


class Sampler:
    """Samples one token per row for one batch composition (its rows' parameters, in order).

    The per-row tensors (penalty, temperature, top-k, top-p, which rows sample) are built once
    when rows join or leave, not at every step, and everything a step decides on the host
    (whether any row penalizes repeats, which rows sample) is known from the parameters: a step
    makes no host-to-device copy and no host sync. Each seeded row draws from its own generator
    (one `multinomial` each: a seed gives the same tokens alone or batched); unseeded rows draw
    together, from torch's default generator."""

    def __init__(self, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
                 device: torch.device) -> None:
        device = torch.device(device)
        self.penalty = None
        if any(p.repetition_penalty != 1 for p in params):
            self.penalty = _on(device, [[p.repetition_penalty] for p in params], torch.float32)
        random = [i for i, p in enumerate(params) if not p.greedy]
        self.any_random = bool(random)
        if not random:
            return
        sub = [params[i] for i in random]
        self.rows = _on(device, random)
        self.temperature = _on(device, [[p.temperature] for p in sub], torch.float32)
        self.top_k = _on(device, [[p.top_k or MAX_TOP_K + 1] for p in sub])  # 0: past any vocabulary
        self.top_p = _on(device, [[p.top_p] for p in sub], torch.float32)
        self.seeded = [(j, generators[i]) for j, i in enumerate(random) if generators[i] is not None]
        unseeded = [j for j, i in enumerate(random) if generators[i] is None]
        self.unseeded = _on(device, unseeded) if unseeded else None

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """(B, V) float32 logits and the (B, V) tokens each row has seen → (B,) tokens."""
        if self.penalty is not None:
            penalized = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
            logits = torch.where(seen, penalized, logits)
        tokens = logits.argmax(-1)
        if not self.any_random:
            return tokens
        x = logits.index_select(0, self.rows) / self.temperature
        x, order = x.sort(dim=-1, descending=True)
        rank = torch.arange(x.shape[-1], device=x.device)[None]
        x = x.masked_fill(rank >= self.top_k, float("-inf"))
        probs = x.softmax(-1)
        beyond_p = probs.cumsum(-1) - probs >= self.top_p
        probs = x.masked_fill(beyond_p, float("-inf")).softmax(-1)
        picks = torch.empty(probs.shape[0], 1, dtype=torch.long, device=probs.device)
        for j, generator in self.seeded:
            picks[j] = torch.multinomial(probs[j], 1, generator=generator)
        if self.unseeded is not None:
            picks.index_copy_(0, self.unseeded, torch.multinomial(probs.index_select(0, self.unseeded), 1))
        return tokens.index_copy(0, self.rows, order.gather(1, picks)[:, 0])


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], seen: torch.Tensor,
           generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row from (B, V) float32 logits, each row with its own parameters."""
    return Sampler(params, generators, logits.device)(logits, seen)


# What "strip surrounding white space" (docs/spec/cogvlm.md section 5) strips: ASCII white space only. A bare
# str.strip() would also take the control characters \x1c-\x1f and Unicode spaces off the ends
# of an answer, which then changes the history the next prompt replays.
WHITE_SPACE = " \t\n\r\v\f"


class TextStream:
    """Turns one row's token ids into text pieces as they arrive.

    Pieces are released only when they are complete UTF-8 (byte-fallback tokens can split a
    character) and cannot be the start of a stop string; surrounding white space is dropped. So
    the pieces always join to exactly `final_text(tokenizer, ids, stop)`.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self._prefix = self._read = 0  # decode window, so each step decodes a few tokens only
        self.text = ""
        self._emitted = 0
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        now = self.tokenizer.decode(self.ids[self._prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""  # an incomplete character: wait for its other bytes
        self.text += now[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        hit = _find_stop(self.text, self.stop, max(0, self._emitted - max(map(len, self.stop), default=0)))
        if hit is not None:
            self.text, self.stopped = self.text[:hit], True
            return self._release(len(self.text.rstrip(WHITE_SPACE)))
        held = self.text.rstrip(WHITE_SPACE)
        return self._release(len(held[:len(held) - _stop_prefix_len(held, self.stop)].rstrip(WHITE_SPACE)))

    def finish(self) -> str:
        """Whatever is held back once generation has ended."""
        tail = self.tokenizer.decode(self.ids[self._prefix:])[len(self.tokenizer.decode(self.ids[self._prefix:self._read])):]
        if tail and not self.stopped:
            self.text += tail
            hit = _find_stop(self.text, self.stop, 0)
            if hit is not None:
                self.text = self.text[:hit]
        self._prefix = self._read = len(self.ids)
        return self._release(len(self.text.rstrip(WHITE_SPACE)))

    def _release(self, end: int) -> str:
        start = self._emitted
        if start == 0:
            start = len(self.text) - len(self.text.lstrip(WHITE_SPACE))  # no leading white space
            if start >= end:
                return ""
        if end <= start:
            return ""
        self._emitted = end
        return self.text[start:end]


def _find_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that a stop string starts with."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def final_text(tokenizer: Tokenizer, ids: Sequence[int], stop: Sequence[str] = ()) -> str:
    """The answer: decoded, cut at the first stop string, stripped of white space (docs/spec/cogvlm.md section 5)."""
    text = tokenizer.decode(list(ids))
    hit = _find_stop(text, stop, 0)
    return (text if hit is None else text[:hit]).strip(WHITE_SPACE)


class BatchDecoder:
    """Decodes a batch after its prefill, one token per row per `step()`.

    Rows end at `</s>`, at their token budget, when the caller calls `finish(row)` (a stop
    string), or when sampling fails for that row alone (`failed`: the other rows go on). Ended
    rows are dropped from the cache, so they stop costing work.
    """

    def __init__(self, model: CogVLMForCausalLM, cache: KVCache, logits: torch.Tensor,
                 next_positions: torch.Tensor, params: Sequence[SamplingParams],
                 prompt_ids: torch.Tensor, budgets: Sequence[int]) -> None:
        self.model, self.cache, self.params = model, cache, list(params)
        self.logits = logits  # (B_active, V): logits for the next token of each active row
        self.next_positions = next_positions.to(model.device)
        self.budgets = list(budgets)
        self.active = list(range(len(params)))  # original row index of each cache row
        self.generated: list[list[int]] = [[] for _ in params]
        self.finished_by_eos = [False] * len(params)
        self.failed: dict[int, Exception] = {}  # rows whose own sampling failed (they end; the rest go on)
        self.seen = torch.zeros(len(params), model.config.vocab_size, dtype=torch.bool, device=model.device)
        self.seen.scatter_(1, prompt_ids.to(model.device).clamp(0, model.config.vocab_size - 1), True)
        self.generators = [None if p.seed is None else torch.Generator(model.device).manual_seed(p.seed)
                           for p in params]
        self._last: torch.Tensor | None = None  # tokens sampled at the previous step, not fed yet
        self._sampler: Sampler | None = None  # the active rows' sampling, rebuilt when they change
        self._ending: set[int] = set()
        self._joining: list[tuple[BatchDecoder, int]] = []

    @property
    def done(self) -> bool:
        return not self.active and not self._joining

    def join(self, other: BatchDecoder) -> list[int]:
        """Decode `other`'s rows (freshly prefilled) together with this batch from the next step
        on: continuous batching. Returns the row ids they get here."""
        base = len(self.params)
        self.params += other.params
        self.budgets += other.budgets
        self.generated += other.generated
        self.finished_by_eos += other.finished_by_eos
        self.generators += other.generators
        self._joining.append((other, base))
        return list(range(base, base + len(other.params)))

    def _merge_joining(self) -> None:
        for other, base in self._joining:
            rows = [base + r for r in other.active]
            if not self.active:  # nothing running: adopt the newcomer's state
                self.cache, self.logits, self.seen = other.cache, other.logits, other.seen
                self.next_positions, self.active = other.next_positions, rows
                continue
            remaining = max(self.budgets[r] - len(self.generated[r]) for r in self.active + rows)
            capacity = max(self.cache.length, other.cache.length) + remaining
            self.cache = type(self.cache).concat(self.cache, other.cache, capacity)  # (tensor parallel: on every rank)
            self.logits = torch.cat([self.logits, other.logits])
            self.seen = torch.cat([self.seen, other.seen])
            self.next_positions = torch.cat([self.next_positions, other.next_positions])
            self.active += rows
        self._joining = []
        self._sampler = None

    @property
    def ending(self) -> list[int]:
        """Rows that ended at the last step (`</s>`, budget or `finish`): their final text is due now."""
        return list(self._ending)

    def finish(self, row: int) -> None:
        self._ending.add(row)

    def forget(self, row: int) -> list[int]:
        """An ended row's tokens, handed over and dropped here with its generator, so that a batch
        that keeps admitting rows (the server's) does not grow with every request it served."""
        generated, self.generated[row], self.generators[row] = self.generated[row], [], None
        return generated

    @torch.no_grad()
    def step(self) -> dict[int, int]:
        """Sample one token for every active row; returns {row: token} (`</s>` excluded)."""
        if self._last is not None:
            self._advance()
        if self._joining:
            self._merge_joining()
        if not self.active:
            return {}
        params = [self.params[r] for r in self.active]
        generators = [self.generators[r] for r in self.active]
        states = [None if g is None else g.get_state() for g in generators]  # ~5 kB each: cheap
        try:
            if self._sampler is None:
                self._sampler = Sampler(params, generators, self.logits.device)
            tokens = self._sampler(self.logits, self.seen)
        except Exception:  # one row's trouble must not end the others: find it by sampling alone
            for g, state in zip(generators, states):
                if g is not None:  # rows sampled before the failure drew from their generators
                    g.set_state(state)
            tokens = self._sample_alone(params, generators)
        self.seen.scatter_(1, tokens[:, None], True)
        out = {}
        stops = self.model.config.stop_ids  # eos, and CogVLM2's <|eot_id|>
        for row, tok in zip(self.active, tokens.tolist()):  # the step's one host sync
            if row in self.failed:
                continue
            if tok in stops:
                self.finished_by_eos[row] = True
                self._ending.add(row)
                continue
            out[row] = tok
            self.generated[row].append(tok)
            if len(self.generated[row]) >= self.budgets[row]:
                self._ending.add(row)
        self._last = tokens
        return out

    def _sample_alone(self, params: list[SamplingParams], generators: list) -> torch.Tensor:
        """Sample row by row; rows that fail go to `failed` and end (their token is a placeholder)."""
        tokens = torch.zeros(len(self.active), dtype=torch.long, device=self.logits.device)
        for i, row in enumerate(self.active):
            try:
                tokens[i] = sample(self.logits[i:i + 1], params[i:i + 1], self.seen[i:i + 1], generators[i:i + 1])[0]
            except Exception as e:
                self.failed[row] = e
                self._ending.add(row)
        return tokens

    def _advance(self) -> None:
        """Drop ended rows, then feed the last sampled tokens to get the next logits."""
        tokens = self._last
        self._last = None
        if self._ending:
            keep = [i for i, r in enumerate(self.active) if r not in self._ending]
            self.active = [self.active[i] for i in keep]
            self._ending.clear()
            self._sampler = None
            if not keep:
                return
            self.cache.keep_rows(keep)  # in place, from the host's list
            idx = _on(self.model.device, keep)
            tokens, self.seen = tokens[idx], self.seen[idx]
            self.next_positions = self.next_positions[idx]
        self.logits = self.model.decode_step(tokens, self.next_positions, self.cache)
        self.next_positions = self.next_positions + 1

    def run(self, streams: Sequence[TextStream] | None = None) -> Iterable[tuple[int, str]]:
        """Decode to the end, yielding (row, text piece) as pieces become ready."""
        while not self.done:
            for row, tok in self.step().items():
                if streams is None:
                    continue
                piece = streams[row].push(tok)
                if streams[row].stopped:
                    self.finish(row)
                if piece:
                    yield row, piece
            if streams is not None:
                for row in self.ending:
                    piece = streams[row].finish()
                    if piece:
                        yield row, piece
