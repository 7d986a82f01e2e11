"""Checkpoint round trips on tiny random weights, in the real file formats and names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cogvlm.checkpoint import CheckpointError, convert, load_model, save_hf
from cogvlm.prompt import PromptTokens, layout_batch

# HF name → SAT name, written out from sat-names.md (independent of cogvlm.checkpoint).
def sat_name(hf: str) -> str:
    parts = hf.split(".")
    if hf.startswith("model.layers."):
        i, rest = parts[2], ".".join(parts[3:])
        return {
            "input_layernorm.weight": f"transformer.layers.{i}.input_layernorm.weight",
            "post_attention_layernorm.weight": f"transformer.layers.{i}.post_attention_layernorm.weight",
            "self_attn.language_expert_query_key_value.weight": f"transformer.layers.{i}.attention.query_key_value.weight",
            "self_attn.language_expert_dense.weight": f"transformer.layers.{i}.attention.dense.weight",
            "mlp.language_mlp.up_proj.weight": f"transformer.layers.{i}.mlp.dense_h_to_4h.weight",
            "mlp.language_mlp.down_proj.weight": f"transformer.layers.{i}.mlp.dense_4h_to_h.weight",
            "mlp.language_mlp.gate_proj.weight": f"mixins.mlp.gate_proj.{i}.weight",
            "mlp.vision_mlp.up_proj.weight": f"mixins.mlp.vision_dense_h_to_4h_list.{i}.weight",
            "mlp.vision_mlp.down_proj.weight": f"mixins.mlp.vision_dense_4h_to_h_list.{i}.weight",
            "mlp.vision_mlp.gate_proj.weight": f"mixins.mlp.vision_gate_proj.{i}.weight",
            "self_attn.vision_expert_query_key_value.weight": f"mixins.rotary.vision_query_key_value_list.{i}.weight",
            "self_attn.vision_expert_dense.weight": f"mixins.rotary.vision_dense_list.{i}.weight",
        }[rest]
    if hf.startswith("model.vision.transformer.layers."):
        j, rest = parts[4], ".".join(parts[5:])
        rest = rest.replace("mlp.fc1", "mlp.dense_h_to_4h").replace("mlp.fc2", "mlp.dense_4h_to_h")
        return f"mixins.eva.vit_model.transformer.layers.{j}.{rest}"
    return {
        "model.embed_tokens.weight": "transformer.word_embeddings.weight",
        "model.norm.weight": "transformer.final_layernorm.weight",
        "lm_head.weight": "mixins.lm.lm_head.weight",
        "model.vision.patch_embedding.proj.weight": "mixins.eva.vit_model.mixins.patch_embedding.proj.weight",
        "model.vision.patch_embedding.proj.bias": "mixins.eva.vit_model.mixins.patch_embedding.proj.bias",
        "model.vision.patch_embedding.cls_embedding": "mixins.eva.vit_model.transformer.word_embeddings.weight",
        "model.vision.patch_embedding.position_embedding.weight": "mixins.eva.vit_model.transformer.position_embeddings.weight",
        "model.vision.boi": "mixins.eva.boi",
        "model.vision.eoi": "mixins.eva.eoi",
    }.get(hf, hf.replace("model.vision.linear_proj.", "mixins.eva.linear_proj."))


def rank_slice(hf: str, t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """How the authors' model-parallel code splits each tensor (sat-names.md, third column)."""
    if "query_key_value" in hf:
        return torch.cat([blk.chunk(world, 0)[rank] for blk in t.chunk(3, 0)])
    dim0 = ("embed_tokens", "lm_head", "gate_proj", "up_proj", "fc1", "vision_mlp.up_proj")
    if any(k in hf for k in dim0) and "linear_proj" not in hf:
        return t.chunk(world, 0)[rank]
    if hf.endswith(("expert_dense.weight", "down_proj.weight", "attention.dense.weight", "fc2.weight")):
        return t.chunk(world, 1)[rank]
    return t


def write_sat(folder, model, world=1, iteration=1000):
    cfg = model.config
    v = cfg.vision
    folder.mkdir(parents=True)
    (folder / "latest").write_text(f"{iteration}\n")
    (folder / "model_config.json").write_text(json.dumps({
        "model_class": "CogVLMModel", "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_heads, "vocab_size": cfg.vocab_size,
        "inner_hidden_size": cfg.intermediate_size, "layernorm_epsilon": cfg.rms_norm_eps,
        "image_length": v.num_patches, "text_processor_version": "chat_old",
        "max_sequence_length": cfg.max_position_embeddings,
        "eva_args": {"num_layers": v.num_layers, "hidden_size": v.hidden_size,
                     "num_attention_heads": v.num_heads, "inner_hidden_size": v.intermediate_size,
                     "layernorm_epsilon": v.layer_norm_eps, "image_size": [v.image_size, v.image_size],
                     "patch_size": v.patch_size, "pre_len": 1, "vocab_size": 1},
    }))
    (folder / str(iteration)).mkdir()
    for rank in range(world):
        sd = {sat_name(k): rank_slice(k, t, rank, world).clone() for k, t in model.state_dict().items()}
        sd["mixins.rotary.rotary_emb.inv_freq"] = torch.ones(cfg.head_dim // 2)
        torch.save({"module": sd, "iteration": iteration},
                   folder / str(iteration) / f"mp_rank_{rank:02d}_model_states.pt")


def same_weights(loaded, original) -> None:
    """Loading copies tensors: each must be bit-identical to the one saved, and own aligned memory.

    The logits of two bit-identical models agree only within rounding: CPU GEMM kernels pick
    their blocking by thread count and by the operands' 64-byte alignment, so the same fp32
    numbers can be summed in another order (measured: 8.3e-7 at 2 threads for unaligned weights).
    """
    mine, theirs = loaded.state_dict(), original.state_dict()
    assert mine.keys() == theirs.keys()
    for name, tensor in mine.items():
        assert tensor.dtype == theirs[name].dtype and torch.equal(tensor, theirs[name]), name
        assert tensor.data_ptr() % 64 == 0, f"{name} is not 64-byte aligned"


def same_logits(loaded, original) -> None:
    """fp32 logits within 1e-5: the tiny model's logits are O(1) and a reordered fp32 sum of a few
    hundred terms moves them by ~1e-6 at most."""
    torch.testing.assert_close(logits(loaded), logits(original), rtol=1e-5, atol=1e-5)


def logits(model):
    g = torch.Generator().manual_seed(0)
    chunk = layout_batch([PromptTokens(torch.randn(3, 28, 28, generator=g), [5, 6, 7]),
                          PromptTokens(None, [8, 9])], model.config)
    with torch.no_grad():
        return model(chunk)


def test_hf_sharded_and_single_file_round_trip(tiny_model, tmp_path):
    out = save_hf(tiny_model.state_dict(), tiny_model.config, tmp_path / "hf", max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert json.loads((out / "config.json").read_text())["vision_config"]["num_positions"] == 5
    loaded, _ = load_model(out)
    same_weights(loaded, tiny_model)
    same_logits(loaded, tiny_model)

    single = tmp_path / "single"
    single.mkdir()
    (single / "config.json").write_text((out / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, single / "model.safetensors")
    loaded, _ = load_model(single)
    same_weights(loaded, tiny_model)
    same_logits(loaded, tiny_model)


@pytest.mark.parametrize("world", [1, 2])
def test_sat_checkpoint_loads(tiny_model, tmp_path, world):
    write_sat(tmp_path / "sat", tiny_model, world=world)
    loaded, _ = load_model(tmp_path / "sat")
    assert loaded.config == tiny_model.config  # template chat_old → chat
    same_weights(loaded, tiny_model)
    same_logits(loaded, tiny_model)


def test_convert_round_trip_is_bit_exact(tiny_model, tmp_path):
    bf16 = {k: v.to(torch.bfloat16) for k, v in tiny_model.state_dict().items()}
    model16 = type(tiny_model)(tiny_model.config)
    model16.load_state_dict(bf16)
    write_sat(tmp_path / "sat", model16.to(torch.bfloat16), world=2)
    a = convert(tmp_path / "sat", tmp_path / "a", max_shard_bytes=50_000)
    b = convert(a, tmp_path / "b", max_shard_bytes=50_000)
    for folder in (a, b):
        state = {}
        for f in folder.glob("*.safetensors"):
            state.update(load_file(f))
        assert state.keys() == bf16.keys()
        for k, t in bf16.items():
            assert state[k].dtype == torch.bfloat16 and torch.equal(state[k], t), k
        assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded, _ = load_model(b, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16


def test_mismatched_checkpoint_lists_every_problem(tiny_model, tmp_path):
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    del state["model.layers.1.mlp.vision_mlp.up_proj.weight"]
    state["model.extra.weight"] = torch.zeros(3)
    state["lm_head.weight"] = torch.zeros(7, 64)
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny_model.config.to_hf_dict()))
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    msg = str(e.value)
    assert "1 missing: model.layers.1.mlp.vision_mlp.up_proj.weight" in msg
    assert "1 unexpected: model.extra.weight" in msg
    assert "1 with the wrong shape: lm_head.weight [7, 64] (model expects [400, 64])" in msg


def test_bad_names_and_folders(tmp_path):
    with pytest.raises(CheckpointError, match="unknown model 'no such model'.*cogvlm-chat-v1.1"):
        load_model("no such model")
    with pytest.raises(CheckpointError, match="neither config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(tmp_path)


def test_offline_hub_id_says_what_is_missing(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    code = ("from cogvlm.checkpoint import resolve, CheckpointError\n"
            "try:\n    resolve('cogvlm-chat-v1.1')\nexcept CheckpointError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "cannot get THUDM/cogvlm-chat-hf: HF_HUB_OFFLINE is set" in out.stdout
    assert "model.safetensors.index.json" in out.stdout and "--model /path/to/folder" in out.stdout
    # the download command the pinned huggingface_hub ships (`hf`, not `huggingface-cli`), for the
    # weights and for Vicuna's tokenizer, which the v1 checkpoints need; all on one line
    assert "`hf download THUDM/cogvlm-chat-hf --local-dir DIR`" in out.stdout
    assert "`hf download lmsys/vicuna-7b-v1.5 tokenizer.model --local-dir DIR`" in out.stdout
    assert out.stdout.count("\n") == 1
    assert (Path(sys.executable).parent / "hf").is_file()


def test_convert_command(tiny_model, tmp_path):
    write_sat(tmp_path / "sat", tiny_model, world=2)
    run = [sys.executable, "-m", "cogvlm", "convert"]
    out = subprocess.run(run + [str(tmp_path / "sat"), str(tmp_path / "hf")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    loaded, _ = load_model(tmp_path / "hf")
    same_weights(loaded, tiny_model)
    same_logits(loaded, tiny_model)
    bad = subprocess.run(run + [str(tmp_path / "nowhere"), str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "cogvlm convert: error: unknown model" in bad.stderr


def test_convert_never_touches_a_folder_it_did_not_write(tiny_model, tmp_path):
    """`cogvlm convert SRC ~/models` once erased everything in ~/models: a destination holding
    anything else is refused before any work; a checkpoint of ours is replaced only with --force;
    an empty folder is fine."""
    src = save_hf(tiny_model.state_dict(), tiny_model.config, tmp_path / "src")
    models = tmp_path / "models"
    (models / "other-model").mkdir(parents=True)
    (models / "other-model" / "weights.bin").write_bytes(b"precious")
    (models / "notes.txt").write_text("mine")
    run = [sys.executable, "-m", "cogvlm", "convert", str(src)]
    out = subprocess.run(run + [str(models)], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "holds files cogvlm did not write (notes.txt, other-model)" in out.stderr
    forced = subprocess.run(run + [str(models), "--force"], capture_output=True, text=True)
    assert forced.returncode == 2 and "did not write" in forced.stderr
    assert (models / "other-model" / "weights.bin").read_bytes() == b"precious"
    assert (models / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "src"]  # no temporary folder left

    (tmp_path / "empty").mkdir()
    assert subprocess.run(run + [str(tmp_path / "empty")], capture_output=True).returncode == 0
    again = subprocess.run(run + [str(tmp_path / "empty")], capture_output=True, text=True)
    assert again.returncode == 2 and "already holds a checkpoint" in again.stderr and "--force" in again.stderr
    assert subprocess.run(run + [str(tmp_path / "empty"), "--force"], capture_output=True).returncode == 0
    same_weights(load_model(tmp_path / "empty")[0], tiny_model)
    with pytest.raises(CheckpointError, match="did not write"):  # the API refuses too
        save_hf(tiny_model.state_dict(), tiny_model.config, models, force=True)


def test_loaded_weights_do_not_depend_on_the_file(tiny_model, tmp_path):
    """fp32 weights stored as fp32 are copied on load: rewriting the checkpoint in place (as an
    update under a running server would) leaves the loaded model as it was."""
    out = save_hf(tiny_model.state_dict(), tiny_model.config, tmp_path / "hf")
    loaded, _ = load_model(out)
    for shard in out.glob("*.safetensors"):
        with open(shard, "r+b") as f:  # same size, every tensor byte zeroed, through the same inode
            header = 8 + int.from_bytes(f.read(8), "little")
            f.seek(header)
            f.write(bytes(shard.stat().st_size - header))
    same_weights(loaded, tiny_model)
