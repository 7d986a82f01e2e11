"""Finding, reading, checking and writing CogVLM checkpoints (docs/spec/cogvlm.md section 7).

Two layouts are read: Hugging Face (config.json + sharded safetensors, or pytorch_model*.bin
torch pickles, possibly bitsandbytes 4-bit as the CogVLM2 int4 copies) and the authors' SAT
(model_config.json + latest + <iter>/mp_rank_XX_model_states.pt, possibly several ranks).
Both become one stream of Hugging Face-named tensors, checked against the model's expected
names and shapes. `load_model` builds the model on the meta device and assigns tensors in the
target dtype/device as they stream in (safetensors shards tensor by tensor, with plain file reads,
not memory-mapped), so peak memory stays the loaded model plus about one tensor. With `quant`,
each selected Linear's weight is quantized on the target device as it arrives, so a 4-bit load
never holds the full-precision model; a checkpoint written by `quantize_checkpoint` loads its
packed tensors directly.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from collections import deque
from typing import Callable, Iterable, Iterator, NamedTuple, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .bnb import Bnb4bitError, unpack_state
from .config import REGISTRY, CogVLMConfig, ConfigError, from_hf_config, from_sat_config, registry_entry
from .errors import CheckpointError, WriteError
from .model import CogVLMForCausalLM
from .quantize import (Int4Linear, Int8Linear, QuantConfig, QuantError, check_cuda_capability, fill, quantize_layout,
                       quantize_tensors)
from .sharding import Split
from .tokenizer import TOKENIZER_FILE, TOKENIZER_FILES, VICUNA_REPO, tokenizer_file

HF_CONFIG = "config.json"
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
SAT_CONFIG = "model_config.json"
HUB_PATTERNS = ["config.json", "*.safetensors", HF_INDEX, *TOKENIZER_FILES]
BIN_PATTERNS = ["config.json", "pytorch_model*.bin", BIN_INDEX, *TOKENIZER_FILES]  # e.g. the CogVLM2 int4 repos


# ---------------------------------------------------------------------------------------------
# Locating a checkpoint
# ---------------------------------------------------------------------------------------------


def resolve(name_or_path: str | Path) -> Path:
    """A local folder as is; a registry name or hub id through the Hugging Face cache."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the checkpoint *folder* "
                                  f"(with {HF_CONFIG} or {SAT_CONFIG})")
        return path
    name = str(name_or_path)
    entry = registry_entry(name)
    if entry is not None and entry.local_dir is not None:
        local = entry.local_dir
        if not (local / HF_CONFIG).is_file():
            raise CheckpointError(f"{name} should ship inside the package at {local}, but it is missing; "
                                  f"reinstall cogvlm (pip install .) or pass --model FOLDER")
        return local
    repo = entry.hf_repo if entry is not None else name
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo or ""):
        known = ", ".join(REGISTRY)
        raise CheckpointError(f"unknown model {name!r}: not a folder, a registry name ({known}) "
                              f"or a Hugging Face repo id like THUDM/cogvlm-chat-hf")
    return _download(repo)


def registry_template(name_or_path: str | Path) -> str | None:
    """The template of the registry model `name_or_path` names (None for a folder, or a name the
    registry lacks): what a load by name talks in, whatever its config.json's `template_version`."""
    if Path(name_or_path).expanduser().exists():
        return None
    entry = registry_entry(str(name_or_path))
    return None if entry is None or entry.config is None else entry.config.template


def _download(repo: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo, allow_patterns=HUB_PATTERNS))
        if not any(folder.glob("*.safetensors")):  # a repo of torch pickles only
            folder = Path(snapshot_download(repo, allow_patterns=BIN_PATTERNS))
        return folder
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "HF_HUB_OFFLINE is set" if offline else f"the hub could not be reached ({type(e).__name__})"
        raise CheckpointError(
            f"cannot get {repo}: {why} and it is not in the local Hugging Face cache. On a machine with "
            f"internet run `hf download {repo} --local-dir DIR` ({HF_CONFIG}, {HF_INDEX} and the shards it "
            f"lists) and, for CogVLM v1 checkpoints, which ship no tokenizer, `hf download {VICUNA_REPO} "
            f"{TOKENIZER_FILE} --local-dir DIR`; then pass the folder: --model /path/to/folder") from None


def layout_of(folder: Path) -> str:
    if (folder / HF_CONFIG).is_file():
        return "hf"
    if (folder / SAT_CONFIG).is_file():
        return "sat"
    raise CheckpointError(f"{folder} holds neither {HF_CONFIG} (Hugging Face layout) nor "
                          f"{SAT_CONFIG} (SAT layout); is it a CogVLM checkpoint folder?")


def read_config(folder: Path) -> CogVLMConfig:
    try:
        if layout_of(folder) == "hf":
            return from_hf_config(folder / HF_CONFIG)
        return from_sat_config(folder / SAT_CONFIG)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Reading tensors, Hugging Face names, group by group
# ---------------------------------------------------------------------------------------------


def read_quant(folder: Path) -> QuantConfig | None:
    """How a checkpoint's weights are quantized (config.json's "quantization"), None for float ones."""
    if layout_of(folder) != "hf":
        return None
    try:
        config = json.loads((folder / HF_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{folder / HF_CONFIG} is not valid JSON: {e}") from None
    entry = config.get("quantization") if isinstance(config, dict) else None  # read_config reports the rest
    if entry is None:
        return None
    try:
        return QuantConfig.from_dict(entry)
    except (QuantError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{folder / HF_CONFIG} has an unreadable quantization entry {entry!r}: {e}") from None


def iter_tensors(folder: Path, device: str = "cpu", rank: int = 0, world: int = 1,
                 rope_buffers: bool = False, config: CogVLMConfig | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the checkpoint's tensors in groups (one shard or one SAT state at a time): whole,
    or with `world` > 1 only tensor-parallel rank `rank`'s part of each (see `split_rule`; the
    folder's `config`, read when not given, says how its QKV blocks are sized).
    Derived buffers are left out (recomputed), except the decoder's `rotary_emb.inv_freq` with
    `rope_buffers`: CogVLM2 rotates with the stored ones (v1 copies that hold them are read
    without, docs/spec/cogvlm.md section 7)."""
    config = config or read_config(folder)
    if layout_of(folder) == "hf":
        groups = _iter_hf(folder, device, Split(config, rank, world))
    else:
        groups = iter([_read_sat(folder, Split(config, rank, world))])
    for group in groups:
        yield {k: v for k, v in group.items() if not derived(k, rope_buffers)}


def _hf_shards(folder: Path) -> list[Path]:
    index, single = (HF_INDEX, HF_SINGLE)
    if not (folder / HF_INDEX).is_file() and not (folder / HF_SINGLE).is_file() and (
            (folder / BIN_INDEX).is_file() or (folder / BIN_SINGLE).is_file()):
        index, single = BIN_INDEX, BIN_SINGLE  # torch pickles, as the CogVLM2 int4 repos ship
    if (folder / index).is_file():
        try:
            weight_map = json.loads((folder / index).read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{folder / index} is not a valid index: {type(e).__name__}: {e}") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{folder / index} is not a valid index: its weight_map is not an object")
        shards = [folder / _shard_name(f, folder) for f in dict.fromkeys(weight_map.values())]
    else:
        shards = [folder / single]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise CheckpointError(f"{folder} lacks {len(missing)} weight file(s): {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}")
    return shards


_BUFFERS = ("inv_freq", "rope.freqs_cos", "rope.freqs_sin")  # derived: recomputed, never read


def derived(name: str, rope_buffers: bool = False) -> bool:
    """A stored buffer the model recomputes, so never reads (see `iter_tensors`)."""
    return name.endswith(_BUFFERS) and not (rope_buffers and name.endswith("rotary_emb.inv_freq"))


def _shard_name(name: object, folder: Path) -> str:
    """A weight_map entry, if it names a file inside the checkpoint folder (not ../x, not /etc/x)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{folder / HF_INDEX} names the weight file {json.dumps(name)[:80]}, which is not "
                              f"inside the checkpoint folder")
    return name


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _safetensors_entries(f) -> list[tuple[str, torch.dtype, list[int], int, int]]:
    """(name, dtype, shape, first byte, byte count) of each tensor in the open file `f`, in file
    order, each checked to lie inside the file."""
    size = os.fstat(f.fileno()).st_size
    n = int.from_bytes(f.read(8), "little")
    if n + 8 > size:
        raise ValueError(f"header of {n} bytes does not fit in a file of {size}")
    header = json.loads(f.read(n))
    base = 8 + n
    out = []
    for name, info in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                             key=lambda kv: kv[1]["data_offsets"][0]):
        dtype, shape = _SAFETENSORS_DTYPES[info["dtype"]], info["shape"]
        begin, end = info["data_offsets"]
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or base + end > size:
            raise ValueError(f"tensor {name} needs bytes {begin}..{end} of the data, past the "
                             f"end of the file or not {nbytes} long (truncated?)")
        out.append((name, dtype, shape, base + begin, nbytes))
    return out


def _read_bytes(f, start: int, nbytes: int, name: str) -> torch.Tensor:
    buf = torch.empty(nbytes, dtype=torch.uint8)
    f.seek(start)
    if nbytes and f.readinto(buf.numpy()) != nbytes:
        raise ValueError(f"file ended inside tensor {name}")
    return buf


def _read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in file order, each read into fresh memory with one plain file read.

    Not memory-mapped on purpose: the pages of a mapped shard count as the process's memory
    until the whole file is closed, so a mapped read peaks at the model plus one shard, this one
    at the model plus one tensor (what a quantizing load needs to stay small)."""
    with open(path, "rb") as f:
        for name, dtype, shape, start, nbytes in _safetensors_entries(f):
            yield name, _read_bytes(f, start, nbytes, name).view(dtype).view(shape)


class StoredTensor(NamedTuple):
    """Where a tensor lies in a safetensors shard: what `read_rows` needs to read part of it."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset in the file


def safetensors_index(folder: Path) -> dict[str, StoredTensor]:
    """Every tensor of a safetensors checkpoint and where it lies, from the shards' headers
    alone (no tensor data is read). Other layouts are a CheckpointError: partial reads need
    safetensors' plain row-major layout."""
    if layout_of(folder) != "hf" or any(s.suffix != ".safetensors" for s in _hf_shards(folder)):
        raise CheckpointError(f"{folder} is not a safetensors checkpoint; convert it first (cogvlm convert)")
    index = {}
    for shard in _hf_shards(folder):
        try:
            with open(shard, "rb") as f:
                for name, dtype, shape, start, _ in _safetensors_entries(f):
                    index[name] = StoredTensor(shard, dtype, tuple(shape), start)
        except (ValueError, KeyError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read {shard}: {e}") from None
    return index


def read_rows(stored: StoredTensor, name: str, begin: int, end: int) -> torch.Tensor:
    """Rows begin..end (along dim 0) of a stored tensor, reading only their bytes: rows are
    contiguous in a row-major file, so one seek and one read. What an FSDP rank reads of each
    weight it holds a shard of (`cogvlm.fsdp`)."""
    row = math.prod(stored.shape[1:]) * stored.dtype.itemsize
    with open(stored.path, "rb") as f:
        try:
            buf = _read_bytes(f, stored.start + begin * row, (end - begin) * row, name)
        except ValueError as e:
            raise CheckpointError(f"cannot read {stored.path}: {e}") from None
    return buf.view(stored.dtype).view(end - begin, *stored.shape[1:])


def _iter_hf(folder: Path, device: str, split: Split) -> Iterator[dict[str, torch.Tensor]]:
    for shard in _hf_shards(folder):
        if shard.suffix == ".bin":
            for group in _iter_bin(shard):
                yield {k: split.take(k, v) for k, v in group.items()}
            continue
        try:
            if split.world == 1:  # tensor by tensor, each in fresh memory (see _read_safetensors)
                tensors = _read_safetensors(shard)
                if torch.device(device).type == "cuda":
                    tensors = PinnedStaging(CudaCopier(torch.device(device))).move(tensors)
                for name, tensor in tensors:
                    yield {name: tensor if device == "cpu" else tensor.to(device)}
                continue
            with safe_open(str(shard), framework="pt", device=device) as f:  # a slice reads only this rank's part
                yield {k: split.take(k, f.get_slice(k)) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt files
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"cannot read {shard}: {e}") from None


class CopyDone(Protocol):
    """A queued copy: `synchronize` waits on the host until it has finished."""

    def synchronize(self) -> None: ...


class Copier(Protocol):
    """The device side of `PinnedStaging`: CUDA's in `CudaCopier`, a plain one in the tests."""

    def staging_buffer(self, nbytes: int) -> torch.Tensor:
        """A host uint8 buffer the device can read asynchronously (page-locked on CUDA)."""

    def empty(self, like: torch.Tensor) -> torch.Tensor:
        """A device tensor of `like`'s shape and dtype, in memory of its own."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> CopyDone:
        """Queue dst <- src (uint8 views of equal length) and return its completion."""

    def hand_over(self, done: CopyDone) -> None:
        """Make the consumer's later device work wait for `done` (not the host)."""


class CudaCopier:
    """Copies on a side stream, so the loader's own work on one tensor waits for that tensor's
    copy alone, not for the next one's, which is already queued."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def staging_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def empty(self, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(like.shape, dtype=like.dtype, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> CopyDone:
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def hand_over(self, done: CopyDone) -> None:
        torch.cuda.current_stream(self.device).wait_event(done)


class PinnedStaging:
    """Moves host tensors to a device through `slots` staging buffers of `chunk_bytes` each,
    with at most `slots` copies in flight, so reading the next tensor from the file overlaps the
    copy of this one. A tensor is copied in chunks: into a free staging buffer (waiting for that
    buffer's previous copy to finish first), then queued asynchronously to its device tensor.
    Each tensor is handed on once its last chunk is queued and the next tensor has been read and
    queued too (one tensor of read-ahead), in the order they came. Pinned memory stays at
    `slots * chunk_bytes` (64 MiB) whatever the tensor; device memory holds one tensor ahead."""

    def __init__(self, copier: Copier, slots: int = 2, chunk_bytes: int = 32 << 20) -> None:
        self.copier, self.chunk_bytes = copier, chunk_bytes
        self.buffers: list[torch.Tensor | None] = [None] * slots
        self.in_flight: deque[CopyDone] = deque()  # oldest first
        self.next_slot = 0

    def move(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, host tensor) -> (name, device tensor), in order, each bit-identical."""
        ready: tuple[str, torch.Tensor, CopyDone | None] | None = None
        for name, tensor in tensors:
            queued = (name, *self._queue(tensor))
            if ready is not None:
                yield self._hand_over(ready)
            ready = queued
        if ready is not None:
            yield self._hand_over(ready)
        while self.in_flight:  # the staging buffers outlive no copy
            self.in_flight.popleft().synchronize()

    def _queue(self, tensor: torch.Tensor) -> tuple[torch.Tensor, CopyDone | None]:
        out = self.copier.empty(tensor)
        src, dst = tensor.contiguous().reshape(-1).view(torch.uint8), out.reshape(-1).view(torch.uint8)
        done = None
        for begin in range(0, src.numel(), self.chunk_bytes):
            n = min(self.chunk_bytes, src.numel() - begin)
            slot = self.next_slot
            self.next_slot = (slot + 1) % len(self.buffers)
            if len(self.in_flight) == len(self.buffers):  # round robin: the oldest copy used this slot
                self.in_flight.popleft().synchronize()
            if self.buffers[slot] is None:
                self.buffers[slot] = self.copier.staging_buffer(self.chunk_bytes)
            staged = self.buffers[slot][:n]
            staged.copy_(src[begin:begin + n])
            done = self.copier.copy(dst[begin:begin + n], staged)
            self.in_flight.append(done)
        return out, done

    def _hand_over(self, ready: tuple[str, torch.Tensor, CopyDone | None]) -> tuple[str, torch.Tensor]:
        name, tensor, done = ready
        if done is not None:
            self.copier.hand_over(done)
        return name, tensor


def _iter_bin(shard: Path) -> Iterator[dict[str, torch.Tensor]]:
    """A torch-pickle shard (memory-mapped) tensor by tensor, bitsandbytes 4-bit weights unpacked
    one at a time: the published int4 file is one 11.7 GB pickle, 39 GB once unpacked, and a
    `quant` load re-quantizes each unpacked weight before the next one is made."""
    state = torch_load(shard, "")
    check_state(state, shard)
    try:
        for name, tensor in unpack_state(state):
            yield {name: tensor}
    except Bnb4bitError as e:
        raise CheckpointError(f"{shard}: {e}") from None


# SAT → Hugging Face names (sat-names.md). `{i}` / `{j}` stand for a layer number.
_SAT_TO_HF = [
    ("transformer.word_embeddings.weight", "model.embed_tokens.weight"),
    ("transformer.layers.{i}.input_layernorm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("transformer.layers.{i}.attention.query_key_value.weight",
     "model.layers.{i}.self_attn.language_expert_query_key_value.weight"),
    ("transformer.layers.{i}.attention.dense.weight", "model.layers.{i}.self_attn.language_expert_dense.weight"),
    ("transformer.layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("transformer.layers.{i}.mlp.dense_h_to_4h.weight", "model.layers.{i}.mlp.language_mlp.up_proj.weight"),
    ("transformer.layers.{i}.mlp.dense_4h_to_h.weight", "model.layers.{i}.mlp.language_mlp.down_proj.weight"),
    ("mixins.mlp.gate_proj.{i}.weight", "model.layers.{i}.mlp.language_mlp.gate_proj.weight"),
    ("mixins.mlp.vision_dense_h_to_4h_list.{i}.weight", "model.layers.{i}.mlp.vision_mlp.up_proj.weight"),
    ("mixins.mlp.vision_dense_4h_to_h_list.{i}.weight", "model.layers.{i}.mlp.vision_mlp.down_proj.weight"),
    ("mixins.mlp.vision_gate_proj.{i}.weight", "model.layers.{i}.mlp.vision_mlp.gate_proj.weight"),
    ("mixins.rotary.vision_query_key_value_list.{i}.weight",
     "model.layers.{i}.self_attn.vision_expert_query_key_value.weight"),
    ("mixins.rotary.vision_dense_list.{i}.weight", "model.layers.{i}.self_attn.vision_expert_dense.weight"),
    ("transformer.final_layernorm.weight", "model.norm.weight"),
    ("mixins.lm.lm_head.weight", "lm_head.weight"),
    ("mixins.eva.vit_model.mixins.patch_embedding.proj.{w}", "model.vision.patch_embedding.proj.{w}"),
    ("mixins.eva.vit_model.transformer.word_embeddings.weight", "model.vision.patch_embedding.cls_embedding"),
    ("mixins.eva.vit_model.transformer.position_embeddings.weight",
     "model.vision.patch_embedding.position_embedding.weight"),
    ("mixins.eva.vit_model.transformer.layers.{j}.input_layernorm.{w}",
     "model.vision.transformer.layers.{j}.input_layernorm.{w}"),
    ("mixins.eva.vit_model.transformer.layers.{j}.attention.query_key_value.{w}",
     "model.vision.transformer.layers.{j}.attention.query_key_value.{w}"),
    ("mixins.eva.vit_model.transformer.layers.{j}.attention.dense.{w}",
     "model.vision.transformer.layers.{j}.attention.dense.{w}"),
    ("mixins.eva.vit_model.transformer.layers.{j}.mlp.dense_h_to_4h.{w}",
     "model.vision.transformer.layers.{j}.mlp.fc1.{w}"),
    ("mixins.eva.vit_model.transformer.layers.{j}.mlp.dense_4h_to_h.{w}",
     "model.vision.transformer.layers.{j}.mlp.fc2.{w}"),
    ("mixins.eva.vit_model.transformer.layers.{j}.post_attention_layernorm.{w}",
     "model.vision.transformer.layers.{j}.post_attention_layernorm.{w}"),
    ("mixins.eva.linear_proj.{name}.{w}", "model.vision.linear_proj.{name}.{w}"),
    ("mixins.eva.boi", "model.vision.boi"),
    ("mixins.eva.eoi", "model.vision.eoi"),
    # CogAgent (docs/spec/cogagent.md section 12): a pure rename, no tensor is reshaped
    ("transformer.layers.{i}.post_cross_attention_layernorm.weight",
     "model.layers.{i}.post_cross_attention_layernorm.weight"),
    ("transformer.layers.{i}.cross_attention.{name}.weight", "model.layers.{i}.cross_attn.{name}.weight"),
    ("mixins.eva.pos_embed", "model.vision.pos_embed"),
    ("mixins.encoder.pos_embed", "model.cross_vision.pos_embed"),
    ("mixins.encoder.vit.model.{rest}", "model.cross_vision.vit.model.{rest}"),
]
# derived buffers (recomputed) and parts that exist in some checkpoints but never run
_SAT_IGNORED = re.compile(r"(.*inv_freq|.*rope\.freqs_(cos|sin)|mixins\.eva\.vit_model\.transformer\.final_layernorm\..*)$")


def _pattern(template: str) -> re.Pattern[str]:
    rx = re.escape(template)
    for field, group in (("i", r"\d+"), ("j", r"\d+"), ("w", r"weight|bias"), ("name", r"\w+"), ("rest", r"[\w.]+")):
        rx = rx.replace(re.escape("{" + field + "}"), f"(?P<{field}>{group})")
    return re.compile(rx + "$")


_SAT_RULES = [(_pattern(sat), hf) for sat, hf in _SAT_TO_HF]


def sat_to_hf_name(name: str) -> str | None:
    """The Hugging Face name of a SAT parameter; None for buffers we ignore; the name itself
    (so it is reported as unexpected) when nothing matches."""
    if _SAT_IGNORED.match(name):
        return None
    for rx, hf in _SAT_RULES:
        m = rx.match(name)
        if m:
            return hf.format(**m.groupdict())
    return name


def torch_load(path: Path, what: str) -> object:
    """A torch pickle, weights only (a pickle naming anything else is refused, not run), memory-
    mapped unless it predates torch 1.6's zip format (those are read whole); any failure is one
    line (torch's weights-only refusal is a page of advice: its 'unsupported GLOBAL' line is kept)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # pickle / zip errors come in many types
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        line = next((x for x in lines if "unsupported GLOBAL" in x), lines[0])
        raise CheckpointError(f"cannot read {what}{path}: {line[:300]}") from None


def check_state(state: object, path: Path) -> None:
    """A torch pickle's state: a dict of names to tensors (anything else would fail later with a
    KeyError or an AttributeError far from the file)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of named tensors")
    bad = [repr(k)[:40] for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not a named tensor: {_listing(bad)}")


def _sat_files(folder: Path) -> list[Path]:
    """The mp_rank files of the iteration `latest` names: a folder inside this one, by name (a
    `latest` of ../x or /x would load any checkpoint on the machine)."""
    try:
        iteration = (folder / "latest").read_text().strip()
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has {SAT_CONFIG} but no 'latest' file naming the iteration") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {folder / 'latest'}: {getattr(e, 'strerror', None) or e}") from None
    if not re.fullmatch(r"[\w.-]+", iteration) or iteration in (".", ".."):
        raise CheckpointError(f"{folder / 'latest'} names {json.dumps(iteration)[:80]}, not an iteration folder "
                              f"inside {folder}")
    files = sorted((folder / iteration).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{folder / iteration} holds no mp_rank_XX_model_states.pt files")
    return files


def _read_sat(folder: Path, split: Split) -> dict[str, torch.Tensor]:
    """The whole state, or rank `split.rank` of `split.world`'s part: straight from its own mp_rank
    file when the checkpoint has `world` ranks, else merged and re-sliced tensor by tensor."""
    files = _sat_files(folder)
    own = len(files) == split.world
    if own:
        files = files[split.rank:split.rank + 1]
    states = []
    for f in files:
        blob = torch_load(f, "SAT checkpoint ")
        states.append(blob["module"] if isinstance(blob, dict) and "module" in blob else blob)
        check_state(states[-1], f)
    merged: dict[str, torch.Tensor] = {}
    for sat_name in states[0]:
        hf_name = sat_to_hf_name(sat_name)
        if hf_name is None:
            continue
        try:
            parts = [s[sat_name] for s in states]
            merged[hf_name] = parts[0] if own else split.take(hf_name, split.merge(hf_name, parts))
        except (KeyError, RuntimeError, ValueError, IndexError) as e:  # ranks that do not fit together
            raise CheckpointError(f"the mp_rank files of {files[0].parent} disagree on {sat_name}: "
                                  f"{type(e).__name__}: {str(e)[:200]}") from None
    return merged


# ---------------------------------------------------------------------------------------------
# Checking and loading
# ---------------------------------------------------------------------------------------------


def expected_shapes(config: CogVLMConfig, quant: QuantConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Every stored tensor's name and shape, for a checkpoint quantized with `quant` or a float one."""
    with torch.device("meta"):
        model = CogVLMForCausalLM(config)
    if quant is not None:
        quantize_layout(model, quant)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _listing(names: list[str], limit: int = 5) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_names(expected: dict[str, tuple[int, ...]], seen: dict[str, tuple[int, ...]], where: str) -> None:
    """One error listing every missing, unexpected and wrong-shaped tensor."""
    missing = sorted(set(expected) - set(seen))
    unexpected = sorted(set(seen) - set(expected))
    wrong = sorted(f"{k} {list(seen[k])} (model expects {list(expected[k])})"
                   for k in set(seen) & set(expected) if seen[k] != expected[k])
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape: {_listing(wrong)}")
    if problems:
        raise CheckpointError(f"checkpoint {where} does not match its config: " + "; ".join(problems))


WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def scan_weights(stored: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor],
                 found: dict[str, list[str]]) -> None:
    """Note in `found` the tensors a model must not be built from: stored in a dtype no weight
    has (int64, bool, float64: a wrong export), or not finite once loaded (NaN/inf: a broken
    checkpoint, or values past the range of the dtype loaded to). Called while streaming."""
    for name, t in stored.items():
        if t.dtype not in WEIGHT_DTYPES:
            found.setdefault("dtype", []).append(f"{name} ({str(t.dtype).removeprefix('torch.')})")
    for name, t in loaded.items():
        if t.dtype.is_floating_point and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            found.setdefault("finite", []).append(name)


def report_weights(found: dict[str, list[str]], where: str) -> None:
    """One CheckpointError naming every tensor `scan_weights` found."""
    problems = []
    if found.get("dtype"):
        problems.append(f"{len(found['dtype'])} in a dtype weights do not have (only float32, bfloat16, float16): "
                        f"{_listing(found['dtype'])}")
    if found.get("quant_dtype"):
        problems.append(f"{len(found['quant_dtype'])} quantized tensor(s) in the wrong dtype: "
                        f"{_listing(found['quant_dtype'])}")
    if found.get("finite"):
        problems.append(f"{len(found['finite'])} with NaN or inf values: {_listing(found['finite'])}")
    if problems:
        raise CheckpointError(f"checkpoint {where} holds unusable weights: " + "; ".join(problems))


def owned(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` on `device` in `dtype`, in memory of its own.

    A tensor read from safetensors in its stored dtype is a view of the memory-mapped file: it
    would change if the checkpoint were rewritten under a running server, and it sits wherever
    the file's header puts it (often not 64-byte aligned, which sends CPU kernels down other,
    slower paths than a fresh tensor's). One copy per tensor, done while streaming, fixes both
    and costs no peak memory beyond the tensor itself. A tensor a plain read put in memory
    torch allocated for it alone is kept as it is: a copy would only raise the peak.
    """
    moved = tensor.to(device=device, dtype=dtype)
    return moved.clone() if moved.data_ptr() == tensor.data_ptr() and not _private(tensor) else moved


def _private(tensor: torch.Tensor) -> bool:
    """Memory torch allocated for this tensor alone (what `_read_safetensors` reads into): a
    resizable storage (a file mapping never is) that holds just this tensor, from its start."""
    storage = tensor.untyped_storage()
    return (storage.resizable() and storage.nbytes() == tensor.nbytes
            and storage.data_ptr() == tensor.data_ptr())


def load_weights(folder: Path, config: CogVLMConfig, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", rank: int = 0, world: int = 1,
                 build: Callable[[CogVLMConfig], CogVLMForCausalLM] = CogVLMForCausalLM,
                 quant: QuantConfig | None = None) -> CogVLMForCausalLM:
    """Build the model on the meta device and fill it group by group, converting on the fly.
    With `world` > 1, `build` makes tensor-parallel rank `rank`'s share (`cogvlm.tp`) and only
    that rank's slices are read. `quant` quantizes a float checkpoint's selected Linears while
    loading, each on `device` as its weight arrives; a quantized checkpoint loads as it was
    written (asking for another quantization is an error). Other tensors take `dtype`."""
    device = torch.device(device)
    stored = read_quant(folder)
    if stored is not None and quant is not None and quant != stored:
        raise CheckpointError(f"{folder} is quantized already ({stored.to_dict()}); load it without "
                              f"quantization options (or with the same ones)")
    quant = stored or quant
    check_cuda_capability(device, dtype, quant)
    with torch.device("meta"):
        model = build(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if quant is not None:
        quantize_layout(model, quant)
        if stored is not None:
            expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}
    quant_dtypes = {k: v.dtype for k, v in model.state_dict().items() if k.rpartition(".")[0] in quantized}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    seen: dict[str, tuple[int, ...]] = {}
    read_device = "cpu" if device.type == "meta" else str(device)
    bad: dict[str, list[str]] = {}
    for group in iter_tensors(folder, device=read_device, rank=rank, world=world,
                              rope_buffers=config.rope_freqs_in_weights, config=config):
        seen.update({k: tuple(v.shape) for k, v in group.items()})
        group = {k: v for k, v in group.items() if k in expected and tuple(v.shape) == expected[k]}
        plain = {k: v for k, v in group.items() if k.rpartition(".")[0] not in quantized}
        fitting = {k: owned(v, device, dtype) for k, v in plain.items()}
        scan_weights(plain, fitting, bad)
        for name, tensor in fitting.items():
            _assign(model, name, tensor)
        for name in group.keys() - plain.keys():  # popped: a float weight is freed once quantized
            if stored is not None and group[name].dtype != quant_dtypes[name]:
                wrong = str(group.pop(name).dtype).removeprefix("torch.")
                bad.setdefault("quant_dtype", []).append(
                    f"{name} ({wrong}; expected {str(quant_dtypes[name]).removeprefix('torch.')})")
                continue
            _quantized_part(quantized, pending, name, group.pop(name).to(device), quant, stored is not None)
        del group, plain, fitting
        if device.type == "cpu":
            _release_freed_memory()
    check_names(expected, seen, str(folder))
    report_weights(bad, str(folder))
    model.inv_freq = CogVLMForCausalLM.rope_inv_freq(config).to(device)
    if config.cross_vision is not None:  # its 2-D RoPE tables are buffers made on the CPU
        model.model.cross_vision.to(device)
    if config.rope_freqs_in_weights and device.type != "meta":
        stored = [layer.self_attn.rotary_emb.inv_freq for layer in model.model.layers]
        if not all(torch.equal(f, stored[0]) for f in stored):
            raise CheckpointError(f"checkpoint {folder} stores different RoPE frequencies in different layers; "
                                  f"this runtime rotates every layer with one table")
    return model.eval().requires_grad_(False)


def _quantized_part(modules: dict[str, Int8Linear | Int4Linear], pending: dict[str, dict[str, torch.Tensor]],
                    name: str, tensor: torch.Tensor, quant: QuantConfig, stored: bool) -> None:
    """Collect the tensors of a quantized module (its float weight and bias, or its stored
    quantized tensors) and fill it once all have arrived (they may sit in different shards)."""
    module_name, _, key = name.rpartition(".")
    module = modules[module_name]
    parts = pending.setdefault(module_name, {})
    parts[key] = tensor
    del tensor  # `parts` holds it alone now
    needed = ({k for k, _ in module.named_buffers(recurse=False)} if stored
              else {"weight"} | ({"bias"} if module.bias is not None else set()))
    if needed <= parts.keys():
        del pending[module_name]
        bias = parts.pop("bias", None)
        tensors = parts if stored else quantize_tensors(parts.pop("weight"), quant.bits_for(module_name),
                                                        quant.group_size)
        fill(module, tensors, bias)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in place of the (meta) parameter or buffer `name`: what load_state_dict(...,
    assign=True) does, without walking the whole model for each of the hundreds of groups
    (bf16 streaming of the 1.4 B benchmark checkpoint: 24 s -> 15 s)."""
    module_name, _, key = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, key, nn.Parameter(tensor, requires_grad=False) if key in module._parameters else tensor)


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere). The
    loader's transients (a read tensor, its float copy while quantizing) are freed between small
    long-lived allocations, and glibc keeps such holes in the heap: measured, a 4-bit load of a
    1.4 B checkpoint peaked 0.4 GB (40% of the quantized model) above what it held."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 (glibc only)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               quant: QuantConfig | None = None) -> tuple[CogVLMForCausalLM, Path]:
    """Resolve, read the config, load the weights: (model, folder)."""
    folder = resolve(name_or_path)
    return load_weights(folder, read_config(folder), dtype, device, quant=quant), folder


# ---------------------------------------------------------------------------------------------
# Writing the Hugging Face layout
# ---------------------------------------------------------------------------------------------


_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def check_destination(out_dir: str | Path, force: bool = False) -> None:
    """Where `save_hf` may write: a new or empty folder, or, with `force`, a checkpoint folder
    holding only files it writes, which is then replaced. Anything else is refused before any
    work is done: `cogvlm convert cogvlm-tiny ~/models` must never delete the models in ~/models."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} is a file; give a new folder for the checkpoint")
    names = sorted(p.name for p in out_dir.iterdir())
    if not names:
        return
    foreign = [n for n in names if n not in (HF_CONFIG, HF_INDEX, *TOKENIZER_FILES) and not _SHARD_NAME.fullmatch(n)]
    if foreign or HF_INDEX not in names:
        shown = ", ".join(foreign[:3] or names[:3]) + (", ..." if len(foreign or names) > 3 else "")
        raise CheckpointError(f"{out_dir} already holds files cogvlm did not write ({shown}); nothing was changed: "
                              f"give a new or empty folder")
    if not force:
        raise CheckpointError(f"{out_dir} already holds a checkpoint; nothing was changed: give a new folder, or "
                              f"--force (force=True) to replace it")


def save_hf(state: dict[str, torch.Tensor], config: CogVLMConfig, out_dir: str | Path,
            max_shard_bytes: int = 5 * 2**30, extra_files: tuple[Path, ...] = (),
            quant: QuantConfig | None = None, force: bool = False) -> Path:
    """Write config.json, safetensors shards and the index atomically: a crash leaves no half
    folder. A quantized state (`quant`) is recorded in config.json's "quantization". The folder
    must be new or empty, or (`force`) a checkpoint of ours, which is replaced
    (`check_destination`)."""
    out_dir = Path(out_dir)
    check_destination(out_dir, force)
    check_names(expected_shapes(config, quant), {k: tuple(v.shape) for k, v in state.items()}, "to save")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as e:  # a file where a folder should be, a read-only folder
        raise WriteError(f"cannot write {out_dir}: {e.strerror or e}") from None
    try:
        _write_hf(tmp, shards, state, config, extra_files, quant)
        check_destination(out_dir, force)  # again: the folder may have changed while we wrote
        if out_dir.exists():
            shutil.rmtree(out_dir)  # empty, or only files save_hf writes
        os.replace(tmp, out_dir)
    except (OSError, SafetensorError) as e:  # a full disk (ENOSPC, EFBIG), a folder made read-only
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(f"cannot write {out_dir}: {getattr(e, 'strerror', None) or e}; nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_hf(tmp: Path, shards: list[dict[str, torch.Tensor]], state: dict[str, torch.Tensor], config: CogVLMConfig,
              extra_files: tuple[Path, ...], quant: QuantConfig | None) -> None:
    """save_hf's files, into the temporary folder `tmp`."""
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (tmp / HF_INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                            "weight_map": weight_map}, indent=2))
    hf_config = config.to_hf_dict() | {"torch_dtype": _stored_dtype(state)}
    if quant is not None:
        hf_config["quantization"] = quant.to_dict()
    (tmp / HF_CONFIG).write_text(json.dumps(hf_config, indent=2))
    for f in extra_files:
        shutil.copy2(f, tmp / f.name)


def _stored_dtype(state: dict[str, torch.Tensor]) -> str:
    """config.json's `torch_dtype`: the float dtype holding most of the weights, as stored."""
    counts: dict[torch.dtype, int] = {}
    for t in state.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return str(max(counts, key=counts.__getitem__)).removeprefix("torch.")


def convert(src: str | Path, dst: str | Path, max_shard_bytes: int = 5 * 2**30, force: bool = False) -> Path:
    """Any readable layout → Hugging Face layout, tensors bit-exact (dtype kept)."""
    check_destination(dst, force)
    folder = resolve(src)
    config = read_config(folder)
    state: dict[str, torch.Tensor] = {}
    bad: dict[str, list[str]] = {}
    for group in iter_tensors(folder, rope_buffers=config.rope_freqs_in_weights, config=config):
        scan_weights(group, group, bad)
        state.update(group)
    report_weights(bad, str(folder))
    extra = tuple(p for p in [tokenizer_file(folder)] if p is not None)
    return save_hf(state, config, dst, max_shard_bytes, extra_files=extra, quant=read_quant(folder), force=force)


def quantize_checkpoint(src: str | Path, dst: str | Path, quant: QuantConfig, device: str | torch.device = "cpu",
                        max_shard_bytes: int = 5 * 2**30, force: bool = False) -> Path:
    """Any readable float checkpoint → a quantized Hugging Face-layout one (packed weights in the
    device-neutral layout + scales; the other tensors in bf16, the dtype quantized models run
    in), quantizing each weight on `device` as it streams in. Holds the quantized model only."""
    check_destination(dst, force)
    folder = resolve(src)
    config = read_config(folder)
    if read_quant(folder) is not None:
        raise CheckpointError(f"{folder} is quantized already")
    with torch.device("meta"):
        selected = {name for name, m in CogVLMForCausalLM(config).named_modules()
                    if isinstance(m, nn.Linear) and quant.bits_for(name) is not None}
    state: dict[str, torch.Tensor] = {}
    for group in iter_tensors(folder, rope_buffers=config.rope_freqs_in_weights, config=config):
        for name, tensor in group.items():
            module_name, _, key = name.rpartition(".")
            if module_name in selected and key == "weight":
                tensors = quantize_tensors(tensor.to(device), quant.bits_for(module_name), quant.group_size)
                state.update({f"{module_name}.{k}": t.cpu() for k, t in tensors.items()})
            else:
                state[name] = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
    extra = tuple(p for p in [tokenizer_file(folder)] if p is not None)
    return save_hf(state, config, dst, max_shard_bytes, extra_files=extra, quant=quant, force=force)
