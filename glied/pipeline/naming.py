"""Scoring captions of the shapes world on naming: is every object's shape named with its colour?

An object counts as named when its colour directly precedes its shape ("a red circle", "two red circles",
"a small red circle" has size before colour) or the caption says "<shape> that is <colour>". Binding colour to
shape this way means "a red square and a blue circle" does not name a blue square.
"""
from __future__ import annotations

import json
from pathlib import Path

from glied.datasets.shapes.render import plural


def object_named(tokens: list[str], shape: str, colour: str) -> bool:
    nouns = {shape, plural(shape)}
    for a, b in zip(tokens, tokens[1:]):
        if a == colour and b in nouns:
            return True
    for i in range(len(tokens) - 3):
        if tokens[i] == shape and tokens[i + 1:i + 3] == ["that", "is"] and tokens[i + 3] == colour:
            return True
    return False


def scene_objects(world: Path) -> dict[int, list[tuple[str, str]]]:
    """{image id: [(shape, colour), ...]} from a shapes world's instances.json."""
    inst = json.loads((Path(world) / "instances.json").read_text())
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    objs: dict[int, list[tuple[str, str]]] = {im["id"]: [] for im in inst["images"]}
    for a in inst["annotations"]:
        objs[a["image_id"]].append((cats[a["category_id"]], a["attributes"][0]))
    return objs


def naming_accuracy(captioner, world: str | Path, batch_size: int = 16) -> dict:
    """Caption every photo of a shapes world with ``captioner``; fraction of photos whose every object is named,
    and of objects named. Returns {images, all_named, objects_named, examples_missed}."""
    world = Path(world)
    inst = json.loads((world / "instances.json").read_text())
    objs = scene_objects(world)
    paths = [str(world / "images" / im["file_name"]) for im in inst["images"]]
    results = captioner.caption_files(paths, batch_size=batch_size)
    all_ok = n_obj = n_named = 0
    missed = []
    for im, r in zip(inst["images"], results):
        named = [object_named(r.tokens, s, c) for s, c in objs[im["id"]]]
        n_obj += len(named)
        n_named += sum(named)
        if all(named):
            all_ok += 1
        elif len(missed) < 5:
            missed.append({"file": im["file_name"], "caption": r.caption, "objects": objs[im["id"]]})
    n = len(results)
    return {"images": n, "all_named": all_ok / max(n, 1), "objects_named": n_named / max(n_obj, 1),
            "examples_missed": missed}
