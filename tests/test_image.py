from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cogvlm.image import ImageError, load_image, preprocess


def make_image(w=37, h=23, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def direct(img: Image.Image, size: int) -> np.ndarray:
    """The spec's recipe, step by step."""
    resized = np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC)).astype(np.float64) / 255.0
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    return ((resized - mean) / std).transpose(2, 0, 1)


def test_preprocess_matches_direct_pil_bicubic(tmp_path):
    img = make_image()
    want = direct(img, 28)
    path = tmp_path / "x.png"
    img.save(path)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    for source in (img, path, str(path), buf.getvalue(), np.asarray(img)):
        got = preprocess(source, 28)
        assert got.shape == (3, 28, 28) and got.dtype == torch.float32
        assert np.abs(got.double().numpy() - want).max() < 1e-6


def test_grayscale_and_rgba_become_rgb(tmp_path):
    gray = Image.fromarray(np.arange(100, dtype=np.uint8).reshape(10, 10), mode="L")
    assert load_image(gray).mode == "RGB"
    rgba = Image.new("RGBA", (5, 5), (10, 20, 30, 40))
    assert load_image(rgba).getpixel((0, 0)) == (10, 20, 30)
    assert preprocess(np.zeros((8, 8), dtype=np.uint8), 14).shape == (3, 14, 14)


def test_bad_images_give_clear_errors(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "notes.txt").write_text("hello, not an image")
    with pytest.raises(ImageError, match="not an image"):
        load_image(tmp_path / "notes.txt")
    buf = io.BytesIO()
    make_image(64, 64).save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(tmp_path / "cut.jpg")
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="uint8"):
        load_image(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((4, 4, 7), dtype=np.uint8))


def encoded(fmt: str, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (8, 8), 200 if mode != "RGB" else (200, 10, 10)).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["QOI", "IM", "DDS", "ICNS", "EPS", "TGA", "PCX", "PPM", "SGI"])
def test_formats_we_do_not_document_are_refused_before_any_decoder_runs(fmt, tmp_path):
    """Pillow opens these valid files; their decoders raise anything on crafted ones, and EPS
    runs Ghostscript: only PNG, JPEG, WebP, BMP, GIF and TIFF are decoded."""
    data = encoded(fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # a real file of that format
    (tmp_path / "x").write_bytes(data)
    for source in (data, tmp_path / "x"):
        with pytest.raises(ImageError, match=r"is not an image file in a format we read \(PNG, JPEG, WebP"):
            load_image(source)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_the_documented_formats_decode(fmt):
    img = load_image(encoded(fmt))
    assert img.size == (8, 8) and img.mode == "RGB"


def test_a_png_with_a_short_idat_is_an_image_error_not_a_decoder_exception():
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, "PNG")
    data = buf.getvalue()
    at = data.index(b"IDAT")
    length = int.from_bytes(data[at - 4:at], "big")
    short = data[at + 4:at + 4 + length // 2]  # half the compressed pixels, in a chunk with a valid CRC
    chunk = len(short).to_bytes(4, "big") + b"IDAT" + short + zlib.crc32(b"IDAT" + short).to_bytes(4, "big")
    with pytest.raises(ImageError, match="the given bytes is corrupt or truncated"):
        load_image(data[:at - 4] + chunk + data[at + 8 + length:])


def test_exif_orientation_is_applied_as_the_web_demo_does(tmp_path):
    """A phone photo stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to
    view): every surface reads it upright, as Gradio's upload does, so boxes agree."""
    stored = Image.new("RGB", (40, 20), (0, 0, 0))
    stored.paste((255, 0, 0), (0, 0, 10, 20))  # the stored picture's left edge is red
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    img = load_image(tmp_path / "phone.jpg")
    assert img.size == (20, 40)  # upright: rotated a quarter turn
    top = np.asarray(img)[:5].mean(axis=(0, 1))  # the left edge is now the top
    assert top[0] > 200 and top[1] < 60 and top[2] < 60
    from PIL import ImageOps

    assert np.array_equal(np.asarray(img), np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "phone.jpg"))))
