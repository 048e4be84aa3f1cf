"""Caption grammar of the shapes world: 13 sentence patterns with paraphrase variety.

Captions mention objects with their attributes ("a small red circle"), counts over identical objects
("two red circles"), and spatial relations ("a blue star to the left of a small square"). Every pattern
names every object's shape and colour, so a captioner can be scored on naming them all; size words and the
choice of pattern and relation vary between the five references of an image.

Objects are always mentioned in reading order, left to right by their centres (a group of identical objects
at its leftmost member): an order the captioner can see in the region boxes, so that naming every object
exactly once is a matter of walking along the picture rather than of guessing the order a writer chose.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from glied.datasets.shapes.render import SceneObject, plural

NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
SHAPE_NOUN = {"count": "shapes", "object": "objects"}


def _np(o: SceneObject, rng: np.random.Generator, size_p: float = 0.5) -> str:
    """Noun phrase for one object: 'a [size] colour shape' (article 'an' before a vowel)."""
    words = []
    if rng.random() < size_p:
        words.append(o.size)
    words += [o.colour, o.shape]
    art = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([art] + words)


def reading_order(objects: list[SceneObject]) -> list[SceneObject]:
    """Objects left to right by their centres (ties: top to bottom)."""
    return sorted(objects, key=lambda o: (o.cx, o.cy))


def _groups(objects: list[SceneObject]) -> list[tuple[int, str, str]]:
    """Identical (colour, shape) objects grouped with counts, in reading order of each group's leftmost one."""
    counts = Counter((o.colour, o.shape) for o in objects)
    seen, out = set(), []
    for o in reading_order(objects):
        key = (o.colour, o.shape)
        if key not in seen:
            seen.add(key)
            out.append((counts[key], o.colour, o.shape))
    return out


def _group_phrase(n: int, colour: str, shape: str) -> str:
    if n == 1:
        return ("an " if colour[0] in "aeiou" else "a ") + f"{colour} {shape}"
    return f"{NUMBERS[n]} {colour} {plural(shape)}"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return " ".join(parts[:-1]) + " and " + parts[-1]


def _listing(objects: list[SceneObject], rng: np.random.Generator) -> str:
    """All objects, either counted ('two red circles and a star') or one by one."""
    groups = _groups(objects)
    if len(groups) < len(objects) or rng.random() < 0.4:
        return _join([_group_phrase(*g) for g in groups])
    return _join([_np(o, rng, 0.35) for o in reading_order(objects)])


def relation(a: SceneObject, b: SceneObject) -> str:
    """Spatial relation of a to b: 'to the left of', 'to the right of', 'above', 'below' or 'next to'."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if max(abs(dx), abs(dy)) < 0.6 * (a.radius + b.radius) * 0.5:
        return "next to"
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _relational(objects: list[SceneObject], rng: np.random.Generator) -> str:
    """'<first> <relation> <second> and <the others>', objects in reading order."""
    a, b, *rest = reading_order(objects)
    rel = relation(a, b)
    if rel == "next to" and rng.random() < 0.5:
        rel = "near"
    head = f"{_np(a, rng)} {rel} {_np(b, rng)}"
    if rest:
        head += " and " + _join([_np(o, rng, 0.3) for o in rest])
    return head


def _single(o: SceneObject, rng: np.random.Generator, size: int) -> list[str]:
    pos_x = "left" if o.cx < 0.4 * size else ("right" if o.cx > 0.6 * size else "middle")
    return [
        f"{_np(o, rng)}",
        f"there is {_np(o, rng)} in the picture",
        f"{_np(o, rng)} on a plain background",
        f"a single {o.colour} {o.shape}",
        f"a picture of {_np(o, rng)}",
        f"one {o.size} {o.colour} {o.shape}",
        f"{_np(o, rng)} on the {pos_x} side" if pos_x != "middle" else f"{_np(o, rng)} in the middle",
        f"an image showing {_np(o, rng)}",
        f"a {o.shape} that is {o.colour}",
        f"the only object is {_np(o, rng)}",
    ]


def _multi(objects: list[SceneObject], rng: np.random.Generator) -> list[str]:
    n = NUMBERS[len(objects)]
    return [
        _listing(objects, rng),
        f"there are {n} {SHAPE_NOUN['count']} {_listing(objects, rng)}",
        f"a picture of {_listing(objects, rng)}",
        f"an image with {_listing(objects, rng)}",
        _relational(objects, rng),
        _relational(objects, rng),
        f"{n} {SHAPE_NOUN['object']} on a background {_listing(objects, rng)}",
        f"{_relational(objects, rng)} in the picture",
        f"we see {_listing(objects, rng)}",
        f"a scene with {_listing(objects, rng)}",
    ]


def captions_for(objects: list[SceneObject], rng: np.random.Generator, size: int, n: int = 5) -> list[str]:
    """``n`` distinct reference captions (lower case, no punctuation) for a scene, drawn from the patterns."""
    pool = _single(objects[0], rng, size) if len(objects) == 1 else _multi(objects, rng)
    order = rng.permutation(len(pool))
    out: list[str] = []
    for k in order:
        if pool[k] not in out:
            out.append(pool[k])
        if len(out) == n:
            break
    while len(out) < n:  # tiny pools: draw fresh relational/listing variants
        out.append(_relational(objects, rng) if len(objects) > 1 else _np(objects[0], rng))
    return out
