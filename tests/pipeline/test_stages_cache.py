"""Cached stages: skipped when unchanged, rerun when their settings or an upstream stage change."""
from glied.pipeline.stages import StageRunner


def test_stage_runs_once_and_reruns_on_change(tmp_path):
    calls = []

    def make(tag):
        def fn(folder):
            calls.append(tag)
            (folder / "out.txt").write_text(tag)
            return {"tag": tag}
        return fn

    def pipeline(a, b):
        r = StageRunner(tmp_path, log=lambda s: None)
        r.run("a", {"v": a}, make(f"a{a}"))
        r.run("b", {"v": b}, make(f"b{b}"), after=("a",))
        return r

    pipeline(1, 1)
    assert calls == ["a1", "b1"]
    r = pipeline(1, 1)
    assert calls == ["a1", "b1"] and all(c for _, _, c in r.timings())
    pipeline(1, 2)  # only b changed
    assert calls == ["a1", "b1", "b2"]
    pipeline(2, 2)  # upstream changed: both rerun
    assert calls[-2:] == ["a2", "b2"]


def test_interrupted_stage_reruns(tmp_path):
    r = StageRunner(tmp_path, log=lambda s: None)

    def boom(folder):
        raise RuntimeError("killed")
    try:
        r.run("a", {}, boom)
    except RuntimeError:
        pass
    assert not (tmp_path / "a" / "stage.json").exists()
    assert StageRunner(tmp_path, log=lambda s: None).run("a", {}, lambda f: {"ok": 1}) == {"ok": 1}
