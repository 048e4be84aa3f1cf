"""The MIL detector learns a tiny separable world (coloured squares -> words), round-trips through its checkpoint,
resumes, and serves top-k words and word maps through load_attribute_extractor."""
import time

import cv2
import numpy as np
import pytest
import torch

from glied.errors import ConfigError, WeightsError
from glied.extractors.mil import load_attribute_extractor
from glied.extractors.mil.checkpoint import load_checkpoint
from glied.extractors.mil.config import MilConfig, MilTrainConfig
from glied.extractors.mil.evaluate import word_metrics
from glied.extractors.mil.train import TrainSet, train_mil
from glied.extractors.mil.vocab import build_labels, build_vocab

COLOURS = {"red": (0, 0, 255), "green": (0, 200, 0), "blue": (255, 0, 0)}  # BGR


def squares_world(root, n, seed):
    """n 48x48 BGR images, each with 1-2 squares of distinct colours; captions name the colours."""
    rng = np.random.default_rng(seed)
    paths, captions, images = [], [], []
    names = list(COLOURS)
    for i in range(n):
        img = np.zeros((48, 48, 3), np.uint8)
        chosen = rng.choice(3, size=int(rng.integers(1, 3)), replace=False)
        for c in chosen:
            x, y = rng.integers(0, 36, size=2)
            img[y:y + 12, x:x + 12] = COLOURS[names[c]]
        words = [names[c] for c in chosen]
        caps = [["a", words[0], "square"] + (["and", "a", words[1], "square"] if len(words) > 1 else [])]
        p = root / f"{i:04d}.png"
        cv2.imwrite(str(p), img)
        paths.append(p)
        captions.append(caps)
        images.append(img)
    return paths, captions, images


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(one_thread, tmp_path_factory):
    root = tmp_path_factory.mktemp("squares")
    paths, caps, _ = squares_world(root, 160, seed=0)
    vocab = build_vocab(caps, 100)
    ls = build_labels(caps, vocab)
    cfg = MilConfig.preset("small", len(vocab), input_size=48, small_widths=(8, 16, 16))
    tcfg = MilTrainConfig(epochs=12, batch_size=16, lr=1e-2, seed=0)
    t0 = time.perf_counter()
    summary = train_mil(TrainSet(paths, ls.labels, vocab), root / "run", cfg, tcfg, log=lambda s: None)
    return root, vocab, summary, time.perf_counter() - t0


def test_learns_tiny_separable_case_to_high_ap(trained, tmp_path):
    root, vocab, summary, seconds = trained
    losses = [h["loss"] for h in summary["history"]]
    assert losses[-1] < 0.75 * losses[0]
    _, caps, images = squares_world(tmp_path, 60, seed=1)  # unseen images
    ext = load_attribute_extractor(root / "run", top_k=3)
    probs = ext.probs(images)
    labels = build_labels(caps, ext.vocab).labels
    m = word_metrics(probs, labels, ext.vocab)
    colour_ap = [m["ap"][c] for c in COLOURS]
    assert min(colour_ap) > 0.95, m["ap"]
    assert m["mAP"] > 0.9


def test_extractor_outputs_and_identity(trained, tmp_path):
    root, vocab, _, _ = trained
    _, _, images = squares_world(tmp_path, 4, seed=2)
    ext = load_attribute_extractor(root / "run", top_k=4)
    assert ext.vocab == vocab
    ident = ext.identity()
    assert ident["name"] == "mil-fang2015" and ident["top_k"] == 4 and ident["vocab"] == vocab
    assert MilConfig.from_dict(ident["config"]).vocab_size == len(vocab)
    assert ident["weights_fingerprint"] == load_attribute_extractor(root / "run" / "model.pt").identity()[
        "weights_fingerprint"]
    images.append(np.zeros((30, 70), np.uint8))  # grey, other size
    out = ext.extract(images, word_map=True)
    assert len(out) == 5
    full = ext.probs(images)
    for rec, p in zip(out, full):
        assert rec.word_ids.dtype == np.int64 and rec.probs.dtype == np.float32 and len(rec) == 4
        assert np.all(np.diff(rec.probs) <= 0)
        np.testing.assert_allclose(rec.probs, np.sort(p)[::-1][:4], rtol=1e-6)
        assert rec.word_map.shape[0] == len(vocab)
    # the word map is where a word fires: noisy-OR over its cells gives the image probability back
    maps = ext.word_maps(images[:1])
    p_from_map = 1 - np.prod(1 - maps[0].astype(np.float64), axis=(1, 2))
    np.testing.assert_allclose(p_from_map, full[0], rtol=1e-4, atol=1e-6)
    assert load_attribute_extractor(root / "run", top_k=500).top_k == len(vocab)  # capped
    assert ext.extract([]) == []


def test_checkpoint_is_plain_and_round_trips(trained):
    root, vocab, _, _ = trained
    ckpt = torch.load(root / "run" / "model.pt", weights_only=True)
    assert ckpt["format"] == "glied-mil" and ckpt["vocab"] == vocab and "optimizer" not in ckpt
    assert "optimizer" in torch.load(root / "run" / "last.pt", weights_only=True)
    ext = load_attribute_extractor(root / "run")
    for k, v in ext.model.state_dict().items():
        torch.testing.assert_close(v, ckpt["state_dict"][k])


def test_resume_continues_and_checks_settings(trained, tmp_path):
    root, vocab, _, _ = trained
    paths, caps, _ = squares_world(tmp_path, 16, seed=3)
    ls = build_labels(caps, vocab)
    cfg = MilConfig.preset("small", len(vocab), input_size=48, small_widths=(8, 16, 16))
    ts = TrainSet(paths, ls.labels, vocab)
    run = tmp_path / "run"
    train_mil(ts, run, cfg, MilTrainConfig(epochs=1, batch_size=8), log=lambda s: None)
    with pytest.raises(ConfigError, match="--resume"):
        train_mil(ts, run, cfg, MilTrainConfig(epochs=2, batch_size=8), log=lambda s: None)
    with pytest.raises(ConfigError, match="batch_size"):
        train_mil(ts, run, cfg, MilTrainConfig(epochs=2, batch_size=4), resume=True, log=lambda s: None)
    s = train_mil(ts, run, cfg, MilTrainConfig(epochs=2, batch_size=8), resume=True, log=lambda s: None)
    assert [h["epoch"] for h in s["history"]] == [1, 2]
    assert load_checkpoint(run)["epoch"] == 2


def test_bad_checkpoints_raise_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_attribute_extractor(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no model.pt"):
        load_attribute_extractor(tmp_path / "empty")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="bad.pt"):
        load_attribute_extractor(bad)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(WeightsError, match="not a glied MIL checkpoint"):
        load_attribute_extractor(other)
