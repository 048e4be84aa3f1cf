"""The explanation picture: real PNG of the expected size with visible content in every panel."""
import cv2
import numpy as np

from glied.pipeline.show import Explanation, save_explanation
from glied.records import AttributeWords, RegionFeatures


def _example(with_attention=True):
    rng = np.random.default_rng(0)
    img = np.full((200, 300, 3), 120, np.uint8)
    cv2.circle(img, (80, 100), 40, (40, 40, 215), -1)
    cv2.rectangle(img, (180, 60), (260, 140), (215, 90, 35), -1)
    boxes = np.array([[40, 60, 120, 140], [180, 60, 260, 140]], np.float32)
    regions = RegionFeatures(boxes, rng.normal(size=(2, 8)).astype(np.float32), np.array([0, 1]),
                             np.array([0.9, 0.8], np.float32), np.array([0, 2]), np.array([0.7, 0.6], np.float32),
                             300, 200)
    words = AttributeWords(np.array([2, 0, 1]), np.array([0.95, 0.9, 0.2], np.float32))
    caption = "a red circle to the left of a blue square".split()
    att = np.tile(np.array([[0.9, 0.1]], np.float32), (len(caption), 1))
    return Explanation(img, regions, caption, words, ["red", "blue", "circle"],
                       att if with_attention else None, ["circle", "square"], ["red", "green", "blue"])


def test_picture_has_expected_size_and_is_not_blank(tmp_path):
    path = tmp_path / "show.png"
    save_explanation(_example(), str(path))
    img = cv2.imread(str(path))
    assert img is not None
    h, w = img.shape[:2]
    assert w == 512 + 260 and h > 512 * 2 / 3 + 100  # photo panel (longer side 512) + words + caption + strip
    assert img.std() > 20
    photo = img[: 340, :512]
    assert photo.std() > 20 and len(np.unique(photo.reshape(-1, 3), axis=0)) > 50
    words_panel = img[:300, 512:]
    assert (words_panel < 200).any()  # bars and text drawn
    strip = img[-100:, :]
    assert strip.std() > 10


def test_picture_without_attention_or_words(tmp_path):
    ex = _example(with_attention=False)
    ex.words = None
    path = tmp_path / "plain.png"
    save_explanation(ex, str(path))
    assert cv2.imread(str(path)).std() > 20
