"""glied.datasets.images: every awkward file type is decoded correctly or refused with one clear reason."""
from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from glied.datasets.images import ImageLoadError, decode_image, load_image


def _photo(h=60, w=90) -> np.ndarray:
    """RGB uint8 test pattern: distinct colours in each quadrant, so orientation errors show."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (255, 0, 0)
    a[: h // 2, w // 2:] = (0, 255, 0)
    a[h // 2:, : w // 2] = (0, 0, 255)
    a[h // 2:, w // 2:] = (255, 255, 0)
    return a


def _jpeg_bytes(rgb: np.ndarray, **kw) -> bytes:
    b = io.BytesIO()
    Image.fromarray(rgb).save(b, "JPEG", quality=95, **kw)
    return b.getvalue()


def _reason(path) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as ei:
        load_image(path)
    assert "\n" not in str(ei.value) and str(path) in str(ei.value)
    return ei.value


def test_plain_jpeg_is_bgr(tmp_path):
    p = tmp_path / "a.jpg"
    p.write_bytes(_jpeg_bytes(_photo()))
    im = load_image(p)
    assert im.dtype == np.uint8 and im.shape == (60, 90, 3)
    assert tuple(im[5, 5]) == pytest.approx((0, 0, 254), abs=3)      # red in RGB = (0, 0, 255) in BGR


def test_truncated_jpeg_is_refused_not_greyed(tmp_path):
    data = _jpeg_bytes(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8))
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    assert cv2.imread(str(p)) is not None            # OpenCV alone would return a half-grey image
    e = _reason(p)
    assert e.kind == "truncated"


def test_zero_byte_text_and_garbage(tmp_path):
    (tmp_path / "z.jpg").write_bytes(b"")
    assert _reason(tmp_path / "z.jpg").kind == "empty"
    (tmp_path / "t.jpg").write_text("this is not a photo\n")
    e = _reason(tmp_path / "t.jpg")
    assert e.kind == "not_image" and "text" in e.reason
    (tmp_path / "g.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)
    assert _reason(tmp_path / "g.png").kind in ("corrupt", "truncated")
    assert _reason(tmp_path / "missing.jpg").kind == "missing"


def test_greyscale_rgba_palette_cmyk(tmp_path):
    g = np.full((20, 30), 77, np.uint8)
    Image.fromarray(g).save(tmp_path / "g.png")
    assert (load_image(tmp_path / "g.png") == 77).all()
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, 15:, 3] = 255                               # left half fully transparent -> white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    im = load_image(tmp_path / "a.png")
    assert tuple(im[0, 0]) == (255, 255, 255) and tuple(im[0, 20]) == (0, 0, 255)
    p = Image.fromarray(rgba[..., :3]).convert("P")
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    assert load_image(tmp_path / "p.png").shape == (20, 30, 3)
    Image.fromarray(_photo()).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    c = load_image(tmp_path / "c.jpg")
    assert c.shape == (60, 90, 3)
    assert tuple(c[5, 5]) == pytest.approx((0, 0, 255), abs=8)        # still red


def test_16bit_png_scaled_not_clipped(tmp_path):
    a = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), a)
    im = load_image(tmp_path / "g16.png")
    assert im.shape == (30, 40, 3)
    ref = cv2.imread(str(tmp_path / "g16.png"), cv2.IMREAD_COLOR)      # OpenCV scales correctly
    assert np.abs(im.astype(int) - ref.astype(int)).max() <= 1
    assert im.mean() == pytest.approx(127.5, abs=2)                    # not a white image
    rgb16 = (np.stack([a, a // 2, a // 4], -1)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "c16.png"), rgb16)
    ref = cv2.imread(str(tmp_path / "c16.png"), cv2.IMREAD_COLOR)
    assert np.abs(load_image(tmp_path / "c16.png").astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_honoured(tmp_path, orientation):
    raw = _photo(40, 80)
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / f"o{orientation}.jpg"
    p.write_bytes(_jpeg_bytes(raw, exif=exif.tobytes()))
    li = decode_image(p)
    ref = cv2.imread(str(p))                              # OpenCV applies EXIF orientation (docs/architecture.md)
    assert li.image.shape == ref.shape
    assert (li.orig_w, li.orig_h) == (ref.shape[1], ref.shape[0])
    assert np.abs(li.image.astype(int) - ref.astype(int)).mean() < 3


def test_tiny_refused_and_huge_downscaled(tmp_path):
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tmp_path / "one.png")
    e = _reason(tmp_path / "one.png")
    assert e.kind == "too_small" and "1x1" in e.reason
    big = cv2.resize(_photo(30, 40), (4000, 3000), interpolation=cv2.INTER_NEAREST)
    (tmp_path / "big.jpg").write_bytes(_jpeg_bytes(big))
    li = decode_image(tmp_path / "big.jpg", max_side=1000)
    assert li.image.shape == (750, 1000, 3)
    assert (li.orig_w, li.orig_h) == (4000, 3000) and li.scale == pytest.approx(0.25)
    assert tuple(li.image[100, 100]) == pytest.approx((0, 0, 255), abs=8)
    cv2.imwrite(str(tmp_path / "big.png"), big[:, :, ::-1])
    lp = decode_image(tmp_path / "big.png", max_side=800)
    assert lp.image.shape == (600, 800, 3) and lp.orig_w == 4000


def test_bmp_webp_tiff(tmp_path):
    for ext in ("bmp", "webp", "tif"):
        Image.fromarray(_photo()).save(tmp_path / f"x.{ext}", **({"lossless": True} if ext == "webp" else {}))
        im = load_image(tmp_path / f"x.{ext}")
        assert im.shape == (60, 90, 3) and tuple(im[5, 5]) == (0, 0, 255)
