"""Pictures of what the captioner saw: regions, attribute words, the caption, and per-word region attention.

``render_explanation`` draws one PNG-ready BGR canvas:

* left, the photo with its region boxes labelled "attribute object (score)" (the most confident regions);
* right, the top attribute words with their MIL probabilities as bars;
* below, the caption, then a strip of thumbnails, one per generated word, where each region is lit by the
  decoder's attention to it at that step (the learned region groupings).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import cv2
import numpy as np

from glied.errors import InputError
from glied.fileio import write_bytes_atomic
from glied.records import AttributeWords, RegionFeatures

FONT = cv2.FONT_HERSHEY_SIMPLEX
PALETTE = [(66, 135, 245), (60, 180, 75), (48, 130, 245), (200, 80, 200), (0, 200, 200), (230, 190, 30),
           (75, 25, 230), (180, 30, 145), (40, 110, 170), (128, 128, 0)]


@dataclass
class Explanation:
    """Everything one picture shows. ``attention`` is (T, R): for word t, weights over the R regions."""

    image: np.ndarray  # BGR uint8 (H, W, 3), original size
    regions: RegionFeatures
    caption: list[str]
    words: Optional[AttributeWords] = None
    word_vocab: Optional[Sequence[str]] = None
    attention: Optional[np.ndarray] = None
    object_names: Optional[Sequence[str]] = None
    attribute_names: Optional[Sequence[str]] = None


def _name(names: Optional[Sequence[str]], i: int, prefix: str) -> str:
    return names[i] if names is not None and 0 <= i < len(names) else f"{prefix}{i}"


def _text(img, s, org, scale=0.5, colour=(20, 20, 20), thick=1):
    cv2.putText(img, s, org, FONT, scale, colour, thick, cv2.LINE_AA)


def _wrap(words: list[str], width_px: int, scale: float) -> list[str]:
    lines, cur = [], ""
    for w in words:
        cand = (cur + " " + w).strip()
        if cv2.getTextSize(cand, FONT, scale, 1)[0][0] > width_px and cur:
            lines.append(cur)
            cur = w
        else:
            cur = cand
    return lines + ([cur] if cur else [])


def _scaled(image: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    h, w = image.shape[:2]
    s = side / max(h, w)
    return cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA), s


def _draw_regions(ex: Explanation, side: int, max_regions: int) -> np.ndarray:
    img, s = _scaled(ex.image, side)
    r = ex.regions
    order = np.argsort(-r.obj_scores)[:max_regions] if len(r) else []
    for k, i in enumerate(order):
        x1, y1, x2, y2 = (r.boxes[i] * s).round().astype(int).tolist()
        c = PALETTE[k % len(PALETTE)]
        cv2.rectangle(img, (x1, y1), (x2, y2), c, 2)
        label = (f"{_name(ex.attribute_names, int(r.attr_ids[i]), 'a')} "
                 f"{_name(ex.object_names, int(r.obj_ids[i]), 'c')} {r.obj_scores[i]:.2f}")
        (tw, th), _ = cv2.getTextSize(label, FONT, 0.4, 1)
        ty = max(y1, th + 3)
        cv2.rectangle(img, (x1, ty - th - 3), (x1 + tw + 2, ty), c, -1)
        _text(img, label, (x1 + 1, ty - 2), 0.4, (255, 255, 255))
    return img


def _draw_words(ex: Explanation, height: int, width: int, max_words: int) -> np.ndarray:
    panel = np.full((height, width, 3), 250, np.uint8)
    _text(panel, "attribute words p(w|I)", (8, 20), 0.5, (0, 0, 0), 1)
    if ex.words is None or len(ex.words) == 0:
        _text(panel, "(none)", (8, 44), 0.45)
        return panel
    n = min(max_words, len(ex.words))
    row = max(12, min(22, (height - 30) // max(n, 1)))
    bar_w = width - 150
    for k in range(n):
        y = 30 + k * row
        wid = int(ex.words.word_ids[k])
        word = _name(ex.word_vocab, wid, "w")
        p = float(ex.words.probs[k])
        _text(panel, word[:12], (8, y + row - 6), 0.4)
        cv2.rectangle(panel, (100, y + 3), (100 + int(bar_w * p), y + row - 3), (200, 120, 40), -1)
        _text(panel, f"{p:.2f}", (104 + int(bar_w * p), y + row - 6), 0.35, (90, 90, 90))
    return panel


def _attention_strip(ex: Explanation, thumb: int, per_row: int) -> Optional[np.ndarray]:
    if ex.attention is None or len(ex.caption) == 0 or len(ex.regions) == 0:
        return None
    att = np.asarray(ex.attention, np.float32)[: len(ex.caption), : len(ex.regions)]
    small, s = _scaled(ex.image, thumb)
    h, w = small.shape[:2]
    tiles = []
    for t, word in enumerate(ex.caption[: att.shape[0]]):
        heat = np.zeros((h, w), np.float32)
        for i, a in enumerate(att[t]):
            x1, y1, x2, y2 = (ex.regions.boxes[i] * s).round().astype(int).tolist()
            heat[max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)] += a
        heat /= max(float(heat.max()), 1e-6)
        cmap = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_INFERNO).astype(np.float32)
        lit = small.astype(np.float32) * (0.3 + 0.7 * heat[..., None])  # attended regions stay bright
        tile = np.clip(0.7 * lit + 0.3 * cmap * heat[..., None], 0, 255).astype(np.uint8)
        tile = cv2.copyMakeBorder(tile, 0, 20, 2, 2, cv2.BORDER_CONSTANT, value=(255, 255, 255))
        _text(tile, word[:10], (4, h + 14), 0.4)
        tiles.append(tile)
    th, tw = tiles[0].shape[:2]
    rows = []
    for k in range(0, len(tiles), per_row):
        row = tiles[k:k + per_row]
        row += [np.full((th, tw, 3), 255, np.uint8)] * (per_row - len(row))
        rows.append(np.hstack(row))
    return np.vstack(rows)


def render_explanation(ex: Explanation, side: int = 512, max_regions: int = 12, max_words: int = 15,
                       thumb: int = 96) -> np.ndarray:
    """Compose the whole picture (BGR uint8). Write it with ``cv2.imwrite(path, canvas)``."""
    left = _draw_regions(ex, side, max_regions)
    words = _draw_words(ex, left.shape[0], 260, max_words)
    top = np.hstack([left, words])
    width = top.shape[1]
    lines = _wrap(ex.caption or ["(empty caption)"], width - 20, 0.7)
    cap = np.full((18 + 28 * len(lines), width, 3), 255, np.uint8)
    for k, line in enumerate(lines):
        _text(cap, line, (10, 30 + 28 * k), 0.7, (0, 0, 0), 2)
    parts = [top, cap]
    strip = _attention_strip(ex, thumb, per_row=max(1, width // (thumb + 4)))
    if strip is not None:
        if strip.shape[1] < width:
            strip = cv2.copyMakeBorder(strip, 0, 0, 0, width - strip.shape[1], cv2.BORDER_CONSTANT,
                                       value=(255, 255, 255))
        head = np.full((24, width, 3), 255, np.uint8)
        _text(head, "attention over regions for each generated word", (10, 17), 0.5, (60, 60, 60))
        parts += [head, strip[:, :width]]
    return np.vstack(parts)


def save_explanation(ex: Explanation, path: str) -> None:
    """Render and write a PNG atomically; InputError naming the path if it cannot be written."""
    canvas = render_explanation(ex)
    ok, png = cv2.imencode(".png", canvas)
    if not ok:
        raise InputError(f"{path}: could not encode the picture as PNG")
    write_bytes_atomic(path, png.tobytes())
