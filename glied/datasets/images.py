"""Robust photo decoding for extraction: any common file in, BGR uint8 (H, W, 3) out, or one clear reason.

Decoder choice (docs/architecture.md, "Decoding photos", has the measured facts behind it):

* Pillow decodes, because it *raises* on a truncated JPEG/PNG, while ``cv2.imread`` silently fills the
  missing part with grey and only prints a warning: an OpenCV-only loader caches corrupt images.
* EXIF orientation is applied with ``ImageOps.exif_transpose`` (all 8 cases), so the array and the size
  recorded in the cache are those of the photo as a person sees it.
* Greyscale, palette, CMYK -> RGB through Pillow; alpha (RGBA, LA, palette with transparency) is composited
  over white; 16-bit greyscale (``I;16``/``I``) is scaled to 8 bits by hand (value >> 8), because Pillow's
  ``convert("RGB")`` clips it to 255 (a white image).
* Huge JPEGs are decoded at a reduced DCT scale (``Image.draft``) before anything else, then resized with
  area interpolation so the long side is at most ``max_side``; the original (oriented) size is kept so boxes
  can be mapped back to original pixels.
* Files are sniffed by their first bytes: an empty file, a text file named ``.jpg`` or an unknown format get
  their own reason instead of a decoder's stack trace.

Every failure is an :class:`ImageLoadError` (an :class:`~glied.errors.InputError`) whose ``reason`` is one
short line and whose ``kind`` is a machine-readable tag (``empty``, ``not_image``, ``truncated``, ...).
"""
from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass

import numpy as np

from glied.errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
DEFAULT_MAX_SIDE = 2000         # photos are decoded at most this long for the detector (which works at <= 1000)
MIN_SIDE = 8                     # smaller images are skipped: a detector cannot see anything in them
MAX_PIXELS = 400_000_000         # refuse to decode more than this (after JPEG draft reduction)

_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
)


def find_images(root: str | os.PathLike) -> list[str]:
    """Image files (suffix in :data:`IMAGE_EXTENSIONS`, any case; hidden files skipped; a FIFO, socket or device
    named x.jpg is never opened) under ``root``, recursively, sorted by folder then name."""
    out = []
    for d, dirs, files in os.walk(os.fspath(root)):
        dirs.sort()
        paths = (os.path.join(d, f) for f in sorted(files)
                 if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
        out += [p for p in paths if os.path.isfile(p)]
    return out


def check_max_side(max_side: int | None) -> int | None:
    """The long-side cap as given by a user: a positive number of pixels, or None/0 for no cap (-> None).
    Anything else is a ConfigError with one line. The cap changes the features, so feature caches and
    checkpoints record it (see :mod:`glied.datasets.identity`)."""
    from glied.errors import ConfigError

    if max_side is None or (isinstance(max_side, int) and not isinstance(max_side, bool) and max_side == 0):
        return None
    if not isinstance(max_side, int) or isinstance(max_side, bool) or max_side < MIN_SIDE:
        raise ConfigError(f"--max-side {max_side!r}: expected a whole number of pixels >= {MIN_SIDE} "
                          f"(the long side photos are downscaled to), or 0 for no cap")
    return max_side


class ImageLoadError(InputError):
    """An image that cannot be used. ``kind`` is a short tag, ``reason`` one human line, ``path`` the file."""

    def __init__(self, path: str, kind: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.kind, self.reason = str(path), kind, reason


@dataclass
class LoadedImage:
    """A decoded photo. ``image`` is BGR uint8 (h, w, 3), possibly downscaled; ``orig_w``/``orig_h`` is the
    size of the EXIF-oriented original; ``scale_x`` = w / orig_w, ``scale_y`` = h / orig_h (1.0 when not
    downscaled; they differ slightly because sizes are rounded to whole pixels)."""

    image: np.ndarray
    orig_w: int
    orig_h: int

    @property
    def scale_x(self) -> float:
        return self.image.shape[1] / self.orig_w

    @property
    def scale_y(self) -> float:
        return self.image.shape[0] / self.orig_h

    @property
    def scale(self) -> float:
        return self.scale_x


def sniff_format(head: bytes) -> str | None:
    """Name of the image format from the first bytes of a file, or None if it is not one we know."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _looks_like_text(head: bytes) -> bool:
    if not head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c >= 32 or c in (9, 10, 13) for c in head)


def _to_rgb_uint8(im) -> np.ndarray:
    """Any Pillow mode -> RGB uint8 (h, w, 3) array, handling 16-bit, float, alpha and CMYK correctly."""
    from PIL import Image

    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im)
        if mode == "I" and a.size and a.max() > 65535:          # genuinely 32-bit data: rescale its range
            a = a.astype(np.float64) * (255.0 / a.max())
            g = a.astype(np.uint8)
        else:
            g = (a.astype(np.uint32) >> 8).astype(np.uint8)      # 16 -> 8 bit: 65535 -> 255, 32768 -> 128
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        hi = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0
        g = np.clip(np.nan_to_num(a) * (255.0 / hi), 0, 255).round().astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(bg, rgba).convert("RGB"))
    if mode != "RGB":
        im = im.convert("RGB")          # L, 1, CMYK, YCbCr, LAB, HSV
    return np.asarray(im)


_WARNING_FILTER_SET = False


def _quiet_bomb_warning() -> None:
    """Our own MAX_PIXELS check replaces Pillow's DecompressionBombWarning (which would print for every large
    photo). Installed once, process-wide, because warnings.catch_warnings is not thread-safe."""
    global _WARNING_FILTER_SET
    if not _WARNING_FILTER_SET:
        from PIL import Image

        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        _WARNING_FILTER_SET = True


def decode_image(path: str | os.PathLike, max_side: int | None = None,
                 min_side: int = MIN_SIDE) -> LoadedImage:
    """Decode ``path`` into a :class:`LoadedImage` (BGR uint8, EXIF-oriented, long side <= ``max_side``).

    Raises :class:`ImageLoadError` with one clear reason for: missing/unreadable file, zero bytes, not an
    image (text or unknown bytes), truncated or corrupt data, images smaller than ``min_side`` on a side,
    images over :data:`MAX_PIXELS`.
    """
    import cv2
    from PIL import Image, ImageOps, UnidentifiedImageError

    _quiet_bomb_warning()
    path = os.fspath(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):            # a FIFO would block open() forever
            raise ImageLoadError(path, "not_file", "not a regular file (a folder, FIFO or device)")
        size = st.st_size
        with open(path, "rb") as f:
            head = f.read(32)
    except FileNotFoundError:
        raise ImageLoadError(path, "missing", "file not found") from None
    except OSError as e:
        raise ImageLoadError(path, "unreadable", f"cannot read file ({e.strerror or e})") from None
    if size == 0:
        raise ImageLoadError(path, "empty", "empty file (0 bytes)")
    fmt = sniff_format(head)
    if fmt is None:
        what = "a text file" if _looks_like_text(head) else f"unknown bytes {head[:8].hex(' ')}"
        raise ImageLoadError(path, "not_image", f"not an image: {what} ({size} bytes)")
    try:
        with Image.open(path) as im:
            w0, h0 = im.size
            orientation = im.getexif().get(0x0112, 1)
            if w0 * h0 > 4 * MAX_PIXELS and fmt != "JPEG":
                raise ImageLoadError(path, "too_large", f"image too large ({w0}x{h0} pixels)")
            if max_side and fmt == "JPEG" and max(w0, h0) > max_side:
                # DCT-domain downscale by 1/2, 1/4 or 1/8 while staying >= max_side on the long side
                k = max(w0, h0) / max_side
                im.draft(im.mode if im.mode in ("RGB", "L", "CMYK") else "RGB",
                         (int(w0 / k), int(h0 / k)))
            if im.size[0] * im.size[1] > MAX_PIXELS:
                raise ImageLoadError(path, "too_large", f"image too large ({w0}x{h0} pixels)")
            im.load()
            im = ImageOps.exif_transpose(im)
            rgb = _to_rgb_uint8(im)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError:
        raise ImageLoadError(path, "too_large", "image too large (decompression bomb limit)") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "corrupt", f"corrupt {fmt} file (cannot identify image data)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        kind = "truncated" if "truncated" in msg.lower() or isinstance(e, EOFError) else "corrupt"
        raise ImageLoadError(path, kind, f"{kind} {fmt} file ({msg})") from None
    except Exception as e:  # noqa: BLE001 - a decoder plugin choking on odd bytes (struct.error, IndexError...)
        raise ImageLoadError(path, "corrupt", f"corrupt {fmt} file ({type(e).__name__}: {e})") from None
    if orientation in (5, 6, 7, 8):
        w0, h0 = h0, w0
    h, w = rgb.shape[:2]
    if min(w0, h0) < min_side:
        raise ImageLoadError(path, "too_small", f"image too small ({w0}x{h0}; need >= {min_side} px a side)")
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    if max_side and max(w, h) > max_side:
        s = max_side / max(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        bgr = cv2.resize(bgr, (nw, nh), interpolation=cv2.INTER_AREA)
    return LoadedImage(image=bgr, orig_w=int(w0), orig_h=int(h0))


def load_image(path: str | os.PathLike, max_side: int | None = None, min_side: int = MIN_SIDE) -> np.ndarray:
    """BGR uint8 (H, W, 3) of the EXIF-oriented photo at ``path``, long side <= ``max_side`` if given.

    See :func:`decode_image` for the rules; raises :class:`ImageLoadError` with one clear reason.
    """
    return decode_image(path, max_side=max_side, min_side=min_side).image
