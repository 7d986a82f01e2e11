"""cogvlm/video.py: the authors' two frame-sampling rules (docs/spec/cogvlm2-video.md section 8) on
real clips encoded here with PyAV, each frame a flat colour that names it, so both the indices and
the decoded pixels are checked."""

from __future__ import annotations

import io
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

av = pytest.importorskip("av")

from cogvlm.errors import UsageError, VideoError  # noqa: E402
from cogvlm.video import (VideoLimits, base_frame_indices, chat_frame_indices, decode_video,  # noqa: E402
                          load_video)

LEVELS = (16, 56, 96, 136, 176, 216)  # 216 colours 40 apart: lossy coding moves a flat colour by < 5


def colour(i: int) -> tuple[int, int, int]:
    return LEVELS[i % 6], LEVELS[i // 6 % 6], LEVELS[i // 36 % 6]


def make_clip(pts, time_base=Fraction(1, 1000), rate=30, codec="libx264", fmt="mp4", w=32, h=24,
              rotation=None, first=0, picture=None, options=None) -> bytes:
    """A clip whose frame k (in presentation order) starts at pts[k] * time_base and is colour(first + k),
    or `picture(k)` (an (h, w, 3) uint8 array); `options` go to the encoder."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.time_base = time_base
        if options:
            stream.options = options
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for k, t in enumerate(pts):
            img = np.empty((h, w, 3), np.uint8) if picture is None else picture(k)
            if picture is None:
                img[:] = colour(first + k)
            if rotation is not None:
                img[: h // 2, : w // 2] = 255  # a white top-left quarter shows which way is up
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = t, time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def cfr(seconds: float, fps: int, **kw) -> tuple[bytes, list[float]]:
    """A constant-rate clip and its frames' start times."""
    n = round(seconds * fps)
    return make_clip(range(n), Fraction(1, fps), fps, **kw), [k / fps for k in range(n)]


def frame_numbers(video: torch.Tensor) -> list[int]:
    """Which frame each decoded frame is, read back from its colour (checked flat and close)."""
    assert video.dtype == torch.uint8 and video.ndim == 4 and video.shape[0] == 3
    numbers = []
    for t in range(video.shape[1]):
        pixels = video[:, t].reshape(3, -1).int()
        rgb = pixels.median(dim=1).values.tolist()
        assert (pixels - torch.tensor(rgb).view(3, 1)).abs().max() <= 6, "a frame is not flat"
        k = sum(LEVELS.index(min(LEVELS, key=lambda v: abs(v - c))) * 6**j for j, c in enumerate(rgb))
        assert max(abs(a - b) for a, b in zip(rgb, colour(k))) <= 6
        numbers.append(k)
    return numbers


# The demos' load_video, written out as in section 8 (decord's timestamps are float32).
def demo_chat(timestamps: list[float], num_frames: int = 24) -> list[int]:
    timestamps = [np.float32(t) for t in timestamps]
    max_second = round(max(timestamps)) + 1
    frame_id_list = []
    for second in range(max_second):
        closest_num = min(timestamps, key=lambda x: abs(x - second))
        index = timestamps.index(closest_num)
        frame_id_list.append(index)
        if len(frame_id_list) >= num_frames:
            break
    return frame_id_list


def demo_base(total_frames: int, avg_fps: float, num_frames: int = 24) -> list[int]:
    start_frame = 0
    end_frame = min(total_frames, int(60 * avg_fps))
    return [int(i) for i in np.linspace(start_frame, end_frame - 1, num_frames, dtype=int)]


def test_chat_rule_constant_rate_with_b_frames():
    data, times = cfr(3.5, 30)  # libx264 reorders frames: presentation order is not coding order
    video = decode_video(data, "chat")
    want = demo_chat(times)
    assert want == [0, 30, 60, 90]  # the last start, 3.47 s, rounds to 3
    assert frame_numbers(video) == want
    assert video.shape == (3, len(want), 24, 32)


def test_chat_rule_variable_frame_rate():
    ms = [0, 120, 380, 700, 1490, 1510, 2200, 2990, 3050, 4400, 4600, 6000]
    video = load_video(make_clip(ms), "chat")
    want = demo_chat([m / 1000 for m in ms])
    assert want == [0, 3, 6, 7, 9, 10, 11]
    assert frame_numbers(video) == want


def test_chat_rule_ties_go_to_the_lower_frame():
    ms = [0, 500, 1500, 2500]  # 1 s lies halfway between 0.5 s and 1.5 s; 2 s between 1.5 and 2.5
    video = decode_video(make_clip(ms))
    assert demo_chat([m / 1000 for m in ms]) == [0, 1, 2]
    assert frame_numbers(video) == [0, 1, 2]  # round(2.5) = 2 (half to even): seconds 0..2


def test_a_clip_under_one_second_gives_one_frame():
    data, times = cfr(0.4, 10)  # starts 0, 0.1, 0.2, 0.3: round(0.3) + 1 = 1 second
    assert frame_numbers(decode_video(data)) == demo_chat(times) == [0]


def test_a_clip_over_24_seconds_is_cut_to_its_first_24():
    data, times = cfr(30, 2)
    video = decode_video(data, "chat")
    assert frame_numbers(video) == demo_chat(times) == list(range(0, 48, 2))


def test_fewer_frames_than_seconds_repeat():
    ms = [0, 3000, 9000, 20000, 30000]  # gaps of 3 to 11 s over 30 s
    video = decode_video(make_clip(ms), "chat")
    want = demo_chat([m / 1000 for m in ms])
    assert want == [0] * 2 + [1] * 5 + [2] * 8 + [3] * 9  # 6 s ties 3 s and 9 s: the lower frame
    assert frame_numbers(video) == want


def test_base_rule_over_sixty_seconds():
    data, _ = cfr(70, 2)  # 140 frames, 2 fps: the first 120 frames are the first minute
    video = decode_video(data, "base")
    want = demo_base(140, 2.0)
    assert want[-1] == 119 and len(want) == 24
    assert frame_numbers(video) == want


def test_base_rule_on_a_short_clip_repeats_frames():
    data, _ = cfr(2, 5)  # 10 frames
    video = decode_video(data, "base")
    assert frame_numbers(video) == demo_base(10, 5.0) == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4, 5, 5, 5, 6, 6,
                                                          7, 7, 7, 8, 8, 9]


def test_num_frames_caps_both_rules():
    data, times = cfr(10, 3)
    assert frame_numbers(decode_video(data, "chat", num_frames=4)) == demo_chat(times, 4) == [0, 3, 6, 9]
    assert frame_numbers(decode_video(data, "base", num_frames=5)) == demo_base(30, 3.0, 5)


@pytest.mark.parametrize("codec, fmt", [("libvpx-vp9", "webm"), ("mpeg4", "matroska"), ("mpeg4", "avi"),
                                        ("mpeg4", "mov")])
def test_every_container_we_read(codec, fmt):
    data, times = cfr(3, 4, codec=codec, fmt=fmt)
    assert frame_numbers(decode_video(data)) == demo_chat(times) == [0, 4, 8, 11]


def test_frames_are_turned_upright_by_the_display_matrix():
    video = decode_video(make_clip([0, 1000], rotation=90))  # shown turned a quarter counter-clockwise
    assert video.shape == (3, 2, 32, 24)
    white = (video[:, 0].int() > 240).all(dim=0)
    assert white[-16:, :12].all() and not white[:16].any()  # the top-left quarter is now bottom-left


def test_one_frame_clip_and_paths(tmp_path):
    data = make_clip([0])  # zero duration
    path = tmp_path / "one.mp4"
    path.write_bytes(data)
    for source in (path, str(path), data):
        assert frame_numbers(load_video(source, "chat")) == [0]
        assert frame_numbers(load_video(source, "base")) == [0] * 24


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 100, allow_nan=False, width=32), min_size=1, max_size=60), st.integers(1, 30))
def test_chat_rule_equals_the_demo_on_any_timestamps(timestamps, num_frames):
    assert chat_frame_indices(timestamps, num_frames) == demo_chat(timestamps, num_frames)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10_000), st.floats(0.05, 240, allow_nan=False), st.integers(1, 48))
def test_base_rule_equals_the_demo(frames, fps, num_frames):
    if int(60 * fps) < 1:
        with pytest.raises(VideoError, match="frame rate"):
            base_frame_indices(frames, fps, num_frames)
    else:
        assert base_frame_indices(frames, fps, num_frames) == demo_base(frames, fps, num_frames)


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_unreadable_clips_give_named_errors(tmp_path):
    good, _ = cfr(2, 5)
    rng = np.random.default_rng(0)
    cases = {
        "empty": (b"", "is empty"),
        "png": (png_bytes(), "not a video file"),
        "text": (b"hello, not a video", "not a video file"),
        "garbage with an mp4 header": (b"\x00\x00\x00\x18ftypisom" + rng.bytes(3000), "corrupt or truncated"),
        "truncated mp4": (good[: len(good) // 2], "corrupt or truncated"),
    }
    mkv = make_clip(range(40), Fraction(1, 10), 10, codec="mpeg4", fmt="matroska")
    cases["truncated mkv header"] = (mkv[:60], "corrupt or truncated|no video stream|no frames")
    for label, (data, message) in cases.items():
        with pytest.raises(VideoError, match=message):
            decode_video(data)
        (tmp_path / "clip.mp4").write_bytes(data)
        with pytest.raises(VideoError, match=message):
            load_video(tmp_path / "clip.mp4")
    with pytest.raises(VideoError, match="not found"):
        load_video(tmp_path / "missing.mp4")
    with pytest.raises(VideoError, match="not a file"):
        load_video(tmp_path)


def test_a_clip_cut_mid_stream_decodes_what_is_there_or_says_why():
    """A Matroska file cut short keeps the frames before the cut: the rules run on those."""
    data = make_clip(range(40), Fraction(1, 10), 10, codec="mpeg4", fmt="matroska", w=64, h=48)
    cut = data[: len(data) * 3 // 4]
    try:
        video = decode_video(cut, "chat")
    except VideoError as e:
        assert "corrupt or truncated" in str(e)
    else:
        numbers = frame_numbers(video)
        assert numbers == demo_chat([k / 10 for k in range(max(numbers) + 1)])[: len(numbers)]


def test_limits_are_checked_before_decoding():
    data, _ = cfr(3, 10)
    for limits, message in [(VideoLimits(max_bytes=len(data) - 1), "over the limit of .* bytes"),
                            (VideoLimits(max_pixels=32 * 24 - 1), "32x24 pixels"),
                            (VideoLimits(max_seconds=2.5), "lasts 3.0 s"),
                            (VideoLimits(max_frames=29), "frames, over the limit|over 29 frames")]:
        with pytest.raises(VideoError, match=message):
            load_video(data, limits=limits)
    assert load_video(data, limits=VideoLimits(max_bytes=len(data), max_pixels=32 * 24, max_seconds=3.1,
                                               max_frames=30)).shape == (3, 4, 24, 32)


def test_caller_mistakes_are_usage_errors():
    data, _ = cfr(1, 2)
    with pytest.raises(UsageError, match="unknown video strategy 'fast'"):
        load_video(data, "fast")
    with pytest.raises(UsageError, match="num_frames"):
        load_video(data, num_frames=0)
    with pytest.raises(UsageError, match="num_frames"):
        decode_video(data, num_frames=0)


def test_without_pyav_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    with pytest.raises(UsageError, match=r"pip install 'cogvlm\[video\]'"):
        decode_video(cfr(1, 2)[0])


def test_http_urls_are_fetched_as_images_are(tmp_path):
    """A real HTTP server on loopback: the clip is fetched and decoded; a 404 and an over-limit
    body are VideoErrors naming the URL."""
    import functools
    import http.server
    import threading

    data, times = cfr(2, 3)
    (tmp_path / "clip.mp4").write_bytes(data)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        assert frame_numbers(load_video(f"{url}/clip.mp4")) == demo_chat(times)
        with pytest.raises(VideoError, match=f"could not download video {url}/missing.mp4"):
            load_video(f"{url}/missing.mp4")
        with pytest.raises(VideoError, match=f"{url}/clip.mp4 is over the limit of 100 bytes"):
            load_video(f"{url}/clip.mp4", limits=VideoLimits(max_bytes=100))
    finally:
        server.shutdown()
        server.server_close()
