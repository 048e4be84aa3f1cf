"""Independent naming scorer for captions of a shapes world: reads only the world's instances.json and a
captions file, with its own parser (regular expressions; nothing imported from glied), to check the demo's
scorer (glied.pipeline.naming).

A photo counts as named when the caption's (colour, shape) mentions, with their counts, are exactly the
photo's objects. Shapes and colours are read from instances.json (categories; attributes of type colour).

    python benchmarks/score_naming.py WORLD CAPTIONS.json [--compare REPORT.json]

CAPTIONS.json: [{"file_name": ..., "caption": ...}, ...] (the demo writes captions/unseen_captions.json).
--compare: the demo's naming result (captions/stage.json) to print both shares side by side.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

COUNTS = {"two": 2, "three": 3, "four": 4}


def build_patterns(shapes: list[str], colours: list[str]) -> tuple[re.Pattern, re.Pattern, dict[str, str]]:
    nouns = {s: s for s in shapes}
    nouns.update({("crosses" if s == "cross" else s + "s"): s for s in shapes})
    noun_alt = "|".join(sorted(map(re.escape, nouns), key=len, reverse=True))
    col_alt = "|".join(map(re.escape, colours))
    phrase = re.compile(rf"(?:\b(two|three|four)\s+)?(?:\b(?:small|large)\s+)?\b({col_alt})\s+({noun_alt})\b")
    that_is = re.compile(rf"\b({'|'.join(map(re.escape, shapes))})\s+that\s+is\s+({col_alt})\b")
    return phrase, that_is, nouns


def parse(caption: str, patterns) -> Counter:
    phrase, that_is, nouns = patterns
    got: Counter = Counter()
    for m in phrase.finditer(caption):
        n = COUNTS.get(m.group(1) or "", 1)
        plural = nouns[m.group(3)] != m.group(3)
        got[(nouns[m.group(3)], m.group(2))] += n if plural else 1
    for m in that_is.finditer(caption):
        got[(m.group(1), m.group(2))] += 1
    return got


def truth_and_patterns(inst: dict) -> tuple[dict[int, Counter], tuple]:
    """Each photo's objects as a Counter of (shape, colour), and the caption patterns of the world's words."""
    shapes = [c["name"] for c in inst["categories"]]
    colours = [x["name"] for x in inst["attributes"] if x.get("type") == "colour"]
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    truth: dict[int, Counter] = {im["id"]: Counter() for im in inst["images"]}
    for ann in inst["annotations"]:
        colour = next(x for x in ann["attributes"] if x in colours)
        truth[ann["image_id"]][(cats[ann["category_id"]], colour)] += 1
    return truth, build_patterns(shapes, colours)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("world")
    ap.add_argument("captions")
    ap.add_argument("--compare", default=None)
    a = ap.parse_args(argv)
    inst = json.loads((Path(a.world) / "instances.json").read_text())
    truth, pats = truth_and_patterns(inst)
    caps = {r["file_name"]: r["caption"] for r in json.loads(Path(a.captions).read_text())}
    ok, by_n = 0, {}
    for im in inst["images"]:
        if im["file_name"] not in caps:
            print(f"error: {a.captions}: no caption for {im['file_name']}", file=sys.stderr)
            return 2
        good = parse(caps[im["file_name"]], pats) == truth[im["id"]]
        ok += good
        n = sum(truth[im["id"]].values())
        by_n.setdefault(n, [0, 0])
        by_n[n][0] += good
        by_n[n][1] += 1
    share = ok / len(inst["images"])
    print(f"independent scorer: {ok} of {len(inst['images'])} photos named exactly ({100 * share:.1f}%)")
    print("  by number of objects: " + ", ".join(f"{n}: {c}/{t}" for n, (c, t) in sorted(by_n.items())))
    if a.compare:
        res = json.loads(Path(a.compare).read_text())
        demo = res.get("result", res).get("unseen", res.get("result", res))
        print(f"demo scorer:        {100 * demo['all_named']:.1f}%  "
              f"({'agrees' if abs(demo['all_named'] - share) < 1e-9 else 'DISAGREES'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
