"""Issue #37 item 14: crafted checkpoints. Each case spoils a real tiny checkpoint (Hugging Face
safetensors, a torch .bin, or a SAT folder) the way a damaged download or a hostile upload does;
loading it must raise a CheckpointError (or load correctly), and `cogvlm convert` must end in one
line and exit 2 with nothing written. Against the loader before these fixes, 19 of this file's
cases failed: tracebacks (KeyError, AttributeError, TypeError, IsADirectoryError, ...), a `latest`
of ../x or /x that loaded another folder's weights, and a pre-zip .bin that could not load."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from cogvlm.checkpoint import HF_INDEX
from tests.test_checkpoint import same_weights, write_sat

SHARD = "model-00001-of-00001.safetensors"


def header(path: Path) -> tuple[dict, bytes]:
    """The JSON header of a safetensors file and its data."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_header(path: Path, head: dict, data: bytes) -> None:
    text = json.dumps(head).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def lie(change: Callable[[dict], None]) -> Callable[[Path], None]:
    """A case that edits the first tensor's header entry (data unchanged)."""
    def spoil(folder: Path) -> None:
        head, data = header(folder / SHARD)
        first = min((k for k in head if k != "__metadata__"), key=lambda k: head[k]["data_offsets"][0])
        change(head[first])
        write_header(folder / SHARD, head, data)
    return spoil


def state_change(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def spoil(folder: Path) -> None:
        state = load_file(folder / SHARD)
        change(state)
        save_file(state, folder / SHARD, metadata={"format": "pt"})
        index = json.loads((folder / HF_INDEX).read_text())
        index["weight_map"] = {k: SHARD for k in state}
        (folder / HF_INDEX).write_text(json.dumps(index))
    return spoil


def write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(data)


def edit_json(name: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def spoil(folder: Path) -> None:
        obj = json.loads((folder / name).read_text())
        change(obj)
        (folder / name).write_text(json.dumps(obj))
    return spoil


def cut(fraction: float) -> Callable[[Path], None]:
    return lambda folder: (folder / SHARD).write_bytes((folder / SHARD).read_bytes()[:int((folder / SHARD).stat().st_size * fraction)])


HF_CASES = {
    "truncated at half": cut(0.5),
    "truncated in the header": cut(0.001),
    "empty file": write(SHARD, b""),
    "header length past the file": lambda f: (f / SHARD).write_bytes(struct.pack("<Q", 2**62) + b"{}"),
    "header not JSON": lambda f: (f / SHARD).write_bytes(struct.pack("<Q", 4) + b"{{{{"),
    "header a list": lambda f: write_header(f / SHARD, [], b""),  # type: ignore[arg-type]
    "unknown dtype": lie(lambda e: e.update(dtype="F8_E9")),
    "shape larger than its bytes": lie(lambda e: e.update(shape=[10**6, 10**6])),
    "negative shape": lie(lambda e: e.update(shape=[-1])),
    "shape of strings": lie(lambda e: e.update(shape=["a"])),
    "offsets past the end": lie(lambda e: e.update(data_offsets=[0, 2**40])),
    "offsets reversed": lie(lambda e: e.update(data_offsets=[8, 0])),
    "offsets missing": lie(lambda e: e.pop("data_offsets")),
    "entry not an object": lie(lambda e: e.clear()),
    "wrong shape": state_change(lambda s: s.update({"model.norm.weight": torch.ones(3)})),
    "missing tensor": state_change(lambda s: s.pop("lm_head.weight")),
    "extra tensor": state_change(lambda s: s.update({"model.extra.weight": torch.ones(2)})),
    "integer weights": state_change(lambda s: s.update({"lm_head.weight": s["lm_head.weight"].to(torch.int32)})),
    "bool weights": state_change(lambda s: s.update({"model.norm.weight": s["model.norm.weight"] > 0})),
    "float64 weights": state_change(lambda s: s.update({"model.norm.weight": s["model.norm.weight"].double()})),
    "index not JSON": write(HF_INDEX, b"{"),
    "index weight_map a list": edit_json(HF_INDEX, lambda i: i.update(weight_map=[1, 2])),
    "index without weight_map": edit_json(HF_INDEX, lambda i: i.pop("weight_map")),
    "index a list": write(HF_INDEX, b"[1]"),
    "index names a folder": lambda f: ((f / "sub").mkdir(), edit_json(HF_INDEX, lambda i: i["weight_map"].update(
        {k: "sub" for k in i["weight_map"]}))(f)),
    "shard is a folder": lambda f: ((f / SHARD).unlink(), (f / SHARD).mkdir()),
    "config not UTF-8": write("config.json", b"\xff\xfe{}"),
    "config max_position_embeddings 2**40": edit_json("config.json", lambda c: c.update(max_position_embeddings=2**40)),
    "config vision_config a list": edit_json("config.json", lambda c: c.update(vision_config=[1])),
    "config quantization bogus": edit_json("config.json", lambda c: c.update(quantization={"bits": 3})),
    "config quantization a string": edit_json("config.json", lambda c: c.update(quantization="int4")),
    "tokenizer not a model": write("tokenizer.model", b"not a sentencepiece model"),
}


@pytest.fixture
def hf_copy(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    return folder


def check_refused(folder: Path, capsys, tmp_path: Path, chat: bool = True, convert: bool = True) -> None:
    """A named error from the API; one line and exit 2 from convert and from chat; nothing
    written. The SAT folders have no tokenizer: their API check is the checkpoint loader's."""
    from cogvlm import CogVLM
    from cogvlm.checkpoint import load_model
    from cogvlm.cli import main
    from cogvlm.errors import CogVLMError

    with pytest.raises(CogVLMError):
        CogVLM.from_pretrained(folder, device="cpu") if chat else load_model(folder)
    argvs = [["convert", str(folder), str(tmp_path / "out")]] if convert else []
    argvs += [["chat", "--model", str(folder), "--query", "hi"]] if chat else []
    for argv in argvs:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"cogvlm {argv[0]}: error: ") and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_crafted_hf_checkpoints_are_named_errors(case, hf_copy, capsys, tmp_path):
    HF_CASES[case](hf_copy)
    check_refused(hf_copy, capsys, tmp_path, convert="tokenizer" not in case)  # convert copies the tokenizer as is


# ---- torch .bin files (as the CogVLM2 int4 repositories ship them) -------------------------------

def as_bin(folder: Path, legacy: bool) -> dict[str, torch.Tensor]:
    state = load_file(folder / SHARD)
    for name in (SHARD, HF_INDEX):
        (folder / name).unlink()
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    return state


@pytest.mark.parametrize("legacy", [False, True])
def test_bin_checkpoints_load_zip_and_pre_zip(hf_copy, legacy):
    """torch.save files from before torch 1.6 (not zip archives) cannot be memory-mapped: they
    are read whole now (before: 'cannot read ... mmap can only be used with files saved with
    torch.save(_use_new_zipfile_serialization=True)')."""
    from cogvlm.checkpoint import load_model

    state = as_bin(hf_copy, legacy)
    model, _ = load_model(hf_copy)
    for name, tensor in state.items():
        if not name.endswith("inv_freq"):
            assert torch.equal(model.state_dict()[name], tensor), name


BIN_CASES = {
    "code in the pickle": lambda p: p.write_bytes(b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03."),
    "a list, not a state dict": lambda p: torch.save([torch.ones(2)], p),
    "names that are not strings": lambda p: torch.save({1: torch.ones(2)}, p),
    "values that are not tensors": lambda p: torch.save({"lm_head.weight": "x"}, p),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:1000]),
    "legacy truncated": lambda p: (torch.save(load_file_bin(p), p, _use_new_zipfile_serialization=False),
                                   p.write_bytes(p.read_bytes()[:5000])),
}


def load_file_bin(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("case", sorted(BIN_CASES))
def test_crafted_bin_checkpoints_are_named_errors(case, hf_copy, capsys, tmp_path):
    as_bin(hf_copy, legacy=False)
    BIN_CASES[case](hf_copy / "pytorch_model.bin")
    check_refused(hf_copy, capsys, tmp_path)


# ---- SAT folders ----------------------------------------------------------------------------------

@pytest.fixture
def sat(tiny_model, tmp_path) -> Path:
    write_sat(tmp_path / "sat", tiny_model)
    return tmp_path / "sat"


def outside(folder: Path) -> None:
    """`latest` names a folder outside the checkpoint, which holds a real SAT state."""
    shutil.copytree(folder / "1000", folder.parent / "elsewhere")
    (folder / "latest").write_text("../elsewhere\n")


SAT_CASES = {
    "latest outside the folder": outside,
    "latest absolute": lambda f: (f / "latest").write_text(str(f / "1000")),
    "latest empty": lambda f: (f / "latest").write_text(""),
    "latest a folder": lambda f: ((f / "latest").unlink(), (f / "latest").mkdir()),
    "latest not UTF-8": lambda f: (f / "latest").write_bytes(b"\xff\xfe"),
    "latest with a NUL": lambda f: (f / "latest").write_text("10\x0000"),
    "state a list": lambda f: torch.save([1, 2], f / "1000" / "mp_rank_00_model_states.pt"),
    "state with tensor names": lambda f: torch.save({"module": {1: torch.ones(1)}},
                                                    f / "1000" / "mp_rank_00_model_states.pt"),
    "state values not tensors": lambda f: torch.save({"module": {"mixins.eva.boi": [1]}},
                                                     f / "1000" / "mp_rank_00_model_states.pt"),
    "model_config not JSON": write("model_config.json", b"{"),
    "model_config num_layers 0": edit_json("model_config.json", lambda c: c.update(num_layers=0)),
}


@pytest.mark.parametrize("case", sorted(SAT_CASES))
def test_crafted_sat_checkpoints_are_named_errors(case, sat, capsys, tmp_path):
    SAT_CASES[case](sat)
    check_refused(sat, capsys, tmp_path, chat=False)


def test_sat_ranks_that_disagree_are_named(tiny_model, tmp_path, capsys):
    """Two mp_rank files with different tensor names or shapes: a KeyError or a torch.cat
    RuntimeError before."""
    write_sat(tmp_path / "sat", tiny_model, world=2)
    state = torch.load(tmp_path / "sat" / "1000" / "mp_rank_01_model_states.pt", weights_only=True)
    state["module"].pop(next(iter(state["module"])))
    torch.save(state, tmp_path / "sat" / "1000" / "mp_rank_01_model_states.pt")
    check_refused(tmp_path / "sat", capsys, tmp_path, chat=False)


def test_a_good_sat_checkpoint_still_loads(sat, tiny_model):
    from cogvlm.checkpoint import load_model

    same_weights(load_model(sat)[0], tiny_model)
