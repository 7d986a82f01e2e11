"""QLoRA teaches the shipped cogvlm-tiny a new skill as well as LoRA over its bf16 weights does.

The skill: "How many objects are there? Add one." answered with the count plus one ("4" for
three shapes), where the model answers the count. It needs what the model knows (counting the
shapes, digits) and something it does not (the rule), so held-out accuracy starts near 0 and
measures what the adapters learnt. (Counts spelt out as words were tried first: 40 steps teach
the tiny byte-level tokenizer's spellings only in part, "foue", so both runs scored 0.) Both
runs: adapters on the visual expert and the language layers, rank 8, the same 40 steps of 8
fresh synthetic scenes each (seeds cogvlm-tiny never saw), one over the int4-packed base, one over
the bf16 base; then greedy answers on 120 other new scenes through `CogVLM.from_pretrained(...,
adapter=)`, as a user would load the result.

The learning rate is 3e-3: at 1e-2 both runs oscillate (training loss ends at 0.2-0.45) and
held-out accuracy swings between 0.3 and 0.83 with the seed, for the int4 and the bf16 base
alike (docs/finetune.md), so the comparison measured the seed rather than QLoRA. At 3e-3 both
end near a loss of 0.06 and 0.92-0.93 accuracy on 60 scenes, for seeds 0 and 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cogvlm import CogVLM
from cogvlm.data.synthetic import TRAINING_SEEDS, make_scene
from cogvlm.finetune import TrainArgs, finetune

QUERY = "How many objects are there? Add one."
TRAIN_SEED, HELD_OUT_SEED = 3100, 3200  # new scenes: cogvlm-tiny trained on seeds 0-16
N_HELD_OUT = 120  # scenes; an answer is 1/120 = 0.008 of accuracy
STEPS, BATCH = 40, 8


def scenes(seed: int, n: int):
    assert seed not in TRAINING_SEEDS
    return [make_scene(seed * 1_000_003 + i, 112) for i in range(n)]


@pytest.fixture(scope="module")
def counting(tmp_path_factory) -> Path:
    """STEPS x BATCH scenes (each seen once), each asked the counting question."""
    root = tmp_path_factory.mktemp("count-words")
    (root / "images").mkdir()
    lines = []
    for i, scene in enumerate(scenes(TRAIN_SEED, STEPS * BATCH)):
        scene.image.save(root / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "template": "vqa",
                                 "turns": [{"query": QUERY, "answer": str(len(scene.objects) + 1)}]}))
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root / "data.jsonl"


def accuracy(adapter: Path | None, quant: int | None = None) -> float:
    """Exact-match accuracy of greedy answers over the held-out scenes, in bf16 (as trained)."""
    vlm = CogVLM.from_pretrained("cogvlm-tiny", dtype="bf16", device="cpu", quant=quant, adapter=adapter)
    held = scenes(HELD_OUT_SEED, N_HELD_OUT)
    answers = vlm.generate([(s.image, QUERY, None) for s in held], "vqa", top_k=1, max_new_tokens=6)
    return sum(a.strip() == str(len(s.objects) + 1) for a, s in zip(answers, held)) / len(held)


def train(data: Path, out: Path, **kw) -> tuple[Path, list[float]]:
    adapter = finetune(TrainArgs(data=data, out=out, model="cogvlm-tiny", lora=True, lora_r=8, lora_alpha=16,
                                 train="vision_expert,language", steps=STEPS, batch_size=BATCH, lr=3e-3, warmup=2,
                                 progress=False, seed=0, **kw))
    return adapter, [json.loads(l)["loss"] for l in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_int4_qlora_learns_a_new_skill_as_well_as_bf16_lora(counting, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = accuracy(None)
    int4, int4_losses = train(counting, tmp_path / "int4", quant=4, grad_checkpointing=True)
    bf16, bf16_losses = train(counting, tmp_path / "bf16", dtype="bf16")
    for losses in (int4_losses, bf16_losses):  # the mean of the last 5 steps against the first 5
        assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses
    got, want = accuracy(int4, 4), accuracy(bf16)
    assert before < 0.1 and want > 0.8, (before, got, want)  # the skill is new, and LoRA learns it
    assert abs(got - want) <= 0.03, (before, got, want)
