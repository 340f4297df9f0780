"""Decoding and preprocessing of user-uploaded images, robust against bad input.

This module is the edge where untrusted bytes (an upload, a file on disk) become the
tensors that ``jem_core`` works with, and where tensors become pictures again (grids,
PNG files) for display.

Conventions:

- Inside ``jem_core`` images are ``torch.float32`` tensors ``[N, C, H, W]`` in ``[-1, 1]``;
  a pixel value ``p`` in ``0..255`` maps to ``p / 127.5 - 1``.
- For display they are ``numpy.uint8`` arrays ``[H, W]`` (1 channel) or ``[H, W, 3]``.

Decoding (:func:`decode_image`) refuses, with an :class:`ImageDecodeError` that names the
file, the problem and what to do: empty input, uploads over :data:`MAX_BYTES`, data that
is not an image in one of :data:`ALLOWED_FORMATS` (text, PDF, ZIP, SVG, HEIC, ...),
truncated or corrupted files (the pixels are fully decoded, so a cut-off JPEG is never
returned half grey) and images over :data:`MAX_PIXELS` (checked from the header, before
any pixel is decoded: a guard against decompression bombs).

Preprocessing (:func:`to_model_input`) turns any decoded image into what a model takes:
``channels`` (1 or 3) x ``size`` x ``size``; every step it takes (EXIF rotation, alpha
compositing, colour conversion, padding to square, resizing, inversion, ...) is recorded
as a human-readable note so that the dashboard can show the user what the model saw.

What does not live here: datasets (:mod:`jem_core.data`), scoring a prepared input (:mod:`jem_core.scoring`).
"""

from __future__ import annotations

import io
import math
import numbers
import os
import struct
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO

import numpy as np
import torch
import torchvision.transforms.functional as TF
import torchvision.utils
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode

from .errors import BadInput
from .utils import atomic_write

__all__ = [
    "ALLOWED_FORMATS",
    "MAX_BYTES",
    "MAX_MB",
    "MAX_PIXELS",
    "STAGE_SIDE",
    "BLANK_STD",
    "DIGIT_BOX",
    "WORK_MAX_SIDE",
    "ImageDecodeError",
    "PreparedImage",
    "decode_image",
    "load_image_file",
    "make_grid_image",
    "png_bytes",
    "prepare_upload",
    "prepare_uploads",
    "save_grid_png",
    "to_model_input",
    "to_uint8_images",
]

#: Pixel budget (width * height, from the file header) for decoding; larger images are
#: refused before their pixels are decoded (decompression-bomb guard). 40 megapixels is
#: a 7300x5500 photo; an RGB image at the limit takes 120 MB once decoded.
MAX_PIXELS: int = 40_000_000

#: Largest accepted upload / file, in MiB (the app's upload widgets take it as Streamlit's MB, also 2**20 bytes)
#: and in bytes.
MAX_MB: int = 20
MAX_BYTES: int = MAX_MB * 1024 * 1024

#: Longest side, in pixels, to which large images are reduced right after decoding
#: (JPEG: decoded at a reduced scale via ``Image.draft``; others: ``Image.resize`` with
#: ``reducing_gap``) before any float conversion, so memory stays bounded. Model inputs
#: are at most a few dozen pixels wide, so nothing the model could see is lost.
WORK_MAX_SIDE: int = 1024

#: Below this pixel standard deviation (``[-1, 1]`` units) a prepared image counts as blank (``PreparedImage.blank``).
BLANK_STD: float = 0.02

#: Longest side, in pixels, of the preprocessing snapshots kept in ``PreparedImage.stages``.
STAGE_SIDE: int = 112

#: Digit-style normalisation (MNIST's own: LeCun et al. 1998): the ink is fitted into a box of this
#: fraction of the model's side (20 of 28 pixels), keeping its aspect ratio, then centred by its
#: centre of mass.
DIGIT_BOX: float = 20 / 28

#: Pillow format names that :func:`decode_image` accepts. Deliberately a short list of
#: common raster formats: Pillow's other plugins include rarely used or risky parsers
#: (EPS, for instance, runs Ghostscript). Filtered at import time to the plugins that
#: this Pillow build has.
_WANTED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM", "ICO", "AVIF")
Image.init()
ALLOWED_FORMATS: tuple[str, ...] = tuple(f for f in _WANTED_FORMATS if f in Image.OPEN)

# Keys under which decode_image() leaves its notes and the original size in `img.info`,
# so that to_model_input() can report them.
_NOTES_KEY = "jem_notes"
_ORIGINAL_SIZE_KEY = "jem_original_size"

_EXIF_ORIENTATION_TAG = 0x0112
_ORIENTATION_TEXT = {
    2: "mirrored left-right",
    3: "rotated 180 degrees",
    4: "flipped top-bottom",
    5: "transposed",
    6: "rotated 90 degrees clockwise",
    7: "transversed",
    8: "rotated 90 degrees counter-clockwise",
}

# Errors that Pillow's decoders raise for damaged data (besides the ones named explicitly).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError,
                  KeyError, struct.error, zlib.error)


class ImageDecodeError(BadInput):
    """An image could not be read or prepared.

    The message names the file, says what is wrong and what to do, and is meant to be
    shown to the user as is. Attributes: ``name`` (the file name as given, or ``None``)
    and ``reason``, a short machine-readable code: ``"empty"``, ``"too_large"``,
    ``"too_many_pixels"``, ``"not_an_image"``, ``"truncated"``, ``"corrupt"``,
    ``"unsupported_mode"``, ``"unreadable_file"`` or ``"failed"``.
    """

    def __init__(self, message: str, *, name: str | None = None, reason: str = "failed"):
        super().__init__(message)
        self.name = name
        self.reason = reason


def _error(name: str, problem: str, hint: str, reason: str) -> ImageDecodeError:
    return ImageDecodeError(f'"{name}" {problem}. {hint}', name=name, reason=reason)


@dataclass
class PreparedImage:
    """One image, ready for a model, with a record of what was done to it.

    Attributes:
        name: the file name or path as given.
        tensor: ``[C, H, W]`` ``torch.float32`` in ``[-1, 1]`` with ``H == W == size``;
            add a batch axis (``tensor[None]`` or ``torch.stack``) before calling a model.
        display: ``numpy.uint8`` ``[H, W]`` (C == 1) or ``[H, W, 3]`` (C == 3): exactly
            ``tensor`` as a picture, i.e. what the model sees (after inversion).
        inverted: whether the colours were inverted (dark-on-light -> light-on-dark).
        notes: human-readable notes on each step taken, in order, e.g.
            ``"rotated by EXIF orientation 6 (rotated 90 degrees clockwise)"``.
        stages: ``(caption, picture)`` snapshots of the main steps, for showing the
            preprocessing as pictures: ``numpy.uint8`` ``[h, w]`` or ``[h, w, 3]``, at most
            :data:`STAGE_SIDE` pixels on their longer side (the last one is ``display``).
    """

    name: str
    tensor: torch.Tensor
    display: np.ndarray
    inverted: bool
    notes: list[str] = field(default_factory=list)
    stages: list[tuple[str, np.ndarray]] = field(default_factory=list)

    @property
    def blank(self) -> bool:
        """True when the model input is (nearly) one flat grey level: no content for a verdict to be about
        (pixel standard deviation below :data:`BLANK_STD` in ``[-1, 1]`` units)."""
        return float(self.tensor.std()) < BLANK_STD


# --------------------------------------------------------------------------- decoding


def _describe_non_image(data: bytes) -> tuple[str, str]:
    """(problem, hint) for bytes that Pillow could not identify, from their signature."""
    head = bytes(data[:512])
    stripped = head.lstrip()
    lower = stripped[:256].lower()
    if head.startswith(b"%PDF"):
        return ("is a PDF document, not an image",
                "Export the page as PNG or JPEG (or take a screenshot) and upload that")
    if head.startswith((b"%!PS", b"\xc5\xd0\xd3\xc6")):
        return ("is a PostScript/EPS file, which is not read for safety reasons",
                "Export it as PNG and upload that")
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return ("is a ZIP archive (or an Office document), not an image, whatever its name says",
                "Extract the images from the archive and upload them one by one")
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypmsf1", b"ftyphevc"):
        return ("is a HEIC/HEIF photo, a format this app cannot read",
                "Convert it to JPEG or PNG first (on an iPhone: Settings > Camera > "
                "Formats > Most Compatible)")
    if lower.startswith(b"<svg") or (lower.startswith(b"<?xml") and b"<svg" in head.lower()):
        return ("is an SVG vector drawing; only raster images can be read",
                "Export it as PNG and upload that")
    if head.startswith((b"\x1f\x8b", b"7z\xbc\xaf", b"Rar!")):
        return ("is a compressed archive, not an image",
                "Extract the images from the archive and upload them one by one")
    if head:
        try:
            text: str | None = head.decode("utf-8")
        except UnicodeDecodeError as e:  # a multi-byte character cut off at the end is fine
            text = head[:e.start].decode("utf-8") if e.start >= len(head) - 3 else None
        if text and all(c.isprintable() or c in "\r\n\t\f" for c in text):
            return ("is a text file, not an image",
                    "Use an image file (PNG, JPEG, GIF, BMP, WebP or TIFF)")
    formats = ", ".join(ALLOWED_FORMATS)
    return (f"is not an image in a supported format ({formats})",
            "Check that it is an image file and has not been renamed from another type")


def _as_bytes(data: object) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    getvalue = getattr(data, "getvalue", None)
    if callable(getvalue):  # io.BytesIO, Streamlit's UploadedFile
        return bytes(getvalue())
    read = getattr(data, "read", None)
    if callable(read):  # an open binary file: read one byte more than allowed at most
        return bytes(read(MAX_BYTES + 1))
    raise TypeError(f"expected bytes or a binary file object, got {type(data).__name__}")


def decode_image(data: bytes | bytearray | memoryview | IO[bytes], name: str = "image", *,
                 draft_side: int | None = None) -> Image.Image:
    """Decode and verify an untrusted image file.

    Args:
        data: the file's bytes (``bytes``, ``bytearray``, ``memoryview``) or a binary file
            object (anything with ``getvalue()`` or ``read()``, e.g. Streamlit's
            ``UploadedFile``).
        name: the file name, used in error messages and notes only.
        draft_side: if given, JPEG images are decoded at a reduced scale (1/2, 1/4 or 1/8,
            via ``Image.draft``) as long as both sides stay at least ``draft_side`` pixels;
            this bounds memory for large photos. Other formats are decoded at full size.

    Returns:
        A fully loaded ``PIL.Image.Image`` in whatever mode the file has (``"1"``, ``"L"``,
        ``"LA"``, ``"P"``, ``"RGB"``, ``"RGBA"``, ``"CMYK"``, ``"I;16"``, ``"I"``, ``"F"``,
        ...), upright (EXIF orientation applied) and, for animated images, the first
        frame. ``img.info["jem_notes"]`` holds notes on what was done (list of str) and
        ``img.info["jem_original_size"]`` the (width, height) in pixels before any
        reduction, upright; :func:`to_model_input` reports both.

    Raises:
        ImageDecodeError: empty input; more than :data:`MAX_BYTES` bytes; not an image in
            one of :data:`ALLOWED_FORMATS` (text, PDF, ZIP, SVG, HEIC, ...); a truncated
            or corrupted file (the pixels are fully decoded, so a cut-off file is refused
            rather than returned half grey); more than :data:`MAX_PIXELS` pixels according
            to the header (refused before the pixels are decoded) or according to Pillow's
            own decompression-bomb check.
        TypeError: ``data`` is neither bytes-like nor a binary file object.
    """
    data = _as_bytes(data)
    n_bytes = len(data)
    if n_bytes == 0:
        raise _error(name, "is empty (0 bytes)",
                     "Upload the file again; it may not have been saved completely", "empty")
    if n_bytes > MAX_BYTES:
        raise _error(name, f"is {n_bytes / 2**20:.1f} MB, over the {MAX_MB} MB limit",
                     "Save it at a smaller size or as a compressed JPEG/PNG and try again",
                     "too_large")

    notes: list[str] = []

    def too_many_pixels(width: int, height: int) -> ImageDecodeError:
        return _error(
            name,
            f"is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels), over the "
            f"{MAX_PIXELS / 1e6:.0f}-megapixel limit (a guard against decompression bombs)",
            "Resize it to a smaller size before uploading", "too_many_pixels")

    def bomb(exc: BaseException) -> ImageDecodeError:
        return _error(name, f"has too many pixels, over the {MAX_PIXELS / 1e6:.0f}-megapixel limit "
                      f"(a guard against decompression bombs; {exc})",
                      "Resize it to a smaller size before uploading", "too_many_pixels")

    def corrupt(exc: BaseException) -> ImageDecodeError:
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, EOFError) or "truncated" in detail.lower():
            return _error(name, f"is truncated: the image data ends early ({detail})",
                          "Upload the complete file again, or re-save it in an image editor",
                          "truncated")
        return _error(name, f"is corrupted and cannot be decoded ({detail})",
                      "Re-save it in an image editor or use another copy", "corrupt")

    # Pillow checks its own (larger) pixel limit in Image.open, and warns instead of raising
    # between 1x and 2x that limit: turn the warning into an error. The filter is
    # process-global (not thread-safe), which is harmless here: Pillow's limit is above
    # MAX_PIXELS, so the explicit header check below refuses those images anyway.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise bomb(e) from e
        except UnidentifiedImageError as e:
            problem, hint = _describe_non_image(data)
            raise _error(name, problem, hint, "not_an_image") from e
        except _DECODE_ERRORS as e:
            raise corrupt(e) from e

        width, height = img.size
        if width <= 0 or height <= 0:
            raise _error(name, f"has an invalid size {width}x{height}",
                         "Re-save it in an image editor", "corrupt")
        if width * height > MAX_PIXELS:  # from the header: no pixel has been decoded yet
            raise too_many_pixels(width, height)

        try:
            if getattr(img, "is_animated", False):
                try:
                    n_frames = f" ({img.n_frames} frames)"
                except _DECODE_ERRORS:
                    n_frames = ""
                kind = "an animated" if img.format in ("GIF", "PNG", "WEBP", "AVIF") else "a multi-frame"
                notes.append(f"used the first frame of {kind} {img.format}{n_frames}")
                img.seek(0)
            if draft_side is not None and img.format in ("JPEG", "MPO"):
                img.draft(None, (draft_side, draft_side))
            img.load()  # decode every pixel now: truncation and corruption surface here
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise bomb(e) from e
        except MemoryError as e:
            raise too_many_pixels(width, height) from e
        except Exception as e:  # noqa: BLE001 - untrusted data: any decoder failure is the file's
            raise corrupt(e) from e

    # EXIF is best-effort metadata: a broken block is noted and ignored, never fatal.
    try:
        orientation = int(img.getexif().get(_EXIF_ORIENTATION_TAG, 1))
        if orientation in _ORIENTATION_TEXT:
            img = ImageOps.exif_transpose(img)
            notes.append(f"rotated by EXIF orientation {orientation} "
                         f"({_ORIENTATION_TEXT[orientation]})")
            if orientation in (5, 6, 7, 8):
                width, height = height, width
    except Exception:  # noqa: BLE001
        notes.append("ignored unreadable EXIF metadata (orientation not applied)")

    img.info[_NOTES_KEY] = notes
    img.info[_ORIGINAL_SIZE_KEY] = (width, height)
    return img


def load_image_file(path: str | os.PathLike[str]) -> bytes:
    """Read an image file's bytes from disk, for :func:`decode_image` / :func:`prepare_upload`.

    Args:
        path: a file path.

    Returns:
        The file's contents (at most :data:`MAX_BYTES` bytes).

    Raises:
        ImageDecodeError (not ``OSError``): the path does not exist, is a directory, cannot
            be read (permissions, I/O error), or the file is larger than :data:`MAX_BYTES`
            (checked from its size before reading).
    """
    name = os.fspath(path)
    try:
        if os.path.isdir(name):
            raise _error(name, "is a directory, not an image file",
                         "Choose an image file inside it", "unreadable_file")
        size = os.stat(name).st_size
        if size > MAX_BYTES:
            raise _error(name, f"is {size / 2**20:.1f} MB, over the {MAX_MB} MB limit",
                         "Save it at a smaller size or as a compressed JPEG/PNG", "too_large")
        with open(name, "rb") as f:
            data = f.read(MAX_BYTES + 1)  # the file may have grown since stat()
    except FileNotFoundError as e:
        raise _error(name, "was not found", "Check the path and the file name",
                     "unreadable_file") from e
    except PermissionError as e:
        raise _error(name, "cannot be read (permission denied)",
                     "Check the file's permissions", "unreadable_file") from e
    except OSError as e:
        raise _error(name, f"cannot be read ({e.strerror or e})",
                     "Check that the file is accessible and try again", "unreadable_file") from e
    if len(data) > MAX_BYTES:
        raise _error(name, f"is over the {MAX_MB} MB limit",
                     "Save it at a smaller size or as a compressed JPEG/PNG", "too_large")
    return data


# ---------------------------------------------------------------------- preprocessing


_GRAY_MODES = ("1", "L", "LA", "La")
_NUMERIC_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")


def _normalise_mode(img: Image.Image, name: str, notes: list[str]) -> Image.Image:
    """Convert any PIL mode to one of "L", "LA", "RGB", "RGBA" (8 bit) or "F" (float)."""
    mode = img.mode
    transparent = img.has_transparency_data
    if mode in _NUMERIC_MODES:
        return img if mode == "F" else img.convert("I").convert("F")
    if mode == "1":
        notes.append("bilevel (1-bit) image read as black-and-white grayscale")
    if mode in _GRAY_MODES:
        return img.convert("LA" if transparent else "L") if mode != "L" or transparent else img
    if mode in ("P", "PA"):
        target = "RGBA" if transparent else "RGB"
        notes.append(f"palette image (P) converted to {target}"
                     + (" (with transparency)" if transparent else ""))
        return img.convert(target)
    if mode in ("RGB", "RGBA", "RGBa"):
        return img.convert("RGBA") if transparent and mode != "RGBA" else img
    if mode == "CMYK":
        notes.append("converted CMYK to RGB (no colour profile applied)")
        return img.convert("RGB")
    if mode == "LAB":
        notes.append("used the lightness (L) channel of a LAB image")
        return img.getchannel("L")
    try:
        converted = img.convert("RGB")
    except ValueError as e:
        raise _error(name, f"has the colour mode {mode}, which cannot be converted",
                     "Re-save it as an 8-bit PNG or JPEG", "unsupported_mode") from e
    notes.append(f"converted {mode} to RGB")
    return converted


def _work_size(width: int, height: int) -> tuple[int, int]:
    scale = WORK_MAX_SIDE / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_unit_float(img: Image.Image, source_mode: str, notes: list[str]) -> np.ndarray:
    """PIL image ("L", "LA", "RGB", "RGBA" or "F") -> float32 [H, W, C] in [0, 1]."""
    if img.mode != "F":
        arr = np.asarray(img, dtype=np.uint8).astype(np.float32) / 255.0
        return arr[:, :, None] if arr.ndim == 2 else arr
    arr = np.asarray(img, dtype=np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        notes.append("replaced non-finite pixel values (NaN/inf) by the minimum")
    values = arr[finite]
    lo = float(values.min()) if values.size else 0.0
    hi = float(values.max()) if values.size else 0.0
    arr = np.where(finite, arr, lo)
    if hi > lo:
        arr = (arr - lo) / (hi - lo)
        notes.append(f"{source_mode} image scaled from its value range [{lo:g}, {hi:g}] to [0, 1]")
    else:
        full = 1.0 if source_mode == "F" else 65535.0
        arr = np.full_like(arr, min(max(lo / full, 0.0), 1.0))
        notes.append(f"{source_mode} image is constant ({lo:g})")
    return arr.astype(np.float32)[:, :, None]


def _composite_alpha(arr: np.ndarray, mode: str, notes: list[str]) -> np.ndarray:
    """float [H, W, C+1] with alpha last -> [H, W, C], composited on a matte that contrasts
    with the visible content: white under dark content, black under light content."""
    colour, alpha = arr[:, :, :-1], arr[:, :, -1:]
    if alpha.min() >= 1.0:
        return colour  # an alpha channel that is fully opaque changes nothing
    lum = colour[:, :, 0] if colour.shape[2] == 1 else colour @ np.array(
        [0.299, 0.587, 0.114], dtype=np.float32)
    weight = float(alpha.sum())
    if weight <= 1e-6:
        matte, why = 1.0, "the image is fully transparent"
    else:
        content = float((lum * alpha[:, :, 0]).sum()) / weight
        matte, why = ((0.0, f"the visible content is light (mean {content:.2f})") if content > 0.5
                      else (1.0, f"the visible content is dark (mean {content:.2f})"))
    notes.append(f"transparency ({mode}): composited on {'white' if matte else 'black'}, "
                 f"since {why}")
    return colour * alpha + matte * (1.0 - alpha)


def _ring_mask(height: int, width: int) -> torch.Tensor:
    """Boolean [H, W] mask of the outer 10% ring (at least one pixel on each side)."""
    rh, rw = max(1, math.ceil(0.1 * height)), max(1, math.ceil(0.1 * width))
    mask = torch.ones(height, width, dtype=torch.bool)
    if height > 2 * rh and width > 2 * rw:
        mask[rh:height - rh, rw:width - rw] = False
    return mask


def _check_args(channels: int, size: int, invert: bool | None) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"size must be a positive int (pixels), got {size!r}")
    if invert not in (None, True, False):
        raise ValueError(f"invert must be None, True or False, got {invert!r}")


def _snapshot(t: torch.Tensor) -> np.ndarray:
    """``[C, h, w]`` in ``[0, 1]`` -> uint8 picture with its longer side at most :data:`STAGE_SIDE`."""
    c, h, w = t.shape
    scale = min(1.0, STAGE_SIDE / max(h, w))
    if scale < 1.0:
        t = TF.resize(t, [max(1, round(h * scale)), max(1, round(w * scale))], antialias=True)
    a = (t.clamp(0, 1) * 255).round().to(torch.uint8)
    return a[0].numpy() if c == 1 else a.permute(1, 2, 0).numpy()


def _digit_style(t: torch.Tensor, size: int, invert: bool | None, notes: list[str],
                 stages: list[tuple[str, np.ndarray]]) -> tuple[torch.Tensor, bool]:
    """MNIST-style normalisation of a 1-channel picture ``[1, h, w]`` in ``[0, 1]``: light ink on black,
    levels stretched (background -> 0, ink -> 1), the ink's bounding box fitted into a
    ``DIGIT_BOX * size`` box with its aspect ratio kept, and centred by its centre of mass.
    Returns ``([1, size, size] in [0, 1], inverted)``. Source: LeCun et al. (1998), the MNIST database's
    description (size-normalised to 20x20, centred by centre of mass in 28x28)."""
    _, h, w = t.shape
    ring = t[0][_ring_mask(h, w)]
    border = float(ring.mean())
    do_invert = border > 0.5 if invert is None else bool(invert)
    if do_invert:
        t = 1.0 - t
    why = "forced" if invert is not None else f"mean border {border:.2f}"
    notes.append(f"inverted to light ink on a dark background ({why})" if do_invert
                 else f"not inverted ({why})")
    bg = float((1.0 - ring if do_invert else ring).median())
    ink = float(torch.quantile(t.flatten(), 0.995))
    if ink - bg < 0.05:
        notes.append("digit-style normalisation skipped: no ink stands out from the background")
        return TF.resize(t, [size, size], antialias=True).clamp(0, 1), do_invert
    t = ((t - bg) / (ink - bg)).clamp(0, 1)
    notes.append(f"levels: background {bg:.2f} -> 0 and ink {ink:.2f} -> 1 (contrast stretched)")
    stages.append(("levels", _snapshot(t)))
    mask = t[0] > 0.3
    rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
    t = t[:, int(rows[0]):int(rows[-1]) + 1, int(cols[0]):int(cols[-1]) + 1]
    box = max(1, round(DIGIT_BOX * size)) if size >= 16 else size
    ch, cw = t.shape[1:]
    scale = box / max(ch, cw)
    nh, nw = max(1, round(ch * scale)), max(1, round(cw * scale))
    t = TF.resize(t, [nh, nw], interpolation=InterpolationMode.BILINEAR, antialias=True).clamp(0, 1)
    ys, xs = torch.arange(nh, dtype=torch.float32), torch.arange(nw, dtype=torch.float32)
    mass = float(t[0].sum()) or 1.0
    cy, cx = float((t[0].sum(1) * ys).sum()) / mass, float((t[0].sum(0) * xs).sum()) / mass
    top = int(round((size - 1) / 2 - cy))
    left = int(round((size - 1) / 2 - cx))
    top, left = min(max(top, 0), size - nh), min(max(left, 0), size - nw)
    out = torch.zeros(1, size, size)
    out[:, top:top + nh, left:left + nw] = t
    notes.append(f"digit-style: cropped the ink ({cw}x{ch}), fitted it into a {box}x{box} box and centred it by "
                 f"its centre of mass in {size}x{size}")
    return out, do_invert


def to_model_input(img: Image.Image, channels: int, size: int, invert: bool | None = None,
                   name: str = "image", digit_style: bool = False) -> PreparedImage:
    """Turn a decoded image into a model input, noting every step taken.

    Steps: any PIL mode to 8-bit L/RGB (1 -> L; P -> RGB/RGBA; CMYK, YCbCr, HSV -> RGB;
    16/32-bit integer and float modes are scaled from their actual value range to [0, 1],
    not clipped at 255); images with a side over :data:`WORK_MAX_SIDE` are reduced early;
    transparency is composited on white when the visible content is dark and on black when
    it is light (so a light or a dark digit on a transparent canvas both stay visible);
    colour -> grayscale (ITU-R 601 luma) for 1-channel models, grayscale -> 3 equal
    channels for 3-channel models; non-square images are padded to a square with the
    border colour (per-channel median of the outer 10% ring); then an antialiased bilinear
    resize to ``size`` x ``size``.

    Inversion: the model expects what it was trained on; MNIST-like digits are light on
    dark, while a photo of a digit on paper is dark on light. ``invert=None`` (auto) with
    ``channels == 1`` inverts when the mean of the outer 10% ring of the final grayscale
    image (values in [0, 1]) is above 0.5; with ``channels == 3`` (CIFAR-like models)
    auto means no inversion. ``invert=True`` / ``False`` forces it.

    Args:
        img: a PIL image in any mode, e.g. from :func:`decode_image` (whose notes in
            ``img.info["jem_notes"]`` are carried over). Not modified.
        channels: 1 or 3, the model's input channels.
        size: the model's square input side in pixels (e.g. 8, 28, 32).
        invert: None (auto), True or False; see above.
        name: file name for the result and for error messages.
        digit_style: for 1-channel models, replace padding, resizing and inversion by MNIST's own
            normalisation: light ink on black, levels stretched (the background's median to 0, the
            ink's 99.5th percentile to 1), the ink cropped, fitted into a :data:`DIGIT_BOX` box (20 of 28
            pixels; the whole side for models under 16 pixels) and centred by its centre of mass
            (LeCun et al. 1998). Photos of digits on paper then look like the training data instead of
            a grey, off-centre, low-contrast picture. Ignored for 3-channel models.

    Returns:
        A :class:`PreparedImage` whose ``tensor`` is ``[channels, size, size]`` float32 in
        ``[-1, 1]`` and ``display`` the matching uint8 picture.

    Raises:
        ValueError: ``channels`` not 1 or 3, ``size`` not a positive int, ``invert`` not
            None/True/False (caller errors).
        ImageDecodeError: the image's mode cannot be converted, or the image's data cannot
            be read.
    """
    _check_args(channels, size, invert)
    channels, size = int(channels), int(size)
    notes = list(img.info.get(_NOTES_KEY, ()))
    orig_w, orig_h = img.info.get(_ORIGINAL_SIZE_KEY, img.size)
    source_mode = img.mode

    try:
        work = _normalise_mode(img, name, notes)
        if max(work.size) > WORK_MAX_SIDE:
            work = work.resize(_work_size(*work.size), Image.Resampling.BILINEAR,
                               reducing_gap=2.0)
        if work.size != (orig_w, orig_h):
            notes.append(f"downscaled from {orig_w}x{orig_h} to {work.width}x{work.height} "
                         f"early (large image)")
        arr = _to_unit_float(work, source_mode, notes)
    except ImageDecodeError:
        raise
    except _DECODE_ERRORS as e:
        raise _error(name, f"could not be converted from mode {source_mode} ({e})",
                     "Re-save it as an 8-bit PNG or JPEG", "unsupported_mode") from e

    if work.mode in ("LA", "RGBA"):
        arr = _composite_alpha(arr, source_mode, notes)

    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)  # [C, H, W] in [0, 1]
    stages = [("as decoded", _snapshot(t))]
    if channels == 1 and t.shape[0] == 3:
        t = TF.rgb_to_grayscale(t, num_output_channels=1)
        notes.append(f"converted colour ({source_mode}) to grayscale for a 1-channel model")
    elif channels == 3 and t.shape[0] == 1:
        t = t.expand(3, -1, -1)
        notes.append("repeated the grayscale channel 3 times for a 3-channel model")
    if digit_style and channels == 1:
        t, do_invert = _digit_style(t, size, invert, notes, stages)
        tensor = (t * 2.0 - 1.0).to(torch.float32).contiguous()
        display = to_uint8_images(tensor[None])[0]
        stages.append((f"model input {size}x{size}", display))
        return PreparedImage(name=name, tensor=tensor, display=display, inverted=do_invert, notes=notes,
                             stages=stages)

    _, h, w = t.shape
    if h != w:
        side = max(h, w)
        colour = t[:, _ring_mask(h, w)].median(dim=1).values
        square = colour[:, None, None].expand(-1, side, side).clone()
        top, left = (side - h) // 2, (side - w) // 2
        square[:, top:top + h, left:left + w] = t
        t = square
        shown = ", ".join(f"{int(round(float(c) * 255))}" for c in colour)
        notes.append(f"padded {w}x{h} to a {side}x{side} square with the border colour ({shown})")
    if max(h, w) < size:
        notes.append(f"upscaled from {w}x{h}: the image is smaller than the model's "
                     f"{size}x{size} input, so it looks blurred")
    if t.shape[1] != size:
        t = TF.resize(t, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
        notes.append(f"resized to {size}x{size}")
    t = t.clamp(0.0, 1.0).contiguous()

    gray = t[0] if channels == 1 else TF.rgb_to_grayscale(t)[0]
    border = float(gray[_ring_mask(size, size)].mean())
    if invert is None:
        do_invert = channels == 1 and border > 0.5
        if channels == 1:
            notes.append(f"inverted: background was light (mean border {border:.2f})" if do_invert
                         else f"not inverted: background is dark (mean border {border:.2f})")
    else:
        do_invert = bool(invert)
        notes.append(f"inverted (forced; mean border {border:.2f})" if do_invert
                     else f"not inverted (forced; mean border {border:.2f})")
    if do_invert:
        t = 1.0 - t

    tensor = (t * 2.0 - 1.0).to(torch.float32)
    display = to_uint8_images(tensor[None])[0]
    stages.append((f"model input {size}x{size}" + (", inverted" if do_invert else ""), display))
    return PreparedImage(name=name, tensor=tensor, display=display, inverted=do_invert,
                         notes=notes, stages=stages)


def prepare_upload(data: bytes | bytearray | memoryview | IO[bytes], name: str, channels: int,
                   size: int, invert: bool | None = None, digit_style: bool = False) -> PreparedImage:
    """Decode an uploaded file and prepare it for a model: :func:`decode_image` (with JPEGs
    decoded at reduced scale when large) followed by :func:`to_model_input`.

    Args:
        data: the file's bytes or a binary file object; name: its file name;
        channels, size, invert, digit_style: as for :func:`to_model_input`.

    Returns:
        A :class:`PreparedImage` (``tensor`` ``[channels, size, size]`` float32 in [-1, 1]).

    Raises:
        ImageDecodeError: for anything wrong with the file, including unexpected failures
            inside the decoders (wrapped, with the original exception as ``__cause__``).
        ValueError: invalid ``channels`` / ``size`` / ``invert`` (caller errors).
        TypeError: ``data`` is neither bytes-like nor a binary file object.
    """
    _check_args(channels, size, invert)
    data = _as_bytes(data)
    try:
        img = decode_image(data, name, draft_side=WORK_MAX_SIDE)
        return to_model_input(img, channels, size, invert=invert, name=name, digit_style=digit_style)
    except ImageDecodeError:
        raise
    except MemoryError as e:
        raise _error(name, "is too large to process in memory",
                     "Resize it to a smaller size before uploading", "too_many_pixels") from e
    except Exception as e:  # noqa: BLE001 - untrusted input: any decoder failure is the file's
        raise _error(name, f"could not be processed ({type(e).__name__}: {e})",
                     "Re-save it as PNG or JPEG and try again", "failed") from e


def prepare_uploads(files: Iterable[tuple[str, bytes]], channels: int, size: int,
                    invert: bool | None = None, digit_style: bool = False
                    ) -> tuple[list[PreparedImage], list[tuple[str, str]]]:
    """Prepare a batch of uploaded files; a bad file never stops the others.

    Args:
        files: ``(name, data)`` pairs, ``data`` as for :func:`prepare_upload`.
        channels, size, invert, digit_style: as for :func:`to_model_input`.

    Returns:
        ``(prepared, errors)``: the :class:`PreparedImage` of every good file, in input
        order, and ``(name, message)`` for every bad one, in input order, where ``message``
        is the user-facing text of its :class:`ImageDecodeError`. Stack the tensors with
        ``torch.stack([p.tensor for p in prepared])`` to get ``[N, C, size, size]``.

    Raises:
        ValueError: invalid ``channels`` / ``size`` / ``invert`` (checked before any file).
        Never for a bad file.
    """
    _check_args(channels, size, invert)
    prepared: list[PreparedImage] = []
    errors: list[tuple[str, str]] = []
    for item in files:
        try:
            name, data = item
        except (TypeError, ValueError):
            errors.append((str(item)[:80], "not a (name, data) pair"))
            continue
        name = str(name)
        try:
            prepared.append(prepare_upload(data, name, channels, size, invert=invert, digit_style=digit_style))
        except ImageDecodeError as e:
            errors.append((name, str(e)))
        except TypeError as e:
            errors.append((name, f'"{name}" has no file data ({e})'))
    return prepared, errors


# ------------------------------------------------------------------------- display


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """Images in the model's range -> pictures.

    Args:
        x: ``[N, C, H, W]`` float tensor, values meant to be in ``[-1, 1]``, C = 1 or 3
            (any device; gradients are ignored). Values outside are clamped; NaN maps to 0
            (mid grey), +inf / -inf to 1 / -1.

    Returns:
        ``numpy.uint8`` ``[N, H, W]`` (C == 1) or ``[N, H, W, 3]`` (C == 3), with
        ``p = round((v + 1) * 127.5)``.

    Raises:
        ValueError: ``x`` is not 4-dimensional or C is not 1 or 3.
    """
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, C, H, W] with C = 1 or 3, got shape {tuple(x.shape)}")
    x = torch.nan_to_num(x.detach().to("cpu", torch.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    u8 = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    arr = u8.permute(0, 2, 3, 1).numpy()
    return arr[..., 0] if arr.shape[3] == 1 else arr


def make_grid_image(x: torch.Tensor, nrow: int | None = None, padding: int = 2, scale: int = 1,
                    *, pad_value: float = 0.5) -> Image.Image:
    """Tile images into one picture (``torchvision.utils.make_grid``).

    Args:
        x: ``[N, C, H, W]`` float tensor in ``[-1, 1]`` (clamped; NaN shown as mid grey),
            N >= 1, C = 1 or 3.
        nrow: images per row; default ``ceil(sqrt(N))``.
        padding: pixels between and around tiles (before scaling).
        scale: integer nearest-neighbour upscaling factor (>= 1), for showing 8x8 or 28x28
            images at a visible size.
        pad_value: brightness of the padding in [0, 1]; mid grey by default so that tiles
            stay apart both for light-on-dark digits and for bright photos.

    Returns:
        ``PIL.Image`` in mode ``"L"`` (C == 1) or ``"RGB"`` (C == 3), of width
        ``(cols * (W + padding) + padding) * scale`` and height
        ``(rows * (H + padding) + padding) * scale`` pixels, where ``cols = min(nrow, N)``
        and ``rows = ceil(N / cols)``.

    Raises:
        ValueError: bad shape, N == 0, ``nrow`` < 1, ``padding`` < 0 or ``scale`` < 1.
    """
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"expected images [N >= 1, C = 1 or 3, H, W], got shape {tuple(x.shape)}")
    n = x.shape[0]
    nrow = math.ceil(math.sqrt(n)) if nrow is None else nrow
    if nrow < 1 or padding < 0 or scale < 1 or int(scale) != scale:
        raise ValueError(f"need nrow >= 1, padding >= 0 and an integer scale >= 1; "
                         f"got nrow={nrow}, padding={padding}, scale={scale}")
    x = torch.nan_to_num(x.detach().to("cpu", torch.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    grid = torchvision.utils.make_grid(x, nrow=nrow, padding=padding, normalize=True,
                                       value_range=(-1, 1), pad_value=pad_value)
    if n == 1 and padding > 0:  # make_grid returns a single image unpadded; keep sizes uniform
        grid = torch.nn.functional.pad(grid, (padding,) * 4, value=pad_value)
    arr = (grid.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(np.ascontiguousarray(arr[..., 0] if x.shape[1] == 1 else arr))
    if scale > 1:
        img = img.resize((img.width * int(scale), img.height * int(scale)),
                         Image.Resampling.NEAREST)
    return img


def png_bytes(img: Image.Image) -> bytes:
    """Encode a PIL image as PNG.

    Args:
        img: any PIL image in a mode PNG can store (1, L, LA, P, RGB, RGBA, I;16, ...).

    Returns:
        The PNG file's bytes.

    Raises:
        OSError: the mode cannot be written as PNG (e.g. CMYK).
    """
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_grid_png(x: torch.Tensor, path: str | os.PathLike[str], nrow: int | None = None,
                  scale: int = 1, *, padding: int = 2) -> None:
    """Write :func:`make_grid_image` of ``x`` to ``path`` as PNG, atomically.

    Written with :func:`jem_core.utils.atomic_write`: ``path`` is either the old file or the
    complete new one, never a partial write. Missing parent directories are created.

    Args:
        x, nrow, scale, padding: as for :func:`make_grid_image`.
        path: the output file path.

    Raises:
        ValueError: as for :func:`make_grid_image`.
        OSError: the file cannot be written.
    """
    img = make_grid_image(x, nrow=nrow, padding=padding, scale=scale)
    atomic_write(path, lambda f: img.save(f, format="PNG"))
