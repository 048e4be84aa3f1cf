"""Our vectorised CIDEr-D against pycocoevalcap's Cider (which is CIDEr-D), and the SCST reward helpers."""
import random

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from glied.models.cider import CiderD, cider_d
from glied.models.scst import CiderReward, self_critical_advantage


def corpus(n_img, seed, vocab=60):
    rnd = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)]

    def sent(lo=0):
        pool = words[: rnd.choice([8, vocab])]  # small pools give repeated n-grams (clipping matters)
        return " ".join(rnd.choice(pool) for _ in range(rnd.randint(lo, 15)))

    gts = {f"img{i}": [sent(1) for _ in range(rnd.choice([1, 3, 5, 5]))] for i in range(n_img)}
    res = {k: [sent()] for k in gts}
    return gts, res


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pycocoevalcap_to_1e6(seed):
    gts, res = corpus(300, seed)
    keys = list(gts)
    res[keys[0]] = [""]  # empty candidate
    res[keys[1]] = ["w1"]  # one word: zero bigrams
    res[keys[2]] = ["never seen words never seen"]  # out-of-reference words, repeated
    res[keys[3]] = [gts[keys[3]][0]]  # exact copy of a reference
    ref_mean, ref_scores = Cider().compute_score(gts, res)
    mean, scores = cider_d(gts, res)
    assert np.abs(scores - ref_scores).max() < 1e-6
    assert abs(mean - ref_mean) < 1e-6


def test_indexed_scoring_equals_from_scratch_and_is_reusable():
    gts, res = corpus(200, 5)
    keys = list(gts)
    _, full = cider_d(gts, res)
    index = CiderD([gts[k] for k in keys])
    pick = np.array([7, 3, 3, 150, 0])
    got = index.score([res[keys[i]][0] for i in pick], pick)
    np.testing.assert_allclose(got, full[pick], rtol=0, atol=1e-12)
    again = index.score([res[keys[i]][0] for i in pick], pick)  # unseen words must not leak into the index
    np.testing.assert_array_equal(got, again)
    assert len(index.score([], np.zeros(0, int))) == 0


def test_reward_and_advantages():
    import torch

    itow = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "red", "circle"]
    reward = CiderReward([[["a", "red", "circle"]] * 2, [["a", "circle"]]])
    seqs = torch.tensor([[4, 5, 6, 2], [4, 6, 2, 0], [5, 2, 0, 0]])
    r = reward(seqs, np.array([0, 1, 0]), itow)
    assert r[0] > r[2] and r[1] > 0
    adv = self_critical_advantage(np.array([1.0, 3.0, 2.0, 2.0]), 2, "mean")
    np.testing.assert_allclose(adv, [-2, 2, 0, 0])
    adv = self_critical_advantage(np.array([1.0, 3.0, 2.0, 2.0]), 2, "greedy", np.array([2.0, 1.0]))
    np.testing.assert_allclose(adv, [-1, 1, 1, 1])
