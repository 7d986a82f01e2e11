"""FSDP over a checkpoint: each of 2 gloo ranks (real torch.distributed, spawned processes, CPU)
reads only its own rows of each weight, and training matches one process's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from cogvlm.checkpoint import safetensors_index, save_hf
from cogvlm.data.synthetic import make_dataset
from cogvlm.finetune import TrainArgs, Trainer, init_weights
from cogvlm.model import CogVLMForCausalLM
from tests.configs import tiny_test_config
from tests.processes import free_port

IMAGE_SIZE = 56


@pytest.fixture(scope="module")
def base(tmp_path_factory, sp_model_path) -> dict[str, Path]:
    """A tiny checkpoint stored in bf16 (as the published ones), its tokenizer, and scenes."""
    root = tmp_path_factory.mktemp("fsdp")
    cfg = tiny_test_config(vocab_size=400, template="vqa", vision={"image_size": IMAGE_SIZE})
    torch.manual_seed(0)
    model = CogVLMForCausalLM(cfg)
    init_weights(model)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    folder = save_hf(state, cfg, root / "ckpt", extra_files=(sp_model_path,))
    data = make_dataset(root / "data", n_images=16, seed=1, image_size=IMAGE_SIZE)
    return {"model": folder, "data": data if data.suffix == ".jsonl" else data / "data.jsonl"}


def train_args(base, out: Path, **kw) -> TrainArgs:
    a = dict(data=base["data"], out=out, model=str(base["model"]), train="vision_expert,language", lora=True,
             lora_r=4, steps=4, batch_size=4, lr=3e-3, warmup=1, progress=False, seed=0)
    a.update(kw)
    return TrainArgs(**a)


def _rank(rank: int, port: int, args: TrainArgs, reads: Path) -> None:
    """One FSDP rank, with a spy on the one function every safetensors data read goes through."""
    import torch.distributed as dist

    import cogvlm.checkpoint as checkpoint

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    seen, read = [], checkpoint._read_bytes

    def spy(f, start, nbytes, name):
        seen.append([name, start, nbytes])
        return read(f, start, nbytes, name)

    checkpoint._read_bytes = spy
    trainer = Trainer(args)
    reads.with_name(f"{reads.name}.{rank}.json").write_text(json.dumps(seen))  # the load is over
    trainer.fit()
    dist.destroy_process_group()


def on_two_ranks(args: TrainArgs, reads: Path) -> list[list[list]]:
    mp.spawn(_rank, args=(free_port(), args, reads), nprocs=2, join=True)
    return [json.loads(reads.with_name(f"{reads.name}.{r}.json").read_text()) for r in range(2)]


def losses(out: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_fsdp_ranks_read_their_own_rows_and_train_as_one_process(base, tmp_path, lora):
    extra = {} if lora else {"lora": False, "train": "vision_expert"}
    one = Trainer(train_args(base, tmp_path / "one", **extra))
    before = {n.replace(".default", ""): p.detach().clone() for n, p in one.inner.named_parameters() if p.requires_grad}
    one.fit()
    reads = on_two_ranks(train_args(base, tmp_path / "two", batch_size=2, fsdp=True, **extra), tmp_path / "reads")

    # Each rank read a disjoint half of every weight's rows: together exactly the stored bytes,
    # each about half (a tensor of odd rows gives one rank one row more), nothing twice.
    stored = safetensors_index(base["model"])
    total = sum(t.dtype.itemsize * torch.Size(t.shape).numel() for t in stored.values())
    spans = {}
    for rank, seen in enumerate(reads):
        for name, start, nbytes in seen:
            assert name not in spans.get(rank, {}), f"rank {rank} read {name} twice"
            spans.setdefault(rank, {})[name] = (start, nbytes)
        assert 0.45 * total < sum(n for _, _, n in seen) < 0.55 * total
    assert spans[0].keys() == spans[1].keys() == stored.keys()
    for name, t in stored.items():
        (s0, n0), (s1, n1) = spans[0][name], spans[1][name]
        whole = t.dtype.itemsize * torch.Size(t.shape).numel()
        assert (s0, s0 + n0 + n1) == (t.start, t.start + whole) and s1 == s0 + n0, name
        assert n0 >= n1 and (n1 > 0 or t.shape[0] == 1), name  # only one-row tensors go to one rank

    # Same global batch (2 ranks x 2 = 1 x 4): the same losses up to summation order (bf16
    # autocast on both sides). The trained weights agree to 5% of how far training moved them:
    # Adam's first steps are ~lr x sign(gradient), so rounding noise in near-zero gradient
    # entries becomes lr-sized differences (measured: 2-3%).
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=2e-3)
    assert losses(tmp_path / "one")[-1] < losses(tmp_path / "one")[0]
    if lora:
        from safetensors.torch import load_file

        got, want = (load_file(tmp_path / run / "final" / "adapter_model.safetensors") for run in ("two", "one"))
    else:
        from cogvlm.checkpoint import load_model

        got, want = (load_model(tmp_path / run / "final")[0].state_dict() for run in ("two", "one"))
    assert got.keys() == want.keys() and before.keys() <= want.keys()
    diff = torch.cat([(got[k].float() - want[k].float()).flatten() for k in before]).norm()
    moved = torch.cat([(want[k].float() - v.float()).flatten() for k, v in before.items()]).norm()
    assert diff < 0.05 * moved, (diff, moved)
    frozen = [k for k in want if k not in before]  # full fine-tuning: what did not train is the checkpoint's
    assert all(torch.equal(got[k], want[k]) for k in frozen)
