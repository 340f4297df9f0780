"""Tests for jem_core.images: decoding untrusted uploads and preparing model inputs.

Every input is generated here (PIL, numpy, zlib); there are no binary fixtures.
"""

from __future__ import annotations

import io
import math
import resource
import struct
import time
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFile

from jem_core import images
from jem_core.images import (
    MAX_BYTES,
    MAX_PIXELS,
    ImageDecodeError,
    PreparedImage,
    decode_image,
    load_image_file,
    make_grid_image,
    png_bytes,
    prepare_upload,
    prepare_uploads,
    save_grid_png,
    to_model_input,
    to_uint8_images,
)

# ----------------------------------------------------------------------------- helpers


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def raw_png(width: int, height: int, bit_depth: int = 1, colour_type: int = 0) -> bytes:
    """A valid all-zero PNG built with zlib, without ever holding its pixels in memory:
    a 20000x20000 one is ~50 KB and takes ~0.1 s (Image.new('1', ...) would take 400 MB)."""
    samples = {0: 1, 2: 3, 3: 1}[colour_type]
    row = b"\0" * (1 + (width * bit_depth * samples + 7) // 8)  # filter byte + pixels
    comp = zlib.compressobj(9)
    block = row * 64
    parts = [comp.compress(block) for _ in range(height // 64)]
    parts += [comp.compress(row * (height % 64)), comp.flush()]

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    plte = chunk(b"PLTE", bytes([0, 0, 0, 255, 255, 255])) if colour_type == 3 else b""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + plte
            + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def digit(mode: str = "L", size: int = 64, bg=240, fg=10) -> Image.Image:
    """A '1'-like vertical stroke in the middle of a plain background."""
    img = Image.new(mode, (size, size), bg)
    ImageDraw.Draw(img).rectangle((size // 2 - 4, size // 6, size // 2 + 4, size - size // 6),
                                  fill=fg)
    return img


def noise_image(h: int = 64, w: int = 64) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def assert_model_input(p: PreparedImage, channels: int, size: int) -> None:
    assert isinstance(p, PreparedImage)
    assert p.tensor.shape == (channels, size, size)
    assert p.tensor.dtype == torch.float32
    assert torch.isfinite(p.tensor).all()
    assert p.tensor.min() >= -1.0 and p.tensor.max() <= 1.0
    expected_display = (size, size) if channels == 1 else (size, size, 3)
    assert p.display.dtype == np.uint8 and p.display.shape == expected_display
    # display is exactly the tensor as a picture
    back = torch.from_numpy(p.display.astype(np.float32)) / 127.5 - 1
    back = back[None] if channels == 1 else back.permute(2, 0, 1)
    assert torch.allclose(back, p.tensor, atol=1 / 127.5)


def notes_text(p: PreparedImage) -> str:
    return " | ".join(p.notes).lower()


def centre(p: PreparedImage) -> float:
    s = p.tensor.shape[-1]
    return float(p.tensor[:, s // 2 - 1:s // 2 + 1, s // 2 - 1:s // 2 + 1].mean())


def corner(p: PreparedImage) -> float:
    return float(p.tensor[:, :2, :2].mean())


# ------------------------------------------------------------------- refusing bad input


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("digit.png", encode(digit()))
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "make", "reason", "words"),
    [
        ("notes.txt", lambda: b"hello, this is not an image\nsecond line\n", "not_an_image", "text file"),
        ("scan.png", lambda: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\n", "not_an_image", "pdf"),
        ("photos.png", _zip_bytes, "not_an_image", "zip"),
        ("empty.png", lambda: b"", "empty", "0 bytes"),
        ("logo.png", lambda: b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "not_an_image", "svg"),
    ],
)
def test_non_images_are_refused_with_a_clear_message(tmp_path, name, make, reason, words):
    path = tmp_path / name
    path.write_bytes(make())
    with pytest.raises(ImageDecodeError) as info:
        decode_image(load_image_file(path), name)
    err = info.value
    assert err.reason == reason and err.name == name
    assert name in str(err) and words in str(err).lower()
    # the same through the upload path, which raises ImageDecodeError only
    with pytest.raises(ImageDecodeError):
        prepare_upload(path.read_bytes(), name, 1, 28)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_files_are_refused_not_returned_half_grey(fmt, keep):
    data = encode(noise_image(), fmt)
    cut = data[: int(len(data) * keep)]
    with pytest.raises(ImageDecodeError) as info:
        decode_image(cut, f"photo.{fmt.lower()}")
    assert info.value.reason == "truncated"
    assert "truncated" in str(info.value) and f"photo.{fmt.lower()}" in str(info.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never switched on globally


def test_upload_over_the_byte_limit_is_refused_before_decoding():
    data = b"\x89PNG\r\n\x1a\n" + b"\0" * MAX_BYTES
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, "huge.png")
    assert info.value.reason == "too_large" and "MB" in str(info.value)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak resident memory) to the current RSS
        return True
    except OSError:
        return False


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


@pytest.mark.parametrize(
    ("width", "height", "bit_depth", "colour_type"),
    [
        (20000, 20000, 1, 0),  # 400 MP 1-bit gray: over Pillow's own error threshold
        (20000, 20000, 1, 3),  # 400 MP 1-bit palette
        (10000, 10000, 1, 0),  # 100 MP: Pillow only *warns*; must still be refused
        (7000, 6000, 8, 0),    # 42 MP: under Pillow's limit, over MAX_PIXELS
    ],
)
def test_decompression_bombs_are_refused_without_decoding_pixels(width, height, bit_depth,
                                                                 colour_type):
    data = raw_png(width, height, bit_depth, colour_type)
    assert len(data) < 100_000 and width * height > MAX_PIXELS
    exact_rss = _reset_peak_rss()
    rss_before = _proc_status_kb("VmRSS") if exact_rss else 0
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ImageDecodeError) as info:
            prepare_upload(data, "bomb.png", 1, 28)
        elapsed = time.perf_counter() - start
        _, py_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.reason == "too_many_pixels"
    assert "bomb.png" in str(info.value) and "megapixel limit" in str(info.value)
    assert elapsed < 1.0
    assert py_peak < 50e6
    # Decoding would take at least width * height bytes (42 MB to 400 MB here).
    if exact_rss:
        grew_mb = (_proc_status_kb("VmHWM") - rss_before) / 1024
    else:  # ru_maxrss is a lifetime peak: only catches growth above earlier peaks
        grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before) / 1024
    assert grew_mb < 16  # ~0 when refused from the header; 42-400 MB if the pixels were decoded


def test_warning_filter_is_restored_after_decoding():
    import warnings

    before = list(warnings.filters)
    decode_image(encode(digit()), "ok.png")
    with pytest.raises(ImageDecodeError):
        decode_image(raw_png(10000, 10000), "bomb.png")
    assert warnings.filters == before


def test_large_jpeg_under_the_budget_is_decoded_reduced_and_noted():
    big = Image.linear_gradient("L").resize((4000, 3000)).convert("RGB")
    data = encode(big, "JPEG", quality=80)
    assert decode_image(data, "big.jpg").size == (4000, 3000)  # full decode on request
    assert decode_image(data, "big.jpg", draft_side=1024).size == (2000, 1500)  # JPEG draft
    start = time.perf_counter()
    p = prepare_upload(data, "big.jpg", 3, 32)
    assert time.perf_counter() - start < 2.0
    assert_model_input(p, 3, 32)
    assert "downscaled from 4000x3000" in notes_text(p)
    # the gradient runs top (dark) to bottom (light) and survives the reduction
    rows = p.tensor.mean(dim=(0, 2))
    assert rows[4] < rows[16] < rows[27]


# ------------------------------------------------------------------ every mode a user meets


def test_rgba_dark_content_on_transparent_is_composited_on_white_then_inverted():
    # hidden colour under the transparent area is black: dropping alpha would lose the digit
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(img).rectangle((28, 10, 36, 54), fill=(0, 0, 0, 255))
    p = prepare_upload(encode(img), "rgba.png", 1, 28)
    assert_model_input(p, 1, 28)
    assert "composited on white" in notes_text(p) and "grayscale" in notes_text(p)
    assert p.inverted
    assert corner(p) < -0.95 and centre(p) > 0.9  # MNIST-like: light digit, dark background


def test_la_light_content_on_transparent_is_composited_on_black():
    # hidden colour under the transparent area is white: compositing on white would erase it
    img = Image.new("LA", (64, 64), (255, 0))
    ImageDraw.Draw(img).rectangle((28, 10, 36, 54), fill=(255, 255))
    p = prepare_upload(encode(img), "la.png", 1, 28)
    assert_model_input(p, 1, 28)
    assert "composited on black" in notes_text(p)
    assert not p.inverted
    assert corner(p) < -0.95 and centre(p) > 0.9


def test_palette_with_transparency():
    img = Image.new("P", (64, 64), 0)
    img.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    ImageDraw.Draw(img).rectangle((28, 10, 36, 54), fill=1)
    data = encode(img, transparency=0)
    assert "transparency" in Image.open(io.BytesIO(data)).info
    p = prepare_upload(data, "pal_t.png", 1, 28)
    assert_model_input(p, 1, 28)
    text = notes_text(p)
    assert "palette" in text and "transparency" in text and "composited on white" in text
    assert p.inverted and corner(p) < -0.95 and centre(p) > 0.9


def test_palette_without_transparency_keeps_its_colours():
    img = Image.new("P", (32, 32), 0)
    img.putpalette([10, 200, 30, 250, 0, 0] + [0] * 762)
    p = prepare_upload(encode(img), "pal.png", 3, 32)
    assert_model_input(p, 3, 32)
    assert "palette" in notes_text(p) and not p.inverted
    assert p.display[5, 5].tolist() == [10, 200, 30]


@pytest.mark.parametrize(("lo", "hi"), [(1000, 60000), (0, 4095)])
def test_16_bit_gradient_keeps_ordering_and_full_range(lo, hi):
    values = np.linspace(lo, hi, 64).round().astype(np.uint16)
    img = Image.fromarray(np.tile(values, (64, 1)))
    data = encode(img)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    p = prepare_upload(data, "depth.png", 1, 32, invert=False)
    assert_model_input(p, 1, 32)
    profile = p.tensor[0].mean(dim=0)
    assert (profile[1:] > profile[:-1]).all()  # strictly increasing left to right
    assert profile[0] < -0.9 and profile[-1] > 0.9  # full range: not clipped at 255, not /65535
    assert "i;16" in notes_text(p) and "range" in notes_text(p)


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32_bit_integer_and_float_images_are_scaled_from_their_range(mode):
    ramp = np.tile(np.linspace(-5.0, 7.0, 40), (40, 1))
    arr = ramp.astype(np.int32 if mode == "I" else np.float32) * (1000 if mode == "I" else 1)
    img = Image.fromarray(arr)
    assert img.mode == mode
    p = to_model_input(img, 1, 8, invert=False)
    assert_model_input(p, 1, 8)
    profile = p.tensor[0].mean(dim=0)
    assert (profile[1:] > profile[:-1]).all() and profile[0] < -0.8 and profile[-1] > 0.8


def test_cmyk_jpeg():
    img = Image.new("CMYK", (64, 64), (0, 0, 0, 0))  # white paper
    ImageDraw.Draw(img).rectangle((24, 24, 40, 40), fill=(0, 0, 0, 255))  # black ink
    data = encode(img, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    p = prepare_upload(data, "scan.jpg", 1, 32)
    assert_model_input(p, 1, 32)
    assert "cmyk" in notes_text(p)
    assert p.inverted and corner(p) < -0.9 and centre(p) > 0.9


def test_bilevel_image():
    img = Image.new("1", (40, 40), 0)
    ImageDraw.Draw(img).rectangle((16, 4, 24, 36), fill=1)
    p = prepare_upload(encode(img), "bw.png", 1, 28)
    assert_model_input(p, 1, 28)
    assert "bilevel" in notes_text(p)
    assert not p.inverted and corner(p) < -0.99 and centre(p) > 0.99


def _bar_jpeg(orientation: int, size=(64, 64)) -> bytes:
    """Stored pixels: a bright horizontal bar across the middle rows."""
    w, h = size
    img = Image.new("L", size, 0)
    ImageDraw.Draw(img).rectangle((0, h // 2 - 4, w - 1, h // 2 + 3), fill=255)
    exif = img.getexif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def test_exif_orientation_is_applied():
    p = prepare_upload(_bar_jpeg(6), "phone.jpg", 1, 32, invert=False)
    assert_model_input(p, 1, 32)
    assert "exif orientation 6" in notes_text(p)
    t = p.tensor[0]
    # the bar must now be vertical: bright middle columns, dark outer columns, on every row
    assert t[:, 15:17].min() > 0.8 and t[:, :4].max() < -0.8
    # without the tag the bar stays horizontal
    q = prepare_upload(_bar_jpeg(1), "plain.jpg", 1, 32, invert=False)
    assert q.tensor[0][15:17, :].min() > 0.8 and q.tensor[0][:4, :].max() < -0.8
    assert "exif" not in notes_text(q)


def test_exif_rotation_swaps_width_and_height():
    img = decode_image(_bar_jpeg(6, size=(60, 30)), "wide.jpg")
    assert img.size == (30, 60)
    assert "jem_notes" in img.info and any("EXIF" in n for n in img.info["jem_notes"])


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("L", (16, 16), v) for v in (200, 50, 120)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    p = prepare_upload(buf.getvalue(), "anim.gif", 1, 8, invert=False)
    assert_model_input(p, 1, 8)
    assert "first frame" in notes_text(p) and "3 frames" in notes_text(p)
    assert p.tensor.mean().item() == pytest.approx(200 / 127.5 - 1, abs=0.01)


def test_one_pixel_image():
    p = prepare_upload(encode(Image.new("RGB", (1, 1), (200, 100, 50))), "dot.png", 3, 32)
    assert_model_input(p, 3, 32)
    assert "upscaled from 1x1" in notes_text(p)
    assert p.display[16, 16].tolist() == [200, 100, 50]


def test_extreme_aspect_ratio_is_padded_with_the_border_colour():
    img = Image.new("L", (1000, 10), 30)
    ImageDraw.Draw(img).rectangle((400, 2, 600, 7), fill=250)
    p = prepare_upload(encode(img), "strip.png", 1, 28)
    assert_model_input(p, 1, 28)
    assert "padded 1000x10 to a 1000x1000 square" in notes_text(p)
    assert not p.inverted
    assert np.abs(p.display[:10].astype(int) - 30).max() <= 1  # padding = border colour
    # and a tall one, for a 3-channel model
    q = prepare_upload(encode(Image.new("RGB", (10, 1000), (0, 0, 255))), "tall.png", 3, 32)
    assert_model_input(q, 3, 32)
    assert (q.display.reshape(-1, 3) == [0, 0, 255]).all()


# ----------------------------------------------------------------------------- inversion


def test_dark_digit_on_light_paper_is_auto_inverted():
    p = prepare_upload(encode(digit(bg=250, fg=5)), "paper.png", 1, 28)
    assert p.inverted
    assert corner(p) < -0.9 and centre(p) > 0.9
    assert "inverted: background was light" in notes_text(p)


def test_light_digit_on_dark_is_not_inverted():
    p = prepare_upload(encode(digit(bg=0, fg=255)), "mnist.png", 1, 28)
    assert not p.inverted
    assert corner(p) < -0.99 and centre(p) > 0.99
    assert "not inverted" in notes_text(p)


def test_invert_can_be_forced_either_way():
    kept = prepare_upload(encode(digit(bg=250, fg=5)), "paper.png", 1, 28, invert=False)
    assert not kept.inverted and corner(kept) > 0.9 and centre(kept) < -0.9
    forced = prepare_upload(encode(digit(bg=0, fg=255)), "mnist.png", 1, 28, invert=True)
    assert forced.inverted and corner(forced) > 0.99 and "forced" in notes_text(forced)


def test_auto_invert_is_off_for_colour_models():
    p = prepare_upload(encode(digit("RGB", bg=(250, 250, 250), fg=(5, 5, 5))), "c.png", 3, 32)
    assert not p.inverted and corner(p) > 0.9


# --------------------------------------------------------------------------- channels


def test_rgb_photo_becomes_grayscale_for_a_one_channel_model():
    img = noise_image(28, 28)
    p = prepare_upload(encode(img), "photo.png", 1, 28, invert=False)
    assert_model_input(p, 1, 28)
    assert "grayscale" in notes_text(p)
    expected = np.asarray(img.convert("L"), dtype=int)  # same ITU-R 601 luma as PIL
    assert np.abs(p.display.astype(int) - expected).max() <= 1


def test_grayscale_becomes_three_equal_channels_for_a_colour_model():
    p = prepare_upload(encode(digit()), "gray.png", 3, 32)
    assert_model_input(p, 3, 32)
    assert "3 times" in notes_text(p)
    assert torch.equal(p.tensor[0], p.tensor[1]) and torch.equal(p.tensor[1], p.tensor[2])


@pytest.mark.parametrize(("channels", "size"), [(2, 28), (1, 0), (3, 2.5)])
def test_bad_arguments_are_caller_errors(channels, size):
    with pytest.raises(ValueError) as info:
        to_model_input(digit(), channels, size)
    assert not isinstance(info.value, ImageDecodeError)


# ------------------------------------------------------------------------------ batches


def test_prepare_uploads_keeps_good_files_when_some_are_bad():
    files = [
        ("one.png", encode(digit())),
        ("notes.txt", b"just some text\n"),
        ("two.jpg", encode(digit("RGB", bg=(0, 0, 0), fg=(255, 255, 255)), "JPEG")),
        ("cut.png", encode(noise_image(), "PNG")[:500]),
        ("three.gif", encode(digit(bg=0, fg=255), "GIF")),
    ]
    prepared, errors = prepare_uploads(files, 1, 28)
    assert [p.name for p in prepared] == ["one.png", "two.jpg", "three.gif"]
    assert [name for name, _ in errors] == ["notes.txt", "cut.png"]
    assert "notes.txt" in errors[0][1] and "text file" in errors[0][1]
    assert "cut.png" in errors[1][1] and "truncated" in errors[1][1]
    batch = torch.stack([p.tensor for p in prepared])
    assert batch.shape == (3, 1, 28, 28)


def test_prepare_uploads_survives_items_that_are_not_files():
    prepared, errors = prepare_uploads([("none.png", None), ("ok.png", encode(digit()))], 1, 8)
    assert [p.name for p in prepared] == ["ok.png"] and errors[0][0] == "none.png"


# ---------------------------------------------------------------------------- file input


def test_load_image_file_errors_are_image_decode_errors(tmp_path):
    with pytest.raises(ImageDecodeError, match="not found"):
        load_image_file(tmp_path / "missing.png")
    with pytest.raises(ImageDecodeError, match="directory"):
        load_image_file(tmp_path)
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(MAX_BYTES + 1)  # sparse: no 20 MB written
    with pytest.raises(ImageDecodeError) as info:
        load_image_file(big)
    assert info.value.reason == "too_large"
    good = tmp_path / "good.png"
    good.write_bytes(encode(digit()))
    assert decode_image(load_image_file(good), str(good)).size == (64, 64)


# ------------------------------------------------------------------------------ display


def test_to_uint8_images_maps_the_range_and_clamps():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0, -7.0, float("nan")]).reshape(1, 1, 1, 6)
    out = to_uint8_images(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 6)
    assert out[0, 0].tolist() == [0, 128, 255, 255, 0, 128]
    rgb = to_uint8_images(torch.zeros(2, 3, 4, 5))
    assert rgb.shape == (2, 4, 5, 3)
    with pytest.raises(ValueError):
        to_uint8_images(torch.zeros(3, 4, 5))


@pytest.mark.parametrize(("n", "c", "nrow", "scale"), [(10, 1, None, 1), (10, 1, None, 3),
                                                        (7, 3, 5, 2), (1, 1, None, 4)])
def test_make_grid_image_has_the_expected_pixel_size(n, c, nrow, scale):
    x = torch.linspace(-1, 1, n)[:, None, None, None].expand(n, c, 28, 28).contiguous()
    img = make_grid_image(x, nrow=nrow, scale=scale)
    cols = min(nrow or math.ceil(math.sqrt(n)), n)
    rows = math.ceil(n / cols)
    assert img.size == ((cols * 30 + 2) * scale, (rows * 30 + 2) * scale)
    assert img.mode == ("L" if c == 1 else "RGB")
    arr = np.asarray(img)
    first = arr[(2 + 14) * scale, (2 + 14) * scale]
    assert np.all(first == 0)  # the first tile is -1 -> black
    if n > 1:
        last_col = (n - 1) % cols
        last_row = (n - 1) // cols
        assert np.all(arr[(2 + 30 * last_row + 14) * scale, (2 + 30 * last_col + 14) * scale] == 255)


def test_save_grid_png_writes_a_valid_png_atomically(tmp_path, monkeypatch):
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    path = tmp_path / "out" / "grid.png"
    save_grid_png(x, path, scale=2)
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == ((3 * 10 + 2) * 2, (2 * 10 + 2) * 2)
    before = path.read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_grid_png(x, path)
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temp file left
    assert path.read_bytes() == before  # the old file is intact


def test_png_bytes_round_trip():
    img = digit()
    data = png_bytes(img)
    assert data.startswith(b"\x89PNG")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(img))


def test_module_constants():
    assert images.MAX_PIXELS == 40_000_000 and images.MAX_BYTES == 20 * 1024 * 1024
    assert {"PNG", "JPEG", "GIF"} <= set(images.ALLOWED_FORMATS)
    assert "EPS" not in images.ALLOWED_FORMATS
