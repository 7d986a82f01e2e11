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
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_weights, read_config, read_quant, resolve
from .config import CogVLMConfig
from .errors import TensorParallelError
from .model import Chunk, CogVLMForCausalLM, CrossAttention, KVCache, VisionAttention, VisionExpertAttention
from .options import launched_by_torchrun
from .quantize import QuantConfig
from .sharding import check_split, rank_shape, split_rule

# Ranks wait for rank 0's next command as long as a chat sits idle: the group's timeout must not
# end them (a dead rank is noticed by its closed connection or by the launcher's watchdog)
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

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        x = x.masked_fill(outside[..., None], 0)
        dist.all_reduce(x)
        return x


def _reduce_hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(out)
    return out


def _gather_hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(out) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, out.contiguous())
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

    def install_collectives(self) -> None:
        for name in self.row_parallel():
            self.get_submodule(name).register_forward_hook(_reduce_hook)
        self.lm_head.register_forward_hook(_gather_hook)

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
    every rank always runs the same collectives in the same order."""

    def __init__(self, procs: list[subprocess.Popen] | None = None, threads: int | None = None) -> None:
        self.procs = procs or []  # the ranks we started (none under torchrun)
        self.threads = threads  # this process's thread count before it shared the cores
        self.lock = threading.RLock()
        self.ids = itertools.count(1)
        self.dropped: deque[int] = deque()  # caches rank 0 let go of; the others free theirs next call
        self.closed = False
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
        with self.lock:
            if self.closed:
                raise TensorParallelError("the tensor-parallel ranks were stopped (close() was called)")
            new_id = next(self.ids)
            dropped = [self.dropped.popleft() for _ in range(len(self.dropped))]
            sent = [_CacheRef(a.id) if isinstance(a, ParallelCache) else a for a in args]
            # Ctrl-C reaches the main thread only: hold it back while that thread is mid-call
            self._busy = threading.current_thread() is threading.main_thread()
            try:
                _broadcast((dropped, op, new_id, sent))
                yield new_id
            except RuntimeError as e:  # torch.distributed reports a lost peer as RuntimeError
                if isinstance(e, TensorParallelError) or not _is_comm_error(e):
                    raise
                raise TensorParallelError(f"tensor-parallel communication failed; another rank "
                                          f"stopped ({str(e).splitlines()[0]})") from None
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
            self.closed = True
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
        w in text for w in ("connection", "gloo", "nccl", "broken pipe", "peer"))


def _broadcast(message: Any, src: int = 0) -> Any:
    """`message` from rank `src` to every rank, over the CPU (gloo) whatever the device."""
    box = [message]
    dist.broadcast_object_list(box, src=src, device=torch.device("cpu"))
    return box[0]


def serve_rank(model: ParallelCogVLM) -> None:
    """The other ranks' loop: run rank 0's calls on this shard until told to stop."""
    caches: dict[int, KVCache] = {}
    while True:
        dropped, op, new_id, args = _broadcast(None)
        for cache_id in dropped:
            caches.pop(cache_id, None)
        if op == "stop":
            return
        args = [caches[a.id] if isinstance(a, _CacheRef) else a for a in args]
        try:
            if op == "new_cache":
                caches[new_id] = model.new_cache(*args)
            elif op == "concat":
                caches[new_id] = KVCache.concat(*args)
            elif op in ("rewind", "keep_rows"):
                getattr(args[0], op)(*args[1:])
            else:  # forward, decode_step: the results are rank 0's
                getattr(model, op)(*args)
        except ValueError:
            pass  # an input check (cache full, ...): rank 0 raised the same before any collective


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


def rank_device(device_type: str) -> torch.device:
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if device_type == "cuda" else torch.device("cpu")


def load_rank(spec: LoadSpec, rank: int, world: int) -> ParallelCogVLM:
    """This rank's slices from the checkpoint: no rank reads (or holds) the whole model."""
    device = rank_device(spec.device_type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    folder = Path(spec.folder)
    model = load_weights(folder, read_config(folder), spec.dtype, device, rank, world,
                         build=partial(ParallelCogVLM, rank=rank, world=world), quant=spec.quant)
    model.keep_bias_once()
    if spec.prepack:
        from .quantize import prepack_model

        model = prepack_model(model)
    model.install_collectives()
    return model


def _join_group(rank: int, world: int, device_type: str, address: str | None = None) -> None:
    """Commands and small objects always go over gloo (CPU); activations over NCCL on GPUs."""
    backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=address or "env://", rank=rank, world_size=world,
                            timeout=IDLE_TIMEOUT)


def _share_threads(world: int) -> None:
    """On CPU the ranks share the cores: without this each would start a thread per core."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_parallel(name_or_path: str | Path, world: int, dtype: torch.dtype, device: torch.device,
                  prepack: bool, quant: QuantConfig | None = None,
                  config: CogVLMConfig | None = None) -> tuple[ParallelCogVLM, Path]:
    """Rank 0's share, with the other ranks loading theirs: started here, or (under torchrun)
    already running this same call, in which case ranks > 0 serve and never return. With
    `quant`, each rank quantizes its float slices as they stream in (a row-split layer's int4
    groups then lie within one rank's columns: the same groups as on one device when the split
    width divides by the group size). `config`: the folder's, given by a caller that has already
    run `check_split` on it for `world` (`CogVLM.from_pretrained` does, before planning); without
    it the folder's is read and checked here, before any rank starts. Either way the split is
    checked once per load: the ranks' `ParallelCogVLM`s trust it."""
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
    spec = LoadSpec(str(folder), dtype, device.type, prepack, quant)
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
        _join_group(rank, world, device.type)
        sys.exit(_worker(world))
    driver = Driver(procs, threads)  # from here on, a rank that dies ends this process with a message
    try:
        _join_group(0, world, device.type, address)
        _broadcast(spec)
        model, error = _load_or_error(spec, 0, world)
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


def _load_or_error(spec: LoadSpec, rank: int, world: int) -> tuple[ParallelCogVLM | None, Exception | None]:
    try:
        return load_rank(spec, rank, world), None
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
    model, error = _load_or_error(spec, dist.get_rank(), world)
    if any(_exchange(error)):
        _broadcast(None)  # rank 0's stop
    else:
        serve_rank(model)
    dist.destroy_process_group()
    return 0


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
    _join_group(int(os.environ["RANK"]), world, device_type)
    return _worker(world)

