"""Fine-tuning CogVLM2-Video on a video set ({"id", "video", "question", "answer"} lines) with the
tiny published-layout checkpoint (conftest.video_checkpoint) and real encoded clips
(tests/test_caption_video.clip): the batch equals a spec-literal construction (ids, token types,
positions with the chat template's frame indices, labels -100 before answer + eos, pixels), each
clip is sampled once per record per epoch, LoRA on the language layers (and the ViT) lowers the
loss, and the mistakes a video model invites are named. `cogvlm plan --finetune` counts the
published model's trainables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("av")

from tokenizers import Tokenizer as HFTokenizer  # noqa: E402

from cogvlm import finetune as ft  # noqa: E402
from cogvlm.checkpoint import load_model  # noqa: E402
from cogvlm.cli.main import main  # noqa: E402
from cogvlm.data.records import read_video_records  # noqa: E402
from cogvlm.errors import TrainingError, VideoError  # noqa: E402
from cogvlm.tokenizer import Tokenizer  # noqa: E402
from cogvlm.video import load_video, strategy_for  # noqa: E402

from .test_caption_video import CORRUPT, clip  # noqa: E402
from .test_video_model import SIZE, spec_layout, spec_positions, spec_preprocess  # noqa: E402

ANSWERS = ["red", "a green square", "blue", "yellow then purple"]
SPEC_TEXT = {"chat": "Question: {} Answer:", "base": "{}"}  # docs/spec/cogvlm2-video.md section 7


def write_set(root: Path, n: int = 4, corrupt: bool = False) -> Path:
    """n real clips (2-4 s at 2 fps: 3-5 frames by the chat rule) and their records; a corrupt
    clip as line 2 when asked."""
    (root / "clips").mkdir(parents=True, exist_ok=True)
    lines = []
    for k in range(n):
        (root / "clips" / f"c{k}.mp4").write_bytes(clip(3 * k))  # clip(3k) is an MP4
        lines.append({"id": k, "video": f"clips/c{k}.mp4", "question": f"What colour is it, {k}?", "answer": ANSWERS[k]})
        if corrupt and k == 0:
            (root / "clips" / "bad.mp4").write_bytes(CORRUPT)
            lines.append({"id": "bad", "video": "clips/bad.mp4", "question": "?", "answer": "x"})
    data = root / "set.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return data


@pytest.fixture(scope="module")
def model(video_checkpoint: Path):
    return load_model(video_checkpoint, dtype=torch.float32)[0]


@pytest.mark.parametrize("template", ["chat", "base"])
def test_batch_equals_the_spec_literal_layout(model, video_checkpoint, tmp_path, template):
    cfg = model.config
    hf = HFTokenizer.from_file(str(video_checkpoint / "tokenizer.json"))
    data = write_set(tmp_path, 3)
    records, _ = read_video_records(data)
    examples, errors = ft.make_video_examples(records, Tokenizer(video_checkpoint / "tokenizer.json"), cfg, 2048,
                                              template)
    assert not errors and len(examples) == 3
    chunk, labels = ft.collate(examples, cfg)
    pixels = []
    for row, rec in enumerate(records):
        video = load_video(rec.video, strategy_for(template))  # the template's rule (section 8)
        frames = video.shape[1]
        answer = hf.encode(rec.answers[0], add_special_tokens=False).ids + [cfg.eos_token_id]
        text = hf.encode(SPEC_TEXT[template].format(rec.question), add_special_tokens=False).ids
        ids, types = spec_layout(hf, cfg, text + answer, frames, template)  # section 6, answer appended
        spec_labels = [-100] * (len(ids) - len(answer)) + answer
        real = chunk.attention_mask[row]
        assert chunk.input_ids[row, real].tolist() == ids
        assert chunk.frame_slots[row, real].tolist() == [t == 1 for t in types]
        assert chunk.position_ids[row, real].tolist() == spec_positions(types)
        # ours are shifted for the loss: the label of the token at column i is the token at i + 1
        assert labels[row, real].tolist() == spec_labels[1:] + [-100]
        assert not (labels[row, ~real] != -100).any()
        pixels.append(spec_preprocess(video, SIZE))
    if template == "chat":  # the index after each frame, "0", "1", ...: 4 positions a frame
        assert chunk.position_ids[0, chunk.attention_mask[0]].tolist()[len(ids) - len(answer) - len(text)] \
            == 4 * len(pixels[0]) + 1
    assert torch.allclose(chunk.frames.double(), torch.cat(pixels), atol=1e-5, rtol=0)


def counting(real, calls: list):
    def spy(video, cfg, template):
        calls.append(Path(video))
        return real(video, cfg, template)
    return spy


def train_args(video_checkpoint: Path, data: Path, out: Path, **kw) -> ft.TrainArgs:
    base = dict(data=data, eval_data=data, out=out, model=str(video_checkpoint), lora=True, lora_r=8, lora_alpha=64, template="chat",
                steps=12, batch_size=2, lr=3e-3, warmup=1, min_lr_ratio=1.0, dtype="fp32", progress=False, seed=0)
    return ft.TrainArgs(**{**base, **kw})


@pytest.mark.parametrize("train", [None, "language,vit"])
def test_lora_on_a_video_model_lowers_the_loss(video_checkpoint, tmp_path, monkeypatch, train):
    data = write_set(tmp_path / "data", corrupt=True)
    calls: list[Path] = []
    monkeypatch.setattr(ft, "video_frames", counting(ft.video_frames, calls))
    trainer = ft.Trainer(train_args(video_checkpoint, data, tmp_path / "out", train=train))
    assert [e.line for e in trainer.errors] == [2] and "corrupt" in trainer.errors[0].message
    lora = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)
    adapted = {n.split(".lora_")[0].removeprefix("base_model.model.") for n in lora}
    language = {n for n in adapted if n.startswith("model.layers.")}
    vit = {n for n in adapted if n.startswith("model.vision.transformer.")}
    assert len(language) == 2 * 5 and all("language_" in n for n in language)  # 2 layers x qkv, dense, 3 MLP
    assert len(vit) == (0 if train is None else 2 * 4) and len(adapted) == len(language) + len(vit)
    first = trainer.evaluate()
    trainer.fit()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and losses[-1] < 0.75 * losses[0], losses
    assert trainer.evaluate() < 0.75 * first
    # 12 steps x 2 = 24 examples = 6 epochs of 4 records: each clip decoded once per epoch, and once per evaluate()
    assert sorted(calls) == sorted([e.video for e in trainer.examples] * (6 + 2))
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").is_file()


def test_video_mistakes_are_named(video_checkpoint, tiny_checkpoint, tmp_path):
    data = write_set(tmp_path / "data", n=2)
    with pytest.raises(TrainingError, match="no visual expert"):
        ft.Trainer(train_args(video_checkpoint, data, tmp_path / "a", train="vision_expert,language"))
    with pytest.raises(TrainingError, match="unknown template"):
        ft.Trainer(train_args(video_checkpoint, data, tmp_path / "b", template="chatty"))
    with pytest.raises(VideoError, match="takes images, not videos"):
        ft.Trainer(train_args(tiny_checkpoint, data, tmp_path / "c", lora=False, train="all"))
    images = tmp_path / "images.jsonl"
    images.write_text(json.dumps({"image": "clips/c0.mp4", "template": "chat", "turns": [{"query": "q", "answer": "a"}]})
                      + "\n" + json.dumps({"image": None, "template": "chat", "turns": [{"query": "q", "answer": "a"}]}) + "\n")
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "c0.mp4").write_bytes(b"")
    records, _ = ft.read_records(images, check_images=False)
    examples, errors = ft.make_examples(records, Tokenizer(video_checkpoint / "tokenizer.json"),
                                        load_model(video_checkpoint)[0].config, 2048)
    assert len(examples) == 1 and [e.line for e in errors] == [1] and "takes videos" in errors[0].message


def test_plan_finetune_of_the_published_video_model(capsys):
    """LoRA r=8 on the language layers: 32 x 8 x (4096+6144 + 4096+4096 + 3 x (4096+14336)) = 18,874,368;
    full: the language weights, 8,030,261,248 (docs/spec/cogvlm2-video.md section 3)."""
    assert main(["plan", "cogvlm2-video-llama3-chat", "--finetune", "lora", "--gpu-memory", "80GB"]) == 0
    assert "(18,874,368 parameters)" in capsys.readouterr().out
    assert main(["plan", "cogvlm2-video-llama3-chat", "--finetune", "full", "--gpu-memory", "80GB"]) == 1
    assert "(8,030,261,248 parameters)" in capsys.readouterr().out
    assert main(["plan", "cogvlm2-video-llama3-chat", "--finetune", "lora", "--train", "vision_expert"]) == 2
    assert "no visual expert" in capsys.readouterr().err
