from glied.pipeline.naming import object_named


def test_colour_must_bind_to_shape():
    t = "a small red circle to the left of two blue crosses".split()
    assert object_named(t, "circle", "red")
    assert object_named(t, "cross", "blue")
    assert not object_named(t, "circle", "blue")
    assert not object_named("a red square and a blue circle".split(), "square", "blue")
    assert object_named("a star that is green".split(), "star", "green")


def test_mentions_are_counted_so_doubles_and_misses_fail():
    from glied.pipeline.naming import mentions, score_caption

    assert mentions("two small red circles and a blue star".split()) == {("circle", "red"): 2, ("star", "blue"): 1}
    objs = [("circle", "red"), ("star", "blue")]
    assert score_caption("a red circle to the left of a blue star".split(), objs)["correct"]
    doubled = score_caption("a red circle and a red circle and a blue star".split(), objs)
    assert not doubled["correct"] and doubled["doubled"] == 1 and doubled["missed"] == 0
    missed = score_caption("a red circle".split(), objs)
    assert not missed["correct"] and missed["missed"] == 1 and missed["named"] == 1
    wrong = score_caption("a red hexagon and a blue star".split(), objs)
    assert wrong["invented"] == 1 and wrong["missed"] == 1
    # two identical objects need a count of two, not one mention
    assert not score_caption("a red circle".split(), [("circle", "red")] * 2)["correct"]
    assert score_caption("two red circles".split(), [("circle", "red")] * 2)["correct"]


def test_reference_captions_are_named_exactly_by_both_scorers(tmp_path):
    """Every reference caption of a world scores as exactly named, by the demo's scorer and by the independent
    one in benchmarks/ (which reads only the files)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from glied.datasets.shapes import ShapesConfig, make_shapes
    from glied.pipeline.naming import score_captions

    make_shapes(tmp_path / "w", ShapesConfig(n_images=60, seed=5), workers=1)
    cap = json.loads((tmp_path / "w" / "captions.json").read_text())
    for k in range(5):
        caps = {im["filename"]: im["sentences"][k]["raw"] for im in cap["images"]}
        r = score_captions(tmp_path / "w", caps)
        assert r["all_named"] == 1.0 and r["errors"] == {"missed": 0, "doubled": 0, "invented": 0}
    caps = {im["filename"]: im["sentences"][0]["raw"] for im in cap["images"]}
    caps[cap["images"][0]["filename"]] += " and a red circle"  # one wrong photo
    f = tmp_path / "caps.json"
    f.write_text(json.dumps([{"file_name": a, "caption": b} for a, b in caps.items()]))
    ours = score_captions(tmp_path / "w", caps)["all_named"]
    script = Path(__file__).parents[2] / "benchmarks" / "score_naming.py"
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "w"), str(f)], capture_output=True,
                         text=True, check=True).stdout
    assert ours == 59 / 60 and "59 of 60 photos" in out
