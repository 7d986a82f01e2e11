"""`cogvlm serve` with CogVLM2-Video: `video_url` content parts on a real server on loopback (the
tiny published-layout checkpoint of conftest.video_checkpoint, clips encoded in the test by
tests/test_video.make_clip). Answers must equal the API's (`CogVLM.chat(video=...)`, greedy) for
the same clip bytes; every mistake and every limit gets an OpenAI-style 4xx, and none of them
disturbs a request running beside it."""

from __future__ import annotations

import base64
import threading
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest

av = pytest.importorskip("av")

from cogvlm import CogVLM  # noqa: E402

from .test_caption_video import CORRUPT  # noqa: E402
from .test_server import (CONTEXT, assert_openai_error, client, data_url, post, scene, serving,  # noqa: E402
                          serving_files, user)
from .test_video import cfr, make_clip  # noqa: E402

MAX_VIDEO_BYTES, MAX_VIDEO_SECONDS, MAX_VIDEO_PIXELS, MAX_VIDEO_MEMORY = 40_000, 6, 20_000, 2_000_000
TOKENS = 8


def clip_url(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def video_user(text: str, url: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}, {"type": "video_url", "video_url": {"url": url}}]}


def two_seconds(first: int = 0, **kw) -> bytes:
    """A 2.5 s clip at 4 fps: the chat rule samples 3 frames of it."""
    return make_clip(range(10), Fraction(1, 4), 4, first=first, **kw)


@pytest.fixture(scope="module")
def video_vlm(video_checkpoint: Path) -> CogVLM:
    return CogVLM.from_pretrained(video_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def video_server(video_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tiny video model in the chat template (as the registry names load it), local files
    allowed, remote URLs not, and small video limits."""
    with serving(video_checkpoint, tmp_path_factory.mktemp("log") / "server.log", "--template", "chat",
                 "--allow-local-files", "--max-video-bytes", str(MAX_VIDEO_BYTES),
                 "--max-video-seconds", str(MAX_VIDEO_SECONDS), "--max-video-pixels", str(MAX_VIDEO_PIXELS),
                 "--max-video-memory", str(MAX_VIDEO_MEMORY)) as url:
        yield url


def reference(vlm: CogVLM, clip: bytes | None, query: str, history=None, tokens: int = TOKENS) -> str:
    return vlm.chat(None, query, history, template="chat", video=clip, top_k=1, max_new_tokens=tokens,
                    max_length=CONTEXT)[0]


def ask(url: str, messages: list[dict], tokens: int = TOKENS, **extra) -> httpx.Response:
    return post(url, {"messages": messages, "max_tokens": tokens, "temperature": 0, **extra})


def answer(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_a_video_and_a_text_request_side_by_side_answer_as_alone(video_server, video_vlm):
    """Concurrent requests on one video model, a clip and text only: each equals the API's answer."""
    clip = two_seconds()
    requests = [[video_user("What happens?", clip_url(clip))], [user("Hello there")],
                [video_user("Describe it.", clip_url(two_seconds(first=7)))]]
    out: dict[int, httpx.Response] = {}
    threads = [threading.Thread(target=lambda i=i, m=m: out.__setitem__(i, ask(video_server, m, 12)))
               for i, m in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = [reference(video_vlm, clip, "What happens?", tokens=12), reference(video_vlm, None, "Hello there", tokens=12),
                reference(video_vlm, two_seconds(first=7), "Describe it.", tokens=12)]
    assert len(set(expected)) == 3  # rows mixed up would show
    assert [answer(out[i]) for i in range(3)] == expected


def test_the_openai_client_streams_a_video_answer(video_server, video_vlm):
    clip = two_seconds(first=3)
    chunks = client(video_server).chat.completions.create(
        model=None, messages=[video_user("What is shown?", clip_url(clip))], max_tokens=TOKENS, temperature=0,
        stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference(video_vlm, clip, "What is shown?")


def test_an_image_on_the_video_model_is_refused_while_a_video_runs_unharmed(video_server, video_vlm):
    clip = two_seconds(first=20)
    running: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: running.setdefault("r", ask(video_server, [
        video_user("Tell me a long story.", clip_url(clip))], 40)))
    thread.start()
    error = assert_openai_error(ask(video_server, [user("What is this?", data_url(scene(1)))]), 400)
    assert error["code"] == "image_not_supported" and "video_url" in error["message"]
    error = assert_openai_error(ask(video_server, [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(scene(1))}},
                                     {"type": "video_url", "video_url": {"url": clip_url(clip)}}]}]), 400)
    assert error["code"] == "image_and_video"
    assert assert_openai_error(ask(video_server, [video_user("a", clip_url(CORRUPT))]), 400)["code"] == "invalid_video"
    thread.join()
    assert answer(running["r"]) == reference(video_vlm, clip, "Tell me a long story.", tokens=40)


def test_multi_turn_with_the_video_in_the_first_user_turn(video_server, video_vlm):
    clip = two_seconds(first=40)
    messages = [{"role": "system", "content": "ignored"}, video_user("What happens?", clip_url(clip)),
                {"role": "assistant", "content": "A colour change."}, user("And then?")]
    assert answer(ask(video_server, messages)) == reference(video_vlm, clip, "And then?",
                                                            [("What happens?", "A colour change.")])


def test_a_local_clip_where_allowed_and_no_remote_url_without_the_flag(video_server, video_vlm, tmp_path):
    clip = two_seconds(first=60)
    path = tmp_path / "clip.mp4"
    path.write_bytes(clip)
    assert answer(ask(video_server, [video_user("Where?", str(path))])) == reference(video_vlm, clip, "Where?")
    error = assert_openai_error(ask(video_server, [video_user("a", "http://127.0.0.1:9/clip.mp4")]), 400)
    assert error["code"] == "video_url_not_allowed" and "--allow-remote-images" in error["message"]
    assert error["param"] == "messages[0].content[1].video_url"


def test_a_remote_clip_with_the_flag(video_checkpoint, video_vlm, tmp_path):
    clip = two_seconds(first=80)
    (tmp_path / "clip.mp4").write_bytes(clip)
    with serving(video_checkpoint, tmp_path / "server.log", "--template", "chat", "--allow-remote-images") as url, \
            serving_files(tmp_path) as files:
        assert answer(ask(url, [video_user("What now?", f"{files}/clip.mp4")])) == reference(video_vlm, clip, "What now?")
        error = assert_openai_error(ask(url, [video_user("a", f"{files}/gone.mp4")]), 400)
        assert error["code"] == "video_download_failed"
        error = assert_openai_error(ask(url, [video_user("a", str(tmp_path / "clip.mp4"))]), 400)
        assert error["code"] == "video_url_not_allowed" and "--allow-local-files" in error["message"]


def _noise_clip(side: int, frames: int = 8) -> bytes:
    """Random pixels, coded losslessly: the file grows with side x side x frames."""
    rng = np.random.default_rng(0)
    return make_clip(range(frames), Fraction(1, 4), 4, w=side, h=side, options={"crf": "0"},
                     picture=lambda k: rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def test_limits_and_bad_clips_get_4xx(video_server):
    big = _noise_clip(128)
    assert len(big) > MAX_VIDEO_BYTES
    error = assert_openai_error(ask(video_server, [video_user("a", clip_url(big))]), 413)
    assert error["code"] == "video_too_large" and "--max-video-bytes" in error["message"]
    wide = two_seconds(w=200, h=120)  # 24,000 pixels a frame
    error = assert_openai_error(ask(video_server, [video_user("a", clip_url(wide))]), 413)
    assert error["code"] == "video_too_large" and "--max-video-pixels" in error["message"]
    heavy = two_seconds(w=160, h=120)  # 19,200 pixels; 4 frames x 19,200 x 30 bytes > 2,000,000
    error = assert_openai_error(ask(video_server, [video_user("a", clip_url(heavy))]), 413)
    assert error["code"] == "video_too_large" and "--max-video-memory" in error["message"]
    long, _ = cfr(MAX_VIDEO_SECONDS + 3, 2)
    error = assert_openai_error(ask(video_server, [video_user("a", clip_url(long))]), 400)
    assert error["code"] == "video_too_long" and "--max-video-seconds" in error["message"]
    for bad in (CORRUPT, b"", b"GIF89a" + bytes(100), two_seconds()[:600]):
        error = assert_openai_error(ask(video_server, [video_user("a", clip_url(bad))]), 400)
        assert error["code"] == "invalid_video", error
    error = assert_openai_error(ask(video_server, [video_user("a", "data:video/mp4,notbase64")]), 400)
    assert error["code"] == "invalid_video_url"
    error = assert_openai_error(ask(video_server, [video_user("a", clip_url(two_seconds())),
                                                   {"role": "assistant", "content": "b"},
                                                   video_user("c", clip_url(two_seconds()))]), 400)
    assert error["code"] == "too_many_videos"
    assert answer(ask(video_server, [user("still fine")]))  # the server is unharmed


def test_a_video_for_an_image_model_is_refused(talkative, tmp_path):
    with serving(talkative, tmp_path / "server.log") as url:
        error = assert_openai_error(ask(url, [video_user("a", clip_url(two_seconds()))]), 400)
        assert error["code"] == "video_not_supported" and "CogVLM2-Video" in error["message"]
        assert answer(ask(url, [user("still fine")]))


def test_admission_charges_a_requests_frames(video_vlm):
    """The scheduler reserves, beside a request's KV cache (1 + 7 T + n slots here: 6 a frame and
    its index), the tower's peak over all its frames: per ViT token (16 patches + CLS) the
    residual and a norm (2 x 32), the attention's and MLP's tensors (7 x 32 + 2 x 64), and each
    frame's 6 embeddings of 64, at the model's element size."""
    import torch

    from cogvlm.scheduler import visual_bytes

    def clip(frames: int) -> torch.Tensor:
        return torch.randint(0, 256, (3, frames, 60, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))

    size = video_vlm.model.dtype.itemsize
    per_frame = 17 * (2 * 32 + 7 * 32 + 2 * 64) * size + 6 * 64 * size
    one, three = (video_vlm.prompt_tokens(None, "q", None, "chat", video=clip(t)) for t in (1, 3))
    text = video_vlm.prompt_tokens(None, "q", None, "chat")
    assert video_vlm.prompt_length(three) == 1 + 7 * 3 + len(three.text_ids)
    assert visual_bytes(video_vlm, [one]) == per_frame and visual_bytes(video_vlm, [three]) == 3 * per_frame
    assert visual_bytes(video_vlm, [one, three, text]) == 4 * per_frame and visual_bytes(video_vlm, [text]) == 0
