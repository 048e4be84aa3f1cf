"""Scoring captions of the shapes world on naming: is every object named once, with its own colour?

A caption's *mentions* are its (colour, shape) noun phrases with their counts: "a red circle" and "one small
red circle" mention one red circle, "two red circles" two, "a circle that is red" one. Colour is bound to
shape by adjacency (a size word may stand before the colour), so "a red square and a blue circle" mentions no
blue square. A photo is named correctly when its caption's mentions, counted, are exactly its objects: every
object named, none named twice, none invented. The errors are counted separately:

* missed   an object of the photo that the caption does not mention (or mentions fewer times than it occurs)
* doubled  an object of the photo mentioned more often than it occurs ("a red circle ... a red circle")
* invented a (colour, shape) that is not in the photo (a wrong shape or colour, a class taken from a neighbour)

``benchmarks/score_naming.py`` scores the same captions from the files alone, with its own parser, as a check.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from glied.datasets.shapes.render import COLOURS, SHAPES, plural
from glied.fileio import write_json_atomic

NUMBER_WORDS = {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "three": 3, "four": 4}
SIZE_WORDS = ("small", "large")
_NOUNS = {s: (s, 1) for s in SHAPES} | {plural(s): (s, 2) for s in SHAPES}  # noun -> (shape, is singular: 1)


def mentions(tokens: list[str]) -> Counter:
    """Counter {(shape, colour): times mentioned} of a tokenised caption (see the module docstring)."""
    out: Counter = Counter()
    for i in range(1, len(tokens)):
        noun = _NOUNS.get(tokens[i])
        if noun is None or tokens[i - 1] not in COLOURS:
            continue
        shape, number = noun
        j = i - 2
        if j >= 0 and tokens[j] in SIZE_WORDS:
            j -= 1
        count = NUMBER_WORDS.get(tokens[j], 1) if j >= 0 else 1
        out[(shape, tokens[i - 1])] += count if number == 2 else 1
    for i in range(len(tokens) - 3):
        if tokens[i] in SHAPES and tokens[i + 1:i + 3] == ["that", "is"] and tokens[i + 3] in COLOURS:
            out[(tokens[i], tokens[i + 3])] += 1
    return out


def object_named(tokens: list[str], shape: str, colour: str) -> bool:
    """Is a (colour, shape) object mentioned at all in ``tokens``?"""
    return mentions(tokens)[(shape, colour)] > 0


def score_caption(tokens: list[str], objects: list[tuple[str, str]]) -> dict:
    """{correct, missed, doubled, invented, named} of one caption against the photo's (shape, colour) objects."""
    got, want = mentions(tokens), Counter(objects)
    missed = sum((want - got).values())
    extra = got - want
    doubled = sum(v for k, v in extra.items() if k in want)
    invented = sum(v for k, v in extra.items() if k not in want)
    return {"correct": got == want, "missed": missed, "doubled": doubled, "invented": invented,
            "named": len(objects) - missed}


def scene_objects(world: Path) -> dict[int, list[tuple[str, str]]]:
    """{image id: [(shape, colour), ...]} from a shapes world's instances.json, each photo's objects in reading
    order (left to right by box centre, as the captions name them)."""
    inst = json.loads((Path(world) / "instances.json").read_text())
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    objs: dict[int, list[tuple[str, str]]] = {im["id"]: [] for im in inst["images"]}
    def centre(a: dict) -> tuple[float, float]:
        x, y, w, h = a["bbox"]
        return (x + w / 2, y + h / 2)

    for a in sorted(inst["annotations"], key=centre):
        objs[a["image_id"]].append((cats[a["category_id"]], a["attributes"][0]))
    return objs


def score_captions(world: str | Path, captions: dict[str, str]) -> dict:
    """Score captions {file_name: caption} of a shapes world's photos (all of them must be captioned).

    Returns {images, all_named (share of photos named correctly), objects_named (share of objects mentioned),
    errors {missed, doubled, invented} (counts over all photos), by_objects {n: [correct, photos]},
    examples_missed (up to 5)}."""
    world = Path(world)
    inst = json.loads((world / "instances.json").read_text())
    objs = scene_objects(world)
    ok = n_obj = n_named = 0
    errors = {"missed": 0, "doubled": 0, "invented": 0}
    by_n: dict[int, list[int]] = {}
    missed = []
    for im in inst["images"]:
        cap = captions[im["file_name"]]
        s = score_caption(cap.split(), objs[im["id"]])
        n = len(objs[im["id"]])
        n_obj += n
        n_named += s["named"]
        ok += s["correct"]
        for k in errors:
            errors[k] += s[k]
        row = by_n.setdefault(n, [0, 0])
        row[0] += s["correct"]
        row[1] += 1
        if not s["correct"] and len(missed) < 5:
            missed.append({"file": im["file_name"], "caption": cap, "objects": objs[im["id"]]})
    n_img = len(inst["images"])
    return {"images": n_img, "all_named": ok / max(n_img, 1), "objects_named": n_named / max(n_obj, 1),
            "errors": errors, "by_objects": {str(k): by_n[k] for k in sorted(by_n)}, "examples_missed": missed}


def naming_accuracy(captioner, world: str | Path, batch_size: int = 16, out: str | Path | None = None) -> dict:
    """Caption every photo of a shapes world with ``captioner`` and score them (:func:`score_captions`).

    ``out``: also write the captions, [{file_name, caption}], to this json file (for independent scoring)."""
    world = Path(world)
    inst = json.loads((world / "instances.json").read_text())
    paths = [str(world / "images" / im["file_name"]) for im in inst["images"]]
    results = captioner.caption_files(paths, batch_size=batch_size)
    captions = {im["file_name"]: r.caption for im, r in zip(inst["images"], results)}
    if out is not None:
        write_json_atomic(Path(out), [{"file_name": k, "caption": v} for k, v in captions.items()])
    return score_captions(world, captions)
