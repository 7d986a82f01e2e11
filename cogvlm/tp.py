"""Tensor parallelism: one model split across N processes (GPUs, or CPU processes over gloo).

The split is the authors' SAT model parallelism (and gpt-fast's `tp.py`), and `split_rule` in
`cogvlm.sharding` is its one table: every attention's heads are divided among the ranks (the
q/k/v rows of a head stay together, the output projection is split by its input columns), every
MLP by columns then rows, for both experts and for the ViT; the token embedding and the output
head are split over the vocabulary; the GLU adapter, norms, patch and position embeddings are
replicated (and so is CogAgent's high-resolution tower; its cross-attention splits by heads like
the others). Under grouped-query attention (CogVLM2) a rank takes 1/N of the query heads and 1/N
of the KV heads, the KV heads its query heads read (`row_blocks` sizes the fused QKV's blocks),
so attention stays local to the rank. So each rank holds 1/N of the weights (and of the KV
cache, by heads), and a row-split layer's partial outputs are summed by one all-reduce
(`_reduce_hook`): one per attention and one per MLP per decode step; in a prefill with an image
each expert reduces its own columns. The head's vocabulary parts are gathered before sampling.
NCCL carries the tensors on GPU, gloo on CPU: the same code.

Rank 0 runs the program (terminal, HTTP, files) with a `Driver`: every model call it makes
(prefill, decode step, cache allocation, rewinding, dropping or joining cache rows) is first
broadcast to the other ranks, which run the same call on their shard (`serve_rank`) and print
nothing. `CogVLM.from_pretrained(name, tp=N)` starts the other N-1 ranks itself (`load_parallel`), or
joins the ranks `torchrun --nproc_per_node N` started: then rank 0 returns the model and the
others serve it until rank 0 stops, and exit.

Two process groups: commands travel over the default (gloo, CPU) group, which waits for rank 0's
next command as long as a chat sits idle; activations over their own group (NCCL on GPU, gloo
on CPU) whose collectives give up after `LoadSpec.timeout` seconds (`--tp-timeout`). Commands
carry CPU tensors only (a CUDA tensor pickled by rank 0 would arrive on cuda:0 on every rank).
After each mirrored call the ranks agree on how it went (`_agree`): a failure on any rank ends
every rank, rank 0 with a `TensorParallelError` naming the rank and the cause, instead of the
group drifting out of step (the next command sent while a rank still waits in the failed
call's all-reduce) and hanging.
"""

from __future__ import annotations

import atexit
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, fields, is_dataclass, replace
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_weights, read_config, read_quant, resolve
from .config import CogVLMConfig
from .errors import TensorParallelError
from .model import Chunk, CogVLMForCausalLM, CrossAttention, KVCache, VisionAttention, VisionExpertAttention
from .options import TP_TIMEOUT, launched_by_torchrun
from .quantize import QuantConfig
from .sharding import check_split, rank_shape, split_rule

# Ranks wait for rank 0's next command as long as a chat sits idle: the command group's timeout
# must not end them (a dead rank is noticed by its closed connection or by the launcher's
# watchdog). The activations' group has its own, finite timeout (`LoadSpec.timeout`).
IDLE_TIMEOUT = timedelta(days=20)


# ---------------------------------------------------------------------------------------------
# One rank's share of the model
# ---------------------------------------------------------------------------------------------


class VocabParallelEmbedding(nn.Module):
    """Rows `start : start + V/N` of the token embedding; ids outside them look up zeros, and the
    all-reduce adds the one rank's row that holds each id (exact: the others add 0)."""

    def __init__(self, vocab: int, dim: int, rank: int, world: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab // world, dim))
        self.start = rank * (vocab // world)
        self.group: dist.ProcessGroup | None = None  # the activations' group (`install_collectives`)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        x = x.masked_fill(outside[..., None], 0)
        dist.all_reduce(x, group=self.group)
        return x


def _reduce_hook(group: dist.ProcessGroup, module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(out, group=group)
    return out


def _gather_hook(group: dist.ProcessGroup, module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(out) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, out.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class ParallelCogVLM(CogVLMForCausalLM):
    """Rank `rank` of `world`'s share: the same modules with 1/N of the heads, MLP width and
    vocabulary (local head counts in each attention's `num_heads`). Built on the meta device and
    filled by `load_weights(..., rank, world)`; `install_collectives` adds the all-reduces once
    the final modules are in place (after prepacking, which replaces the linear layers).
    `world` must divide the model (`check_split`): the load checked it once before any rank
    built its share, so this trusts it rather than checking again on every rank."""

    def __init__(self, cfg: CogVLMConfig, rank: int = 0, world: int = 1) -> None:
        super().__init__(cfg)
        self.rank, self.world = rank, world
        self.driver: Driver | None = None  # rank 0 only: sends each call to the other ranks
        for name, module in list(self.named_modules()):
            if isinstance(module, (VisionExpertAttention, VisionAttention, CrossAttention)):
                module.num_heads //= world
            if isinstance(module, VisionExpertAttention):
                module.num_kv_heads //= world
            if not isinstance(module, nn.Linear):
                continue
            if split_rule(name + ".weight") == "replicated":
                continue
            out_features, in_features = rank_shape(name + ".weight", module.weight.shape, world)
            parent, _, child = name.rpartition(".")
            setattr(self.get_submodule(parent), child, nn.Linear(
                in_features, out_features, bias=module.bias is not None, device=module.weight.device))
        self.model.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, rank, world)
        self.local_config = replace(cfg, num_heads=cfg.num_heads // world,
                                    num_key_value_heads=cfg.num_key_value_heads // world,
                                    hidden_size=cfg.hidden_size // world)  # the KV cache's shape

    def row_parallel(self) -> list[str]:
        """Names of the layers whose outputs are partial sums (split by input columns)."""
        return [name for name, m in self.named_modules()
                if "." in name and split_rule(name + ".weight") == "dim1" and not list(m.children())]

    def keep_bias_once(self) -> None:
        """A row-split layer's bias is added on rank 0 only, so the all-reduce adds it once."""
        if self.rank:
            for name in self.row_parallel():
                bias = getattr(self.get_submodule(name), "bias", None)
                if bias is not None:
                    bias.data.zero_()

    def install_collectives(self, group: dist.ProcessGroup) -> None:
        """All-reduces and the head's gather, on `group` (the activations' group, whose
        collectives time out instead of waiting for a failed rank for ever)."""
        for name in self.row_parallel():
            self.get_submodule(name).register_forward_hook(partial(_reduce_hook, group))
        self.lm_head.register_forward_hook(partial(_gather_hook, group))
        self.model.embed_tokens.group = group

    # ---- the calls rank 0 mirrors on the other ranks ---------------------------------------
    def new_cache(self, batch: int, max_len: int) -> KVCache:
        with self._mirrored("new_cache", batch, max_len) as new_id:
            cache = KVCache(batch, max_len, self.local_config, self.dtype, self.device)
        return cache if self.driver is None else self.driver.track(cache, new_id)

    def forward(self, chunk: Chunk, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        with self._mirrored("forward", chunk, cache, last_only):
            return super().forward(chunk, cache, last_only)

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        with self._mirrored("decode_step", tokens, positions, cache):
            return super().decode_step(tokens, positions, cache)

    @contextmanager
    def _mirrored(self, op: str, *args: Any) -> Iterator[int | None]:
        if self.driver is None:
            yield None
        else:
            with self.driver.command(op, *args) as new_id:
                yield new_id

    def close(self) -> None:
        """Stop the other ranks (rank 0; nothing to do elsewhere)."""
        if self.driver is not None:
            self.driver.close()


# ---------------------------------------------------------------------------------------------
# Rank 0's driver and the other ranks' loop
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CacheRef:
    """A KV cache named in a command: each rank looks up its own shard of it."""

    id: int


class ParallelCache(KVCache):
    """Rank 0's shard of a KV cache; changes to it are mirrored on every rank."""

    driver: Driver
    id: int

    def rewind(self, length: int) -> None:
        with self.driver.command("rewind", self, length):
            super().rewind(length)

    def keep_rows(self, rows: torch.Tensor) -> None:
        with self.driver.command("keep_rows", self, rows):
            super().keep_rows(rows)

    @staticmethod
    def concat(a: KVCache, b: KVCache, capacity: int) -> KVCache:
        driver = a.driver  # type: ignore[attr-defined]
        with driver.command("concat", a, b, capacity) as new_id:
            out = KVCache.concat(a, b, capacity)
        return driver.track(out, new_id)


class Driver:
    """Rank 0's side: broadcasts each call before running it locally, one at a time (the server
    and web threads share it), with Ctrl-C held back until the call is done everywhere, so
    every rank always runs the same collectives in the same order. A call that fails on any
    rank (`_agree`) stops every rank: the driver raises `TensorParallelError` then and for
    every later call."""

    def __init__(self, procs: list[subprocess.Popen] | None = None, threads: int | None = None) -> None:
        self.procs = procs or []  # the ranks we started (none under torchrun)
        self.threads = threads  # this process's thread count before it shared the cores
        self.lock = threading.RLock()
        self.ids = itertools.count(1)
        self.dropped: deque[int] = deque()  # caches rank 0 let go of; the others free theirs next call
        self.closed = False
        self.failure: str | None = None  # why the ranks stopped, when a call failed on one of them
        self._busy = self._interrupted = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        if self.procs:
            threading.Thread(target=self._watch, name="cogvlm-tp-watchdog", daemon=True).start()
        atexit.register(self.close)

    def track(self, cache: KVCache, new_id: int) -> ParallelCache:
        cache.__class__ = ParallelCache
        cache.driver, cache.id = self, new_id
        weakref.finalize(cache, self.dropped.append, new_id)  # (deque: safe from any thread)
        return cache  # type: ignore[return-value]

    @contextmanager
    def command(self, op: str, *args: Any) -> Iterator[int]:
        """Send `op(*args)` to the other ranks, run the body (rank 0's share of the call), then
        agree with them on how it went. The same input error on every rank (a full cache: each
        rank raised it before any collective) is raised as it is and the ranks go on; any other
        failure, on any rank, stops them all and raises `TensorParallelError` naming the rank."""
        with self.lock:
            if self.closed:
                raise TensorParallelError(self.failure or "the tensor-parallel ranks were stopped (close() was called)")
            new_id = next(self.ids)
            dropped = [self.dropped.popleft() for _ in range(len(self.dropped))]
            sent = [_CacheRef(a.id) if isinstance(a, ParallelCache) else _moved(a, torch.device("cpu")) for a in args]
            # Ctrl-C reaches the main thread only: hold it back while that thread is mid-call
            self._busy = threading.current_thread() is threading.main_thread()
            error: Exception | None = None
            try:
                _lost_peer_is_fatal(_broadcast, (dropped, op, new_id, sent))
                try:
                    yield new_id
                except Exception as e:  # reported to every rank first: they may wait in its collectives
                    error = e
                why = _lost_peer_is_fatal(_agree, op, error)
                if why is not None:
                    self._stop(why)
                    raise TensorParallelError(why) from error
                if error is not None:
                    raise error
            finally:
                self._busy = False
        if self._interrupted:
            self._interrupted = False
            raise KeyboardInterrupt

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._busy:
            self._interrupted = True  # raised once every rank has finished this call
        elif callable(self._previous):
            self._previous(signum, frame)
        else:
            raise KeyboardInterrupt

    def _watch(self) -> None:
        """A rank that dies ends rank 0 at once with a message, instead of a hang."""
        while not self.closed:
            for rank, proc in enumerate(self.procs, 1):
                code = proc.poll()
                if code is not None and not self.closed:
                    why = f"signal {-code}" if code < 0 else f"exit code {code}"
                    print(f"cogvlm: tensor-parallel rank {rank} (pid {proc.pid}) stopped ({why}); "
                          f"stopping the others", file=sys.stderr, flush=True)
                    for other in self.procs:
                        if other.poll() is None:
                            other.kill()
                    os._exit(1)
            time.sleep(0.2)

    def close(self) -> None:
        """Tell the other ranks to exit, wait for them, and leave the process group."""
        with self.lock:
            if self.closed:
                return
            self._stop(None)

    def _stop(self, failure: str | None) -> None:
        """Mark the driver closed (before any rank exits: the watchdog would take a rank that
        stops after a failure for a crash), send the ranks "stop", and wait for them."""
        self.closed, self.failure = True, failure
        try:
            if dist.is_initialized():
                _broadcast(([], "stop", 0, []))
        except RuntimeError:
            pass  # a rank is already gone: nothing left to tell
        self._end(wait=30)

    def abort(self) -> None:
        """Kill the other ranks at once (start-up failed or was interrupted)."""
        self.closed = True
        self._end(wait=0)

    def _end(self, wait: float) -> None:
        for proc in self.procs:
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if dist.is_initialized():
            dist.destroy_process_group()
        if self.threads:
            torch.set_num_threads(self.threads)


def _is_comm_error(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, dist.DistBackendError) or any(
        w in text for w in ("connection", "gloo", "nccl", "broken pipe", "peer", "timed out"))


def _lost_peer_is_fatal(call: Any, *args: Any) -> Any:
    """`call(*args)` on the command group, where a lost peer (torch.distributed reports it as a
    RuntimeError) becomes a `TensorParallelError`."""
    try:
        return call(*args)
    except RuntimeError as e:
        if isinstance(e, TensorParallelError) or not _is_comm_error(e):
            raise
        raise TensorParallelError(f"tensor-parallel communication failed; another rank "
                                  f"stopped ({str(e).splitlines()[0]})") from None


def _moved(obj: Any, device: torch.device) -> Any:
    """`obj` with every tensor in it (in lists, tuples and dataclasses such as `Chunk`) on
    `device`. Rank 0 sends CPU tensors (pickled CUDA tensors would arrive on cuda:0 on every
    rank, opening a CUDA context there and mixing devices); each rank moves them to its own."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_moved(x, device) for x in obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: _moved(getattr(obj, f.name), device) for f in fields(obj) if f.init})
    return obj


class _Report(NamedTuple):
    """How a call failed on one rank, as the others learn it."""

    kind: str  # the exception's class name
    text: str  # its message's first line
    input_error: bool  # a ValueError: an input check, made the same way on every rank
    comm: bool  # a collective failed (timed out, peer gone): a consequence, not a cause


def _agree(op: str, error: Exception | None) -> str | None:
    """After each mirrored call every rank says how it went, on the command group: one small
    all-reduce, and the reports gathered only when a rank failed. Returns None while the ranks
    are still in step (no failure, or the same input error on every rank: each raised it
    before any collective), else the one line that ends them all: the first rank that failed
    for a reason of its own (not because a collective timed out waiting for it) and why."""
    flag = torch.tensor([0 if error is None else 1])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return None
    mine = None if error is None else _Report(type(error).__name__, (str(error).splitlines() or [""])[0],
                                               isinstance(error, ValueError), _is_comm_error(error))
    reports: list[_Report | None] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, mine)
    failed = [(rank, r) for rank, r in enumerate(reports) if r is not None]
    if len(failed) == len(reports) and all(r == failed[0][1] for _, r in failed) and failed[0][1].input_error:
        return None
    rank, report = next(((rank, r) for rank, r in failed if not r.comm), failed[0])
    return f"tensor-parallel rank {rank} failed in {op}: {report.kind}: {report.text}"


def _broadcast(message: Any, src: int = 0) -> Any:
    """`message` from rank `src` to every rank, over the CPU (gloo) whatever the device."""
    box = [message]
    dist.broadcast_object_list(box, src=src, device=torch.device("cpu"))
    return box[0]


def serve_rank(model: ParallelCogVLM) -> int:
    """The other ranks' loop: run rank 0's calls on this shard until told to stop. Returns the
    exit code: 1 when a call failed on some rank (rank 0 raises why, then sends "stop")."""
    caches: dict[int, KVCache] = {}
    while True:
        dropped, op, new_id, args = _broadcast(None)
        for cache_id in dropped:
            caches.pop(cache_id, None)
        if op == "stop":
            return 0
        args = [caches[a.id] if isinstance(a, _CacheRef) else _moved(a, model.device) for a in args]
        error: Exception | None = None
        try:
            if op == "new_cache":
                caches[new_id] = model.new_cache(*args)
            elif op == "concat":
                caches[new_id] = KVCache.concat(*args)
            elif op in ("rewind", "keep_rows"):
                getattr(args[0], op)(*args[1:])
            else:  # forward, decode_step: the results are rank 0's
                getattr(model, op)(*args)
        except Exception as e:  # rank 0 learns it from `_agree` and reports it
            error = e
        if _agree(op, error) is not None:
            _broadcast(None)  # rank 0's "stop", sent once it has marked the ranks stopped
            return 1


# ---------------------------------------------------------------------------------------------
# Starting the ranks and loading each one's share
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadSpec:
    """What every rank loads: sent by rank 0, so all ranks load the same thing."""

    folder: str
    dtype: torch.dtype
    device_type: str
    prepack: bool
    quant: QuantConfig | None = None  # quantize each rank's slices while loading
    timeout: float = TP_TIMEOUT  # seconds a collective of a call waits for the other ranks


def rank_device(device_type: str) -> torch.device:
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if device_type == "cuda" else torch.device("cpu")


def load_rank(spec: LoadSpec, rank: int, world: int, group: dist.ProcessGroup) -> ParallelCogVLM:
    """This rank's slices from the checkpoint: no rank reads (or holds) the whole model. Its
    collectives run on `group` (`_activation_group`)."""
    device = rank_device(spec.device_type)
    folder = Path(spec.folder)
    model = load_weights(folder, read_config(folder), spec.dtype, device, rank, world,
                         build=partial(ParallelCogVLM, rank=rank, world=world), quant=spec.quant)
    model.keep_bias_once()
    if spec.prepack:
        from .quantize import prepack_model

        model = prepack_model(model)
    model.install_collectives(group)
    return model


def _join_group(rank: int, world: int, address: str | None = None) -> None:
    """The command group: commands, load errors and each call's status, over gloo (CPU)."""
    dist.init_process_group("gloo", init_method=address or "env://", rank=rank, world_size=world,
                            timeout=IDLE_TIMEOUT)


def _activation_group(spec: LoadSpec) -> dist.ProcessGroup:
    """The activations' group (every rank calls this, in the same order): NCCL on GPUs, gloo on
    CPU, with `spec.timeout`, so a collective whose peer failed gives up and the ranks can
    agree on what happened (`_agree`) instead of waiting for ever."""
    if spec.device_type == "cuda":
        torch.cuda.set_device(rank_device("cuda"))  # before NCCL meets the device
    return dist.new_group(backend="nccl" if spec.device_type == "cuda" else "gloo",
                          timeout=timedelta(seconds=spec.timeout))


def _share_threads(world: int) -> None:
    """On CPU the ranks share the cores: without this each would start a thread per core."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_parallel(name_or_path: str | Path, world: int, dtype: torch.dtype, device: torch.device,
                  prepack: bool, quant: QuantConfig | None = None, config: CogVLMConfig | None = None,
                  timeout: float = TP_TIMEOUT) -> tuple[ParallelCogVLM, Path]:
    """Rank 0's share, with the other ranks loading theirs: started here, or (under torchrun)
    already running this same call, in which case ranks > 0 serve and never return. With
    `quant`, each rank quantizes its float slices as they stream in (a row-split layer's int4
    groups then lie within one rank's columns: the same groups as on one device when the split
    width divides by the group size). `config`: the folder's, given by a caller that has already
    run `check_split` on it for `world` (`CogVLM.from_pretrained` does, before planning); without
    it the folder's is read and checked here, before any rank starts. Either way the split is
    checked once per load: the ranks' `ParallelCogVLM`s trust it. `timeout`: seconds a
    collective waits for the other ranks before the call fails (`--tp-timeout`)."""
    if device.type not in ("cpu", "cuda") or device.index not in (None, 0):
        raise TensorParallelError(f"tensor parallelism runs on 'cpu' or 'cuda' (ranks use cuda:0..N-1; pick "
                                  f"the GPUs with CUDA_VISIBLE_DEVICES), not {device}")
    folder = resolve(name_or_path)
    if config is None:
        check_split(read_config(folder), world)
    if read_quant(folder) is not None:
        raise TensorParallelError(f"{folder} is a quantized checkpoint, which loads on one device; for tp={world} "
                                  f"load the float checkpoint with quantization (--quant), each rank quantizing "
                                  f"its share")
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise TensorParallelError(f"tp={world} needs {world} GPUs; {torch.cuda.device_count()} are visible")
    if dist.is_initialized():
        raise TensorParallelError("this process already runs a tensor-parallel model (one per process); "
                                  "close() it first")
    spec = LoadSpec(str(folder), dtype, device.type, prepack, quant, timeout)
    procs: list[subprocess.Popen] = []
    rank, address = 0, None
    if launched_by_torchrun() is None:
        port = _free_port()
        address = f"tcp://127.0.0.1:{port}"
        for r in range(1, world):
            env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "COGVLM_TP_DEVICE": device.type}
            procs.append(subprocess.Popen([sys.executable, "-c", WORKER], env=env, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL))
    elif launched_by_torchrun() != world:
        raise TensorParallelError(f"tp={world} but torchrun started {launched_by_torchrun()} processes; "
                                  f"leave --tp out under torchrun, or make them equal")
    else:
        rank = int(os.environ["RANK"])
    threads = torch.get_num_threads()
    if device.type == "cpu":
        _share_threads(world)
    if rank:
        _join_group(rank, world)
        sys.exit(_worker(world))
    driver = Driver(procs, threads)  # from here on, a rank that dies ends this process with a message
    try:
        _join_group(0, world, address)
        _broadcast(spec)
        model, error = _load_or_error(spec, 0, world, _activation_group(spec))
        errors = _exchange(error)
    except BaseException:
        driver.abort()
        raise
    if error is not None or any(errors):
        driver.close()
        if error is not None:
            raise error
        rank, why = next((r, e) for r, e in enumerate(errors) if e)
        raise TensorParallelError(f"tensor-parallel rank {rank} could not load its share: {why}")
    model.driver = driver
    return model, folder


def _load_or_error(spec: LoadSpec, rank: int, world: int,
                   group: dist.ProcessGroup) -> tuple[ParallelCogVLM | None, Exception | None]:
    try:
        return load_rank(spec, rank, world, group), None
    except Exception as e:  # reported by rank 0 after every rank has tried
        return None, e


def _exchange(error: Exception | None) -> list[str | None]:
    """Every rank's load error (None: loaded), known to every rank."""
    mine = None if error is None else f"{type(error).__name__}: {error}"
    return [_broadcast(mine if r == dist.get_rank() else None, src=r) for r in range(dist.get_world_size())]


def _worker(world: int) -> int:
    """A rank > 0: silent (its output would interleave with rank 0's), deaf to Ctrl-C (rank 0
    decides when to stop), and gone when its parent is."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdout = open(os.devnull, "w")
    spec: LoadSpec = _broadcast(None)
    model, error = _load_or_error(spec, dist.get_rank(), world, _activation_group(spec))
    if any(_exchange(error)):
        _broadcast(None)  # rank 0's stop
        code = 0
    else:
        code = serve_rank(model)
    if code == 0:
        dist.destroy_process_group()
        return 0
    # After a failure a collective may still be pending: leave without waiting on it, and without
    # the interpreter's teardown, where gloo's threads still holding its work abort the process.
    sys.stderr.flush()
    os._exit(code)


def _exit_with_parent() -> None:
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


WORKER = "import sys, cogvlm.tp; sys.exit(cogvlm.tp.main())"  # (not -m: the classes must be cogvlm.tp's)


def main() -> int:
    """Entry of a rank that `load_parallel` starts."""
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    world, device_type = int(os.environ["WORLD_SIZE"]), os.environ["COGVLM_TP_DEVICE"]
    if device_type == "cpu":
        _share_threads(world)
    _join_group(int(os.environ["RANK"]), world)
    return _worker(world)

