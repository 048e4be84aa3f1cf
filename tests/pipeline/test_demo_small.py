"""`glied demo` end to end on a tiny world: stage records hold paths relative to the demo folder, so a moved
demo folder is reused as it is, and the end of the run points at the bundle, the pictures and an example."""
import json
import os
import shutil

import pytest

from glied.pipeline.demo import DemoConfig, run_demo

TINY = DemoConfig(images=48, detector_epochs=1, detector_input=128, attribute_epochs=1, xe_epochs=1,
                  scst_epochs=1, batch_size=16, unseen_images=6, pictures=1, decoder_seeds=(0,),
                  decoder_width=64)


def _paths_in(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _paths_in(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _paths_in(v)
    elif isinstance(obj, str) and "/" in obj:
        yield obj


@pytest.mark.slow
def test_tiny_demo_records_relative_paths_and_moves(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    lines = []
    run_demo("demo", TINY, log=lines.append)
    root = tmp_path / "demo"
    for marker in root.glob("*/stage.json"):
        for p in _paths_in(json.loads(marker.read_text())["result"]):
            assert not os.path.isabs(p) and not p.startswith("demo/"), (marker, p)
            assert (root / p).exists(), (marker, p)
    text = "\n".join(lines)
    assert "bundle:" in text and "pictures:" in text and "ground truth:" in text and "caption:" in text
    assert "named exactly once" in text

    moved = tmp_path / "elsewhere" / "demo-moved"
    shutil.move(str(root), str(moved))
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = []
    run_demo(moved, TINY, log=again.append)
    assert sum("running ..." in s for s in again) == 0, again  # every stage reused from the moved folder
