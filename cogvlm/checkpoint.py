"""Finding, reading, checking and writing CogVLM checkpoints (spec section 7).

Two layouts are read: Hugging Face (config.json + sharded safetensors, or pytorch_model*.bin
torch pickles, possibly bitsandbytes 4-bit as the CogVLM2 int4 copies) and the authors' SAT
(model_config.json + latest + <iter>/mp_rank_XX_model_states.pt, possibly several ranks).
Both become one stream of Hugging Face-named tensors, checked against the model's expected
names and shapes. `load_model` builds the model on the meta device and assigns tensors shard by
shard in the target dtype/device, so peak memory stays about one copy of the weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .bnb import Bnb4bitError, unpack_state
from .config import REGISTRY, CogVLMConfig, ConfigError, from_hf_config, from_sat_config, registry_entry
from .model import CogVLMForCausalLM
from .tokenizer import TOKENIZER_FILE, TOKENIZER_FILES, VICUNA_REPO, tokenizer_file

HF_CONFIG = "config.json"
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
SAT_CONFIG = "model_config.json"
HUB_PATTERNS = ["config.json", "*.safetensors", HF_INDEX, *TOKENIZER_FILES]
BIN_PATTERNS = ["config.json", "pytorch_model*.bin", BIN_INDEX, *TOKENIZER_FILES]  # e.g. the CogVLM2 int4 repos


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or does not fit the model; the message says how to fix it."""


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


def iter_tensors(folder: Path, device: str = "cpu", rank: int = 0, world: int = 1,
                 rope_buffers: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the checkpoint's tensors in groups (one shard or one SAT state at a time): whole,
    or with `world` > 1 only tensor-parallel rank `rank`'s part of each (see `split_rule`).
    Derived buffers are left out (recomputed), except the decoder's `rotary_emb.inv_freq` with
    `rope_buffers`: CogVLM2 rotates with the stored ones (v1 copies that hold them are read
    without, cogvlm.md section 7)."""
    if layout_of(folder) == "hf":
        groups = _iter_hf(folder, device, rank, world)
    else:
        groups = iter([_read_sat(folder, rank, world)])
    keep = ("rotary_emb.inv_freq",) if rope_buffers else ()
    for group in groups:
        yield {k: v for k, v in group.items() if not k.endswith(_BUFFERS) or k.endswith(keep)}


def _hf_shards(folder: Path) -> list[Path]:
    index, single = (HF_INDEX, HF_SINGLE)
    if not (folder / HF_INDEX).is_file() and not (folder / HF_SINGLE).is_file() and (
            (folder / BIN_INDEX).is_file() or (folder / BIN_SINGLE).is_file()):
        index, single = BIN_INDEX, BIN_SINGLE  # torch pickles, as the CogVLM2 int4 repos ship
    if (folder / index).is_file():
        try:
            weight_map = json.loads((folder / index).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{folder / index} is not a valid index: {e}") from None
        shards = [folder / _shard_name(f, folder) for f in dict.fromkeys(weight_map.values())]
    else:
        shards = [folder / single]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise CheckpointError(f"{folder} lacks {len(missing)} weight file(s): {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}")
    return shards


_BUFFERS = ("inv_freq", "rope.freqs_cos", "rope.freqs_sin")  # derived: recomputed, never read


def _shard_name(name: object, folder: Path) -> str:
    """A weight_map entry, if it names a file inside the checkpoint folder (not ../x, not /etc/x)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{folder / HF_INDEX} names the weight file {json.dumps(name)[:80]}, which is not "
                              f"inside the checkpoint folder")
    return name


def _iter_hf(folder: Path, device: str, rank: int, world: int) -> Iterator[dict[str, torch.Tensor]]:
    for shard in _hf_shards(folder):
        if shard.suffix == ".bin":
            for group in _iter_bin(shard):
                yield {k: take_rank(v, split_rule(k), rank, world) for k, v in group.items()}
            continue
        try:
            with safe_open(str(shard), framework="pt", device=device) as f:
                names = list(f.keys())
                if world == 1:
                    yield {k: f.get_tensor(k) for k in names}
                else:  # a slice object reads only the rows / columns asked for
                    yield {k: take_rank(f.get_slice(k), split_rule(k), rank, world) for k in names}
        except Exception as e:  # safetensors raises its own error types for corrupt files
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"cannot read {shard}: {e}") from None


def _iter_bin(shard: Path, group_bytes: int = 2**30) -> Iterator[dict[str, torch.Tensor]]:
    """A torch-pickle shard (memory-mapped) in groups of about `group_bytes`, bitsandbytes 4-bit
    weights unpacked: the published int4 file is one 11.7 GB pickle, 39 GB once unpacked."""
    try:
        state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle / zip errors come in many types
        raise CheckpointError(f"cannot read {shard}: {e}") from None
    group: dict[str, torch.Tensor] = {}
    size = 0
    try:
        for name, tensor in unpack_state(state):
            group[name] = tensor
            size += tensor.numel() * tensor.element_size()
            if size >= group_bytes:
                yield group
                group, size = {}, 0
    except Bnb4bitError as e:
        raise CheckpointError(f"{shard}: {e}") from None
    if group:
        yield group


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
    # CogAgent (cogagent.md section 12): a pure rename, no tensor is reshaped
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


def split_rule(hf_name: str) -> str:
    """How a tensor is split across model-parallel ranks: 'qkv', 'kv', 'dim0', 'dim1' or 'replicated'."""
    if hf_name.startswith(("model.vision.linear_proj.", "model.cross_vision.")):
        return "replicated"  # the adapter and CogAgent's high-resolution tower are not split
    if hf_name.endswith("cross_attn.key_value.weight"):
        return "kv"  # rank r holds [k_r; v_r]
    if hf_name.endswith("cross_attn.query.weight"):
        return "dim0"
    if hf_name.endswith("cross_attn.dense.weight"):
        return "dim1"
    if hf_name.endswith(("query_key_value.weight", "query_key_value.bias")):
        return "qkv"
    if hf_name in ("model.embed_tokens.weight", "lm_head.weight") or re.search(
            r"(gate_proj|up_proj)\.weight$|mlp\.fc1\.(weight|bias)$", hf_name):
        return "dim0"
    if re.search(r"(expert_dense|down_proj|attention\.dense|mlp\.fc2)\.weight$", hf_name):
        return "dim1"
    return "replicated"


def merge_ranks(parts: list[torch.Tensor], rule: str) -> torch.Tensor:
    if len(parts) == 1 or rule == "replicated":
        return parts[0]
    if rule == "dim0":
        return torch.cat(parts, 0)
    if rule == "dim1":
        return torch.cat(parts, 1)
    n = len(rule)  # "qkv": rank r holds [q_r; k_r; v_r]; "kv": [k_r; v_r]
    blocks = [p.chunk(n, dim=0) for p in parts]
    return torch.cat([blk[i] for i in range(n) for blk in blocks], 0)


def take_rank(t: torch.Tensor | Any, rule: str, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s part of a whole tensor under `rule`: the inverse of `merge_ranks`. `t` may
    be a safetensors slice, so that only this part is read from the file."""
    shape = t.get_shape() if hasattr(t, "get_shape") else t.shape
    if world == 1 or rule == "replicated":
        return t[:]
    if rule == "dim1":
        n = shape[1] // world
        return t[:, rank * n:(rank + 1) * n]
    if rule == "dim0":
        n = shape[0] // world
        return t[rank * n:(rank + 1) * n]
    blocks = len(rule)  # qkv: this rank's heads of q, then of k, then of v; kv: of k, then of v
    rows = shape[0] // blocks
    n = rows // world
    return torch.cat([t[i * rows + rank * n:i * rows + (rank + 1) * n] for i in range(blocks)])


def _sat_files(folder: Path) -> list[Path]:
    try:
        iteration = (folder / "latest").read_text().strip()
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has {SAT_CONFIG} but no 'latest' file naming the iteration") from None
    files = sorted((folder / iteration).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{folder / iteration} holds no mp_rank_XX_model_states.pt files")
    return files


def _read_sat(folder: Path, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """The whole state, or rank `rank` of `world`'s part: straight from its own mp_rank file when
    the checkpoint has `world` ranks, else merged and re-sliced tensor by tensor."""
    files = _sat_files(folder)
    own = len(files) == world
    if own:
        files = files[rank:rank + 1]
    states = []
    for f in files:
        try:
            # files from before torch 1.6 (not zip) cannot be memory-mapped: those are read whole
            blob = torch.load(f, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f))
        except Exception as e:  # pickle / zip errors come in many types
            raise CheckpointError(f"cannot read SAT checkpoint {f}: {e}") from None
        states.append(blob["module"] if isinstance(blob, dict) and "module" in blob else blob)
    merged: dict[str, torch.Tensor] = {}
    for sat_name in states[0]:
        hf_name = sat_to_hf_name(sat_name)
        if hf_name is None:
            continue
        rule = split_rule(hf_name)
        parts = [s[sat_name] for s in states]
        merged[hf_name] = parts[0] if own else take_rank(merge_ranks(parts, rule), rule, rank, world)
    return merged


# ---------------------------------------------------------------------------------------------
# Checking and loading
# ---------------------------------------------------------------------------------------------


def expected_shapes(config: CogVLMConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = CogVLMForCausalLM(config)
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
    and costs no peak memory beyond the tensor itself.
    """
    moved = tensor.to(device=device, dtype=dtype)
    return moved.clone() if moved.data_ptr() == tensor.data_ptr() else moved


def load_weights(folder: Path, config: CogVLMConfig, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", rank: int = 0, world: int = 1,
                 build: Callable[[CogVLMConfig], CogVLMForCausalLM] = CogVLMForCausalLM) -> CogVLMForCausalLM:
    """Build the model on the meta device and fill it group by group, converting on the fly.
    With `world` > 1, `build` makes tensor-parallel rank `rank`'s share (`cogvlm.tp`) and only
    that rank's slices are read."""
    device = torch.device(device)
    with torch.device("meta"):
        model = build(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    seen: dict[str, tuple[int, ...]] = {}
    read_device = "cpu" if device.type == "meta" else str(device)
    bad: dict[str, list[str]] = {}
    for group in iter_tensors(folder, device=read_device, rank=rank, world=world,
                              rope_buffers=config.rope_freqs_in_weights):
        seen.update({k: tuple(v.shape) for k, v in group.items()})
        fitting = {k: owned(v, device, dtype) for k, v in group.items()
                   if k in expected and tuple(v.shape) == expected[k]}
        scan_weights(group, fitting, bad)
        model.load_state_dict(fitting, strict=False, assign=True)
        del group, fitting
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


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> tuple[CogVLMForCausalLM, Path]:
    """Resolve, read the config, load the weights: (model, folder)."""
    folder = resolve(name_or_path)
    return load_weights(folder, read_config(folder), dtype, device), folder


# ---------------------------------------------------------------------------------------------
# Writing the Hugging Face layout
# ---------------------------------------------------------------------------------------------


def save_hf(state: dict[str, torch.Tensor], config: CogVLMConfig, out_dir: str | Path,
            max_shard_bytes: int = 5 * 2**30, extra_files: tuple[Path, ...] = ()) -> Path:
    """Write config.json, safetensors shards and the index atomically: a crash leaves no half folder."""
    out_dir = Path(out_dir)
    check_names(expected_shapes(config), {k: tuple(v.shape) for k, v in state.items()}, "to save")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        weight_map = {}
        for k, shard in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (tmp / HF_INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                "weight_map": weight_map}, indent=2))
        hf_config = config.to_hf_dict() | {"torch_dtype": _stored_dtype(state)}
        (tmp / HF_CONFIG).write_text(json.dumps(hf_config, indent=2))
        for f in extra_files:
            shutil.copy2(f, tmp / f.name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _stored_dtype(state: dict[str, torch.Tensor]) -> str:
    """config.json's `torch_dtype`: the float dtype holding most of the weights, as stored."""
    counts: dict[torch.dtype, int] = {}
    for t in state.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return str(max(counts, key=counts.__getitem__)).removeprefix("torch.")


def convert(src: str | Path, dst: str | Path, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Any readable layout → Hugging Face layout, tensors bit-exact (dtype kept)."""
    folder = resolve(src)
    config = read_config(folder)
    state: dict[str, torch.Tensor] = {}
    bad: dict[str, list[str]] = {}
    for group in iter_tensors(folder, rope_buffers=config.rope_freqs_in_weights):
        scan_weights(group, group, bad)
        state.update(group)
    report_weights(bad, str(folder))
    extra = tuple(p for p in [tokenizer_file(folder)] if p is not None)
    return save_hf(state, config, dst, max_shard_bytes, extra_files=extra)
