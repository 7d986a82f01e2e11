"""Image loading and CogVLM preprocessing (docs/spec/cogvlm.md section 3), with PIL only: no
torchvision; and CogVLM2-Video's frame preprocessing (docs/spec/cogvlm2-video.md section 5.1), in torch."""

from __future__ import annotations

import io
import math
import os
import stat
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError, ImageTooLargeError, VideoError

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = Union[str, Path, bytes, Image.Image, np.ndarray]

# The formats we document and decode (`Image.open(formats=...)`). Pillow identifies some 40 more
# by their first bytes; their decoders (QOI, IM, DDS, BLP, ICNS, ...) raise exceptions of every
# type on crafted files, and EPS hands the file to Ghostscript, where 70 bytes can loop forever.
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
# An image file's size limit where others choose the file: `cogvlm serve --max-image-bytes`, the
# samples and paths of `cogvlm caption`'s shards, the web demo's uploads.
MAX_IMAGE_BYTES = 20 * 2**20
MAX_IMAGE_PIXELS = 40_000_000  # the same places' limit on width x height, read from the header
MAX_ASPECT = 50  # longer side / shorter side: see decoded_bytes
MAX_IMAGE_MEMORY = 2**30  # what decoding and resizing images may take (decoded_bytes): serve, all requests together


def open_image(data: bytes) -> Image.Image:
    """Pillow's lazy image of `data` (read only the header so far), for the FORMATS alone;
    `UnidentifiedImageError` for anything else."""
    return Image.open(io.BytesIO(data), formats=FORMATS)


def load_image(source: ImageInput, timeout: float = 20.0, max_bytes: int | None = None) -> Image.Image:
    """Open a path, http(s) URL, encoded bytes, PIL image or HWC/HW uint8 array as RGB. A path
    must be a regular file; `max_bytes` caps a file's size (checked before it is read)."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, (bytes, bytearray)):
        return _decode(bytes(source), "the given bytes")
    text = str(source)
    if text.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(text, timeout=timeout) as response:
                data = response.read() if max_bytes is None else response.read(max_bytes + 1)
        except (urllib.error.URLError, OSError) as e:
            raise ImageError(f"could not download image {text}: {e}") from None
        if max_bytes is not None and len(data) > max_bytes:
            raise ImageTooLargeError(f"{text} is over {max_bytes} bytes, the limit")
        return _decode(data, text)
    path = Path(text).expanduser()
    return _decode(read_file(path, max_bytes), str(path))


def read_file(path: Path, limit: int | None = None, kind: str = "image") -> bytes:
    """The bytes of a regular file, at most `limit` of them. Anything else is refused before it
    is read: `/dev/zero` has size 0 and never ends, a FIFO blocks the open and every read
    (O_NONBLOCK keeps the open from waiting if a FIFO takes the file's place after the stat).
    `kind` (image, video) names the file in the messages."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise ImageError(f"not a file: {path}")
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ImageError(f"not a file: {path}")
            if limit is not None and info.st_size > limit:
                raise ImageTooLargeError(f"{path} is {info.st_size} bytes, over the limit of {limit}")
            data = f.read() if limit is None else f.read(limit + 1)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{kind} file not found: {path}") from None
    except (OSError, ValueError) as e:  # a name too long, a folder we may not read, a NUL byte in the name
        why = getattr(e, "strerror", None) or "not a usable file name"
        raise ImageError(f"cannot read {kind} {str(path)[:200]}: {why}") from None
    if limit is not None and len(data) > limit:  # it grew after the stat
        raise ImageTooLargeError(f"{path} is over {limit} bytes, the limit")
    return data


def decoded_bytes(data: bytes, max_pixels: int, side: int) -> int:
    """Bytes that decoding and resizing the image take, from the header *before* decoding (a
    small file can hold a huge bitmap): the decoded bands, its RGB copy, and the resize to
    `side` x `side`, whose first pass makes a `side`-wide RGB image of the source's height (or
    the other way round). A 1 x 40,000,000 PNG (155 kB) is 40 MB decoded but ~50 GB in that
    pass: it was let in by a decoded-size estimate and took a server to 10.8 GB. Shapes past
    MAX_ASPECT:1 are refused first (ImageError): the model sees a square, so a 50:1 image is
    squeezed 50x along its long side (nothing of it survives), while panoramas and scanned
    receipts stay under ~20:1. Over `max_pixels`: ImageTooLargeError. 0 for data that is not an
    image (decoding says why). `cogvlm serve` and `cogvlm web` check every image with it."""
    try:
        with open_image(data) as img:
            width, height = img.size
            bands = len(img.getbands())
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(str(e).split(" could")[0]) from None
    except Exception:  # not an image we read, or a header a decoder chokes on: decoding says which
        return 0
    if width * height > max_pixels:
        raise ImageTooLargeError(f"the image is {width}x{height} pixels")
    if max(width, height) > MAX_ASPECT * max(min(width, height), 1):
        raise ImageError(f"the image is {width}x{height} pixels: more than {MAX_ASPECT}:1, which the model's "
                         f"square input cannot show")
    return width * height * (bands + 3) + max(side * height, width * side) * 3


def _decode(data: bytes, name: str) -> Image.Image:
    try:
        with open_image(data) as img:
            img.load()  # decode fully now, so truncated files fail here and not later
            # upright as a viewer shows it (and as the web demo's upload gives it): boxes refer to
            # the same picture on every surface
            return ImageOps.exif_transpose(img).convert("RGB")
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image file in a format we read (PNG, JPEG, WebP, BMP, GIF, TIFF)") from None
    except Exception as e:  # a decoder fed crafted bytes raises anything (SyntaxError, IndexError, ...)
        raise ImageError(f"{name} is corrupt or truncated: {type(e).__name__}: {str(e)[:200]}") from None


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageError(f"image arrays must be uint8 (got {array.dtype}); scale to 0..255 first")
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4)):
        return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[2] == 1 else array).convert("RGB")
    raise ImageError(f"image arrays must be HxW or HxWxC with C in 1, 3, 4 (got shape {array.shape})")


def preprocess(source: ImageInput, image_size: int) -> torch.Tensor:
    """RGB → bicubic resize to (S, S) (aspect ratio not kept) → [0, 1] → normalize: (3, S, S) fp32."""
    img = load_image(source).resize((image_size, image_size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (x - mean) / std


def preprocess_frames(clip: torch.Tensor, size: int) -> torch.Tensor:
    """A clip (3, T, H, W) uint8 RGB, the authors' layout → the tower's input (T, 3, S, S) float32,
    exactly as the video models' `build_conversation_input_ids` (docs/spec/cogvlm2-video.md section 5.1):
    /255, CLIP normalisation, *then* pytorchvideo's short-side scale (bilinear, no antialiasing,
    align_corners False, the (3, T) axes as batch and channels), then torchvision's video
    centre crop, whose offsets round half to even (Python's `round`: an excess of 5 gives 2)."""
    if clip.dtype != torch.uint8 or clip.ndim != 4 or clip.shape[0] != 3 or 0 in clip.shape:
        raise VideoError(f"a clip must be a uint8 tensor (3, frames, height, width), not "
                         f"{str(clip.dtype).removeprefix('torch.')} {tuple(clip.shape)}")
    x = clip / 255.0
    x = (x - torch.tensor(MEAN).view(3, 1, 1, 1)) / torch.tensor(STD).view(3, 1, 1, 1)
    h, w = x.shape[-2:]
    if w < h:
        new_h, new_w = int(math.floor(float(h) / w * size)), size
    else:
        new_h, new_w = size, int(math.floor(float(w) / h * size))
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    i, j = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return x[..., i:i + size, j:j + size].transpose(0, 1).contiguous()


@dataclass(frozen=True)
class TowerFrames:
    """A clip already through `preprocess_frames`: (T, 3, S, S) float32 for a tower of S px.
    What the caption job's and the video evaluation's decoder threads hand the model, so the
    model's thread does no per-clip work (normalise, resize, crop: ~30 ms a clip on one core)."""

    pixels: torch.Tensor

    @classmethod
    def of(cls, clip: torch.Tensor, size: int) -> TowerFrames:
        return cls(preprocess_frames(clip, size))
