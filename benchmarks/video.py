"""Video: the decoders side by side, and captioning a folder of clips batched vs one at a time.

`--decoders`: the time to get the frames the authors' rules pick (chat: one a second, at most 24;
base: 24 over the first minute) from the same clips (30 s, 640x360, 30 fps, H.264, made here), with
PyAV (what cogvlm.video uses) and torchcodec where it is installed (it decodes the same frame
numbers; its exact mode scans the file as ours does). One decoder thread each, the clips in memory.

Without it: clips/s of the caption job (`cogvlm.caption.caption_images`, what `cogvlm caption`
runs) over a folder of synthetic clips (8 s, 320x240, 24 fps: 8 frames by the chat rule) with a
small random CogVLM2-Video (the published tower shape per frame on a small decoder, never
stopping early), batch 8 vs batch 1, and the share of the wall time the model waited for decoded
clips (decoding runs ahead in a pool of threads, `Summary.waited`).

    pip install -e '.[video]' && python benchmarks/video.py --decoders [--clips 3]
    python benchmarks/video.py [--clips 32] [--new-tokens 192] [--decoder-threads 2]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

import cogvlm
from cogvlm.api import VIDEO_CAPTION_PROMPT, CogVLM
from cogvlm.caption import Media, RecordFile, caption_images, find_files
from cogvlm.config import COGVLM2_VIDEO
from cogvlm.data.shards import VIDEO_EXTENSIONS
from cogvlm.model import CogVLMForCausalLM
from cogvlm.tokenizer import Tokenizer
from cogvlm.video import ClipIndex, decode_video, frame_indices, load_video


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


def small_video_model(hidden: int, layers: int) -> CogVLM:
    """A random CogVLM2-Video with the published tower shape per frame (224 px, 2x2 merge: 66 slots a
    frame) on a small decoder with the published grouping of 4 query heads per key/value head, with
    cogvlm-tiny's tokenizer; it never emits eos, so every caption is exactly max_new_tokens long
    and both contenders decode the same number of tokens."""
    tiny = Path(cogvlm.__file__).parent / "weights" / "cogvlm-tiny"
    tokenizer = Tokenizer(tiny / "tokenizer.model")
    config = replace(COGVLM2_VIDEO, vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_layers=layers,
                     num_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),  # 4:1, as published (32:8)
                     intermediate_size=hidden * 11 // 4, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                     template="chat", vision=replace(COGVLM2_VIDEO.vision, hidden_size=64, num_layers=2,
                                                     num_heads=4, intermediate_size=256))
    object.__setattr__(config, "eos_token_id", -1)  # past the config's checks: never stop early
    torch.manual_seed(0)
    model = CogVLMForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name and p.ndim == 1 else torch.randn_like(p) * 0.02)
    return CogVLM(model.eval().requires_grad_(False), tokenizer)


def bench_caption(clips: int, seconds: float, hidden: int, layers: int, new_tokens: int, decoders: int,
                  threads: int) -> None:
    torch.set_num_threads(threads)
    vlm = small_video_model(hidden, layers)
    sampling = vlm.sampling(top_k=1, max_new_tokens=new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "clips"
        folder.mkdir()
        print(f"making {clips} clips of {seconds:g} s, 320x240, 24 fps, H.264 ...", flush=True)
        for n in range(clips):
            (folder / f"clip{n:04d}.mp4").write_bytes(encode_clip(seconds, 24, 320, 240, n))
        files = find_files([folder], VIDEO_EXTENSIONS)
        decode = []
        for path in files[:4]:
            start = time.perf_counter()
            load_video(path)
            decode.append(time.perf_counter() - start)
        print(f"model: hidden {hidden}, {layers} layers, tower 224 px (66 slots a frame); {new_tokens} new tokens a "
              f"caption; {threads} torch thread(s), {decoders} decoder thread(s), {os.cpu_count()} cores; decoding "
              f"one clip alone: {statistics.median(decode):.3f} s")
        print(f"{'batch':>5} {'clips/s':>8} {'wall s':>7} {'model waited s':>15} {'share':>6}")
        rates = {}
        for batch in (1, 8):
            sink = RecordFile(Path(tmp) / f"batch{batch}.jsonl", 0, "video")
            summary = caption_images(vlm, files, sink, VIDEO_CAPTION_PROMPT, "chat", batch_size=batch,
                                     sampling=sampling, progress=False, media=Media(video=True), decoders=decoders)
            sink.close()
            assert summary.done == len(files), summary.failed
            rates[batch] = summary.done / summary.seconds
            print(f"{batch:5d} {rates[batch]:8.2f} {summary.seconds:7.1f} {summary.waited:15.2f} "
                  f"{summary.waited / summary.seconds:6.1%}", flush=True)
        print(f"batch 8 / batch 1: {rates[8] / rates[1]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoders", action="store_true", help="compare the decoders (else: captioning)")
    parser.add_argument("--clips", type=int, default=None, help="clips to make (default 3 for --decoders, else 32)")
    parser.add_argument("--seconds", type=float, default=8.0, help="captioning: seconds per clip (default 8)")
    parser.add_argument("--hidden", type=int, default=256, help="captioning: the decoder's width (default 256)")
    parser.add_argument("--layers", type=int, default=4, help="captioning: decoder layers (default 4)")
    parser.add_argument("--new-tokens", type=int, default=192,
                        help="captioning: tokens a caption (default 192, a detailed caption; the authors' caption "
                             "tool allows 2048)")
    parser.add_argument("--threads", type=int, default=1, help="captioning: torch threads (default 1)")
    parser.add_argument("--decoder-threads", type=int, default=2, help="captioning: decoder threads (default 2)")
    opts = parser.parse_args()
    if opts.decoders:
        bench_decoders(opts.clips or 3)
    else:
        bench_caption(opts.clips or 32, opts.seconds, opts.hidden, opts.layers, opts.new_tokens,
                      opts.decoder_threads, opts.threads)


if __name__ == "__main__":
    main()
