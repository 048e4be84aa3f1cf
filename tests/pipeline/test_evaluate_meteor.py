"""METEOR runs in one process per Python process: reusing it, or replacing one that died, never changes a score."""
from glied.pipeline import evaluate as ev

REFS = {"1": ["a red circle and a blue square", "there are two shapes a red circle and a blue square"],
        "2": ["a picture of a green star", "one small green star"],
        "3": ["two yellow triangles", "we see two yellow triangles on a plain background"]}
PREDS_A = {"1": "a red circle and a blue star", "2": "a green star", "3": "a yellow triangle"}
PREDS_B = {"1": "a blue square", "2": "a picture of a small green star", "3": "two yellow triangles"}


def _fresh(preds):
    ev._METEOR = None  # the next call starts its own process
    return ev.coco_metrics(REFS, preds)["METEOR"]


def test_reused_meteor_process_scores_as_fresh_ones():
    fresh_a, fresh_b = _fresh(PREDS_A), _fresh(PREDS_B)
    assert fresh_a != fresh_b
    first = ev._METEOR
    assert ev.coco_metrics(REFS, PREDS_A)["METEOR"] == fresh_a
    assert ev.coco_metrics(REFS, PREDS_B)["METEOR"] == fresh_b
    assert ev._METEOR is first  # the same process served both


def test_a_dead_meteor_process_is_replaced():
    score = ev.coco_metrics(REFS, PREDS_A)["METEOR"]
    dead = ev._METEOR
    dead.meteor_p.kill()
    dead.meteor_p.wait()
    assert ev.coco_metrics(REFS, PREDS_A)["METEOR"] == score
    assert ev._METEOR is not dead
