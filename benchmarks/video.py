"""Video: the decoders side by side, and captioning a folder of clips batched vs one at a time.

`--decoders`: the time to get the frames the authors' rules pick (chat: one a second, at most 24;
base: 24 over the first minute) from the same clips (30 s, 640x360, 30 fps, H.264, made here), with
PyAV (what cogvlm.video uses) and torchcodec where it is installed (it decodes the same frame
numbers; its exact mode scans the file as ours does). One decoder thread each, the clips in memory.

`--caption` (the default): clips/s of the caption job (`cogvlm.caption.caption_videos`) over a
folder of synthetic clips with a small random CogVLM2-Video, batch 8 vs batch 1, and the share of
the wall time the model waited for decoded clips (decoding runs ahead in a pool of threads).

    pip install -e '.[video]' && python benchmarks/video.py --decoders [--clips 3]
    python benchmarks/video.py --caption [--clips 32]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from cogvlm.video import ClipIndex, decode_video, frame_indices


def encode_clip(seconds: float, fps: int, width: int, height: int, seed: int, codec: str = "libx264") -> bytes:
    """A synthetic clip: a textured background panning under moving squares (it costs the
    decoder about what camera footage of the same size does; flat colour would be free)."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (height, 2 * width, 3), dtype=np.uint8)
    texture = (texture.astype(np.uint16) + np.roll(texture, 1, 1) + np.roll(texture, 1, 0)).astype(np.uint8) // 3
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        if codec == "libx264":
            stream.codec_context.options = {"preset": "ultrafast"}
        for k in range(round(seconds * fps)):
            img = np.ascontiguousarray(texture[:, k % width: k % width + width])
            for j in range(3):
                y, x = (k * (j + 2) + 40 * j) % (height - 40), (k * (3 - j) + 90 * j) % (width - 40)
                img[y:y + 40, x:x + 40] = (80 * j, 255 - 80 * j, 128)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = k
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def pyav_frames(data: bytes, strategy: str) -> torch.Tensor:
    return decode_video(data, strategy)


def torchcodec_frames(data: bytes, strategy: str) -> torch.Tensor:
    """The same frames through torchcodec: its exact-mode scan indexes every frame, the rule picks
    from the start times, `get_frames_at` seeks and decodes. torchcodec's public API gives no
    frame's pts without decoding it, so the start times are k / fps: exact on these constant-rate
    clips, not in general."""
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(data, seek_mode="exact", num_ffmpeg_threads=1)
    meta = decoder.metadata
    fps = meta.average_fps_from_header
    index = ClipIndex(list(range(meta.num_frames)), [k / fps for k in range(meta.num_frames)], fps,
                      meta.width, meta.height)
    return decoder.get_frames_at(frame_indices(index, strategy)).data.permute(1, 0, 2, 3)


def bench_decoders(clips: int) -> None:
    print(f"making {clips} clips of 30 s, 640x360, 30 fps, H.264 ...", flush=True)
    datas = [encode_clip(30, 30, 640, 360, seed) for seed in range(clips)]
    contenders = {"PyAV " + av.__version__: pyav_frames}
    try:
        import torchcodec

        contenders["torchcodec " + torchcodec.__version__] = torchcodec_frames
    except Exception as e:  # not installed, or its native library does not load with this torch
        print(f"torchcodec: not measured ({type(e).__name__}: {str(e)[:120]})")
    torch.set_num_threads(1)
    print(f"{'decoder':24} {'strategy':8} {'median s/clip':>13} {'min':>7}")
    for strategy in ("chat", "base"):
        for name, fn in contenders.items():
            times = []
            for _ in range(3):
                for data in datas:
                    start = time.perf_counter()
                    frames = fn(data, strategy)
                    times.append(time.perf_counter() - start)
            assert frames.shape[:2] == (3, 24), frames.shape
            print(f"{name:24} {strategy:8} {statistics.median(times):13.3f} {min(times):7.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoders", action="store_true", help="compare the decoders (else: captioning)")
    parser.add_argument("--clips", type=int, default=3)
    opts = parser.parse_args()
    if opts.decoders:
        bench_decoders(opts.clips)


if __name__ == "__main__":
    main()
