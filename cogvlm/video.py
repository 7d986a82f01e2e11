"""Video clips: decoding with PyAV and the authors' two frame-sampling rules
(docs/spec/cogvlm2-video.md section 8; the choice of decoder and its numbers: docs/video.md).

The authors read clips with decord; we read the same facts through PyAV (FFmpeg):
- a frame's start time is its packet's pts minus the stream's start time, times the time base,
  kept as float32 (decord's `get_frame_timestamp`); frames are numbered in pts order;
- the average frame rate is the stream's `avg_frame_rate` (decord's `get_avg_fps`);
- frames are turned upright by the stream's display matrix, as decord does.
The sampling rules are pure functions of those facts, testable without a decoder.
"""

from __future__ import annotations

import contextlib
import io
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import numpy as np
import torch

from .errors import UsageError, VideoError

NUM_FRAMES = 24  # the demos' num_frames (section 8)
STRATEGIES = ("chat", "base")
BASE_SECONDS = 60  # the base rule samples the first minute
EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi")

VideoInput = Union[str, Path, bytes]


@dataclass(frozen=True)
class VideoLimits:
    """What one clip may make us do; each is checked from the container before any frame is
    decoded, and the error names the one hit. The defaults suit a trusted local caller; the
    server passes its own."""

    max_bytes: int = 2**30  # the encoded file
    max_seconds: float = 4 * 3600.0  # the stream's duration
    max_frames: int = 500_000  # frames in the stream: each is indexed before sampling, as decord does
    max_pixels: int = 3840 * 2160  # width x height of one frame; 24 RGB frames of 4K = 600 MB


@dataclass(frozen=True)
class ClipIndex:
    """What a scan of the packets tells, before decoding: the frames in pts order."""

    pts: list[int]  # sorted
    timestamps: list[float]  # start of each frame in seconds (float32 values, as decord's)
    avg_fps: float
    width: int
    height: int


def chat_frame_indices(timestamps: Sequence[float], num_frames: int = NUM_FRAMES) -> list[int]:
    """The `chat` rule: for each whole second from 0 to round(last start) (Python round, half to
    even), the frame whose start is nearest (ties: the lowest index), at most `num_frames`.
    Arithmetic in float32, as on decord's float32 timestamps; repeats when frames are sparser
    than seconds. Section 8."""
    if len(timestamps) == 0:
        raise VideoError("the clip has no frames")
    starts = np.asarray(timestamps, dtype=np.float32)
    max_second = round(float(starts.max())) + 1
    indices = []
    for second in range(max_second):
        indices.append(int(np.argmin(np.abs(starts - np.float32(second)))))  # first of the nearest
        if len(indices) >= num_frames:
            break
    if not indices:
        raise VideoError(f"the clip ends before 0 s (last frame starts at {float(starts.max()):.3f} s)")
    return indices


def base_frame_indices(frame_count: int, avg_fps: float, num_frames: int = NUM_FRAMES) -> list[int]:
    """The `base` rule: `num_frames` indices evenly over the first 60 s,
    `np.linspace(0, min(N, int(60 * fps)) - 1, num_frames, dtype=int)` (truncated; repeats when
    the clip is shorter than `num_frames` frames). Section 8."""
    if frame_count < 1:
        raise VideoError("the clip has no frames")
    end = min(frame_count, int(BASE_SECONDS * avg_fps))
    if end < 1:  # decord would index frame -1 here and fail
        raise VideoError(f"the clip's average frame rate ({avg_fps:g} fps) gives no frame in its first "
                         f"{BASE_SECONDS} s; the base strategy cannot sample it")
    return [int(i) for i in np.linspace(0, end - 1, num_frames, dtype=int)]


def frame_indices(index: ClipIndex, strategy: str, num_frames: int = NUM_FRAMES) -> list[int]:
    """The frames `strategy` picks from a scanned clip."""
    check_request(strategy, num_frames)
    if strategy == "chat":
        return chat_frame_indices(index.timestamps, num_frames)
    return base_frame_indices(len(index.pts), index.avg_fps, num_frames)


def strategy_for(template: str) -> str:
    """The rule the authors pair with a template: base with base, chat otherwise (section 8)."""
    return "base" if template == "base" else "chat"


def check_request(strategy: str, num_frames: int) -> None:
    """A UsageError for a strategy the authors do not have, or fewer than one frame."""
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown video strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if num_frames < 1:
        raise UsageError(f"num_frames must be at least 1 (got {num_frames})")


def load_video(source: VideoInput, strategy: str = "chat", num_frames: int = NUM_FRAMES,
               limits: VideoLimits | None = None, timeout: float = 20.0) -> torch.Tensor:
    """The frames `strategy` picks from a clip (a path, an http(s) URL or the file's bytes), as the
    demos hand them to the model: uint8 RGB of shape (3, T, H, W)."""
    check_request(strategy, num_frames)  # before a download
    limits = limits or VideoLimits()
    data, name = read_video(source, limits.max_bytes, timeout)
    return decode_video(data, strategy, num_frames, limits, name)


def read_video(source: VideoInput, max_bytes: int, timeout: float = 20.0) -> tuple[bytes, str]:
    """The encoded clip and a name for messages. Paths and http(s) URLs as `image.load_image` takes
    them (the server fetches its own, within its limits, and passes bytes)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _within(bytes(source), "the given bytes", max_bytes), "the given bytes"
    text = str(source)
    if text.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(text, timeout=timeout) as response:
                return _within(response.read(max_bytes + 1), text, max_bytes), text
        except (urllib.error.URLError, OSError) as e:
            raise VideoError(f"could not download video {text}: {e}") from None
    path = Path(text).expanduser()
    try:
        if not path.exists():
            raise VideoError(f"video file not found: {path}")
        if not path.is_file():
            raise VideoError(f"not a file: {path}")
        with path.open("rb") as f:
            return _within(f.read(max_bytes + 1), str(path), max_bytes), str(path)
    except OSError as e:  # a name too long, a folder we may not read, ...
        raise VideoError(f"cannot read video {str(path)[:200]}: {e.strerror or e}") from None


def _within(data: bytes, name: str, max_bytes: int) -> bytes:
    if len(data) > max_bytes:
        raise VideoError(f"{name} is over the limit of {max_bytes} bytes for one video")
    return data


# The containers we open, told by their first bytes, each with the one FFmpeg demuxer allowed to
# read it. Letting FFmpeg guess would open images (PNG is a one-frame "video" to it), playlists
# that fetch other files (HLS) and some 300 other demuxers on untrusted bytes.
def container_format(data: bytes, name: str) -> str:
    """The FFmpeg demuxer for `data` (mov for MP4/MOV, matroska for MKV/WebM, avi), or a VideoError."""
    if not data:
        raise VideoError(f"{name} is empty")
    if data[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide"):
        return "mov"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    raise VideoError(f"{name} is not a video file in a container we read (MP4/MOV, WebM/MKV, AVI)")


def decode_video(data: bytes, strategy: str = "chat", num_frames: int = NUM_FRAMES,
                 limits: VideoLimits | None = None, name: str = "the given bytes") -> torch.Tensor:
    """`load_video` on the encoded bytes: scan the packets, pick the frames, decode up to the last."""
    limits = limits or VideoLimits()
    _within(data, name, limits.max_bytes)
    with _opened(data, name) as container:
        stream = _video_stream(container, name)
        _check_header(container, stream, limits, name)
        index, packets = _scan(container, stream, limits, name)
        indices = frame_indices(index, strategy, num_frames)
        frames = _decode(stream, packets, index, sorted(set(indices)), name)
    return torch.from_numpy(np.stack([frames[i] for i in indices])).permute(3, 0, 1, 2)


@dataclass(frozen=True)
class ClipHeader:
    """What the container states before a packet is read."""

    width: int
    height: int
    seconds: float | None  # the container's duration, when it states one


def probe_video(data: bytes, name: str = "the given bytes") -> ClipHeader:
    """A clip's frame size and duration from its header alone: the server sizes the memory a
    decode will take by them before it decodes anything."""
    with _opened(data, name) as container:
        stream = _video_stream(container, name)
        seconds = None if container.duration is None else container.duration / 1e6
        return ClipHeader(stream.codec_context.width, stream.codec_context.height, seconds)


@contextlib.contextmanager
def _opened(data: bytes, name: str) -> Iterator[Any]:
    """The container of `data`, opened by its one demuxer; whatever FFmpeg raises on the way is a
    VideoError naming the clip."""
    av = pyav()
    fmt = container_format(data, name)
    try:
        with av.open(io.BytesIO(data), format=fmt) as container:
            yield container
    except (VideoError, UsageError):
        raise
    except Exception as e:  # FFmpeg fed crafted bytes fails in many ways (av.FFmpegError, ValueError, ...)
        raise VideoError(f"{name} is corrupt or truncated: {type(e).__name__}: {str(e)[:200]}") from None


def pyav() -> Any:
    """PyAV, imported at first use: the `video` extra is optional."""
    try:
        import av
    except ImportError:
        raise UsageError("video input needs PyAV: pip install 'cogvlm[video]'") from None
    av.logging.set_level(av.logging.PANIC)  # FFmpeg's own warnings on odd files are ours to tell, once
    return av


def _video_stream(container: Any, name: str) -> Any:
    if not container.streams.video:
        raise VideoError(f"{name} has no video stream")
    return container.streams.video[0]


def _check_header(container: Any, stream: Any, limits: VideoLimits, name: str) -> None:
    """Size and duration as the container states them, before a packet is read."""
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > limits.max_pixels:
        raise VideoError(f"{name} is {width}x{height} pixels a frame, over the limit of {limits.max_pixels}")
    if container.duration is not None and container.duration / 1e6 > limits.max_seconds:
        raise VideoError(f"{name} lasts {container.duration / 1e6:.1f} s, over the limit of {limits.max_seconds:g} s")
    if stream.frames > limits.max_frames:
        raise VideoError(f"{name} has {stream.frames} frames, over the limit of {limits.max_frames}")


def _scan(container: Any, stream: Any, limits: VideoLimits, name: str) -> tuple[ClipIndex, list[Any]]:
    """Every packet of the stream (kept to decode from, no second read) and the frames' start
    times as decord computes them: float32((float32(pts) - float32(start_time)) * time_base)."""
    packets = []
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's end-of-stream marker
            continue
        packets.append(packet)
        if len(packets) > limits.max_frames:
            raise VideoError(f"{name} has over {limits.max_frames} frames, the limit")
    if not packets:
        raise VideoError(f"{name} has no frames")
    pts = sorted(p.pts if p.pts is not None else p.dts if p.dts is not None else i for i, p in enumerate(packets))
    start = np.float32(stream.start_time or 0)
    seconds = ((np.asarray(pts, dtype=np.float32) - start).astype(np.float64) * float(stream.time_base)).astype(np.float32)
    if float(seconds[-1] - seconds[0]) > limits.max_seconds:
        raise VideoError(f"{name} lasts {float(seconds[-1] - seconds[0]):.1f} s, over the limit of {limits.max_seconds:g} s")
    width, height = stream.codec_context.width, stream.codec_context.height
    index = ClipIndex(pts, seconds.tolist(), _avg_fps(stream, seconds), width, height)
    return index, packets


def _avg_fps(stream: Any, seconds: np.ndarray) -> float:
    """The stream's average frame rate (decord's get_avg_fps); where the container states none,
    frames per second of the scanned span (decord would divide 0 by 0 there)."""
    rate = stream.average_rate
    if rate:
        return float(rate)
    span = float(seconds[-1] - seconds[0])
    return len(seconds) / span if span > 0 else 0.0


def _decode(stream: Any, packets: list[Any], index: ClipIndex, wanted: list[int],
            name: str) -> dict[int, np.ndarray]:
    """RGB arrays of the `wanted` frame numbers, decoding from the first packet up to the last
    wanted frame. A frame is numbered by its pts (decord's pts-to-frame map), or by its place in
    presentation order where it has none."""
    number = {p: i for i, p in reversed(list(enumerate(index.pts)))}  # the first frame of a pts
    todo, got, count = set(wanted), {}, 0
    for packet in [*packets, None]:  # None drains the decoder
        for frame in stream.decode(packet):
            i = number.get(frame.pts, count) if frame.pts is not None else count
            count = i + 1
            if i in todo:
                got[i] = _rgb(frame, index.width, index.height)
                todo.discard(i)
        if not todo:
            return got
    raise VideoError(f"{name} is corrupt or truncated: frame {min(todo)} of {len(index.pts)} could not be decoded")


def _rgb(frame: Any, width: int, height: int) -> np.ndarray:
    """An upright (H, W, 3) uint8 RGB array at the stream's size (decord scales a frame of another
    size to the stream's, and turns it by the display matrix)."""
    if (frame.width, frame.height) != (width, height):
        frame = frame.reformat(width=width, height=height)
    rgb = frame.to_ndarray(format="rgb24")
    turns = round((frame.rotation or 0) / 90) % 4  # counter-clockwise quarter turns
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb
