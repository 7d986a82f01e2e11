"""CogVLM2-Video on the surfaces this branch covers: the published model's prompt with the real
Llama-3 tokenizer (frame indices, 1 + 67 T + n slots, positions), loading the three models by
registry name with their demos' templates, and `cogvlm chat --video`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cogvlm import CogVLM
from cogvlm.cli import main
from cogvlm.config import REGISTRY
from cogvlm.prompt import PromptTokens, build_prompt, frame_labels, layout_batch, prompt_length

from .test_caption import ENV
from .test_cogvlm2_surfaces import fake_hub_cache

GREEDY = {"top_k": 1, "max_new_tokens": 6}
GREEDY_FLAGS = ["--top_k", "1", "--max_new_tokens", "6"]


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    from cogvlm.tokenizer import Tokenizer

    from .llama3 import llama3_tokenizer_json

    return Tokenizer(llama3_tokenizer_json(tmp_path_factory.mktemp("llama3") / "tokenizer.json"))


@pytest.fixture(scope="module")
def vlm(video_checkpoint) -> CogVLM:
    return CogVLM.from_pretrained(video_checkpoint, device="cpu")


def test_the_captioners_prompt_with_llama3_ids(llama3):
    """docs/spec/cogvlm2-video.md sections 6 and 7: index ids, the prompt's ids, 1620 slots for 24
    frames, the prompt at positions 97 ... 107 (chat); base: one run, the prompt from position 4."""
    cfg = REGISTRY["cogvlm2-llama3-caption"].config
    labels = frame_labels(llama3, 24, "chat")
    assert labels == tuple([i] for i in [*range(15, 25), 605, 806, 717, 1032, 975, 868, 845, 1114, 972, 777, 508,
                                          1691, 1313, 1419])
    chat = llama3.encode(build_prompt("Please describe this video in detail.", (), "chat"))
    assert chat == [14924, 25, 5321, 7664, 420, 2835, 304, 7872, 13, 22559, 25]
    frames = torch.zeros(24, 3, 224, 224)
    prompt = PromptTokens(None, chat, frames=frames, frame_labels=labels)
    assert prompt_length(prompt, cfg) == 1 + 67 * 24 + 11 == 1620
    chunk = layout_batch([prompt], cfg)
    assert chunk.input_ids.shape == (1, 1620) and int(chunk.frame_slots.sum()) == 24 * 66
    assert chunk.position_ids[0, -11:].tolist() == list(range(97, 108))
    base = llama3.encode(build_prompt("Please describe this video in detail.", (), "base"))
    assert base == [5618, 7664, 420, 2835, 304, 7872, 13]
    one_run = layout_batch([PromptTokens(None, base, frames=frames, frame_labels=frame_labels(llama3, 24, "base"))],
                           cfg)
    assert one_run.input_ids.shape[1] == 1 + 66 * 24 + 7
    assert one_run.position_ids[0, -8:].tolist() == [3, 4, 5, 6, 7, 8, 9, 10]  # the last eoi, then the prompt


@pytest.mark.slow  # a subprocess with its own Hugging Face cache
def test_registry_names_load_with_their_demos_templates(vlm, video_checkpoint, tmp_path):
    """The files all say template base; by name the chat model and the captioner talk in chat."""
    for repo in ("THUDM/cogvlm2-llama3-caption", "THUDM/cogvlm2-video-llama3-base"):
        fake_hub_cache(tmp_path, repo, video_checkpoint)
    script = ("import torch\nfrom cogvlm import CogVLM\n"
              "clip = torch.randint(0, 256, (3, 2, 60, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))\n"
              "for name in ('cogvlm2-llama3-caption', 'THUDM/cogvlm2-video-llama3-base'):\n"
              "    vlm = CogVLM.from_pretrained(name, device='cpu')\n"
              "    print(vlm.config.template, vlm.chat(None, 'What happens?', video=clip, top_k=1, max_new_tokens=6)[0])\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**ENV, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    clip = torch.randint(0, 256, (3, 2, 60, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert vlm.config.template == "base"  # the folder keeps its config.json's
    assert out.stdout.splitlines() == [f"{t} {vlm.chat(None, 'What happens?', template=t, video=clip, **GREEDY)[0]}"
                                       for t in ("chat", "base")]


# ---- cogvlm chat --video -------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--video", "CLIP", "--image", "IMAGE", "--query", "hi"], "give --image or --video, not both"),
    (["--video", "MISSING", "--query", "hi"], "video file not found"),
    (["--image", "IMAGE", "--query", "hi"], "takes videos, not images"),
    (["--video", "CLIP", "--json"], "--json needs --query, or --image / --video with --no_prompt"),
])
def test_video_mistakes_give_one_line_and_exit_2(flags, message, video_checkpoint, tmp_path, capsys):
    from .test_caption import ROOT

    (tmp_path / "clip.mp4").write_bytes(b"not decoded before the checks")
    paths = {"CLIP": str(tmp_path / "clip.mp4"), "MISSING": str(tmp_path / "missing.mp4"),
             "IMAGE": str(ROOT / "cogvlm" / "web_examples" / "shapes-0.png")}
    assert main(["chat", "--model", str(video_checkpoint), *[paths.get(f, f) for f in flags]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cogvlm chat: error: ") and message in err and err.count("\n") == 1


def test_a_video_for_an_image_model_exits_2(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "clip.mp4").write_bytes(b"never decoded")
    assert main(["chat", "--model", str(tiny_checkpoint), "--video", str(tmp_path / "clip.mp4"), "--query", "hi"]) == 2
    err = capsys.readouterr().err
    assert "takes images, not videos" in err and err.count("\n") == 1


def write_clip(path: Path, frames: int = 12, fps: int = 4) -> Path:
    """A small real MPEG-4 clip (PyAV): a square moving over a gradient."""
    import av
    import numpy as np

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for i in range(frames):
            img = np.tile(np.linspace(0, 255, 96, dtype=np.uint8)[None, :, None], (64, 1, 3))
            img[20:40, 6 * i:6 * i + 20] = (255, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_chat_video_one_shot_and_caption(vlm, video_checkpoint, tmp_path, capsys):
    pytest.importorskip("cogvlm.video")  # the decoder module (its own branch)
    clip = write_clip(tmp_path / "clip.mp4")
    model = ["--model", str(video_checkpoint), *GREEDY_FLAGS]
    assert main(["chat", *model, "--video", str(clip), "--template", "chat", "--query", "What happens?"]) == 0
    assert capsys.readouterr().out == vlm.chat(None, "What happens?", template="chat", video=clip, **GREEDY)[0] + "\n"
    assert main(["chat", *model, "--video", str(clip), "--no_prompt"]) == 0
    assert capsys.readouterr().out == vlm.caption(video=clip, **GREEDY) + "\n"


def test_interactive_chat_about_a_video(vlm, video_checkpoint, tmp_path):
    pytest.importorskip("cogvlm.video")
    from .test_chat_cli import spawn, transcript

    clip = write_clip(tmp_path / "clip.mp4")
    session = vlm.session(template="chat", video=clip, **GREEDY)
    expected = [session.ask("What happens?"), session.ask("Why?")]
    child = spawn(["--model", str(video_checkpoint), "--template", "chat", *GREEDY_FLAGS], tmp_path)
    for prompt, line in [("video path", str(clip)), ("Human: ", "What happens?"), ("Human: ", "Why?"),
                         ("Human: ", "stop")]:
        child.expect_exact(prompt)
        child.sendline(line)
    child.read()
    child.close()
    assert child.exitstatus == 0, transcript(child)
    import re

    assert re.findall(r"^CogVLM: (.*?)\n(?=Human: )", transcript(child), re.M | re.S) == expected
