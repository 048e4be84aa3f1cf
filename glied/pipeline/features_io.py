"""`glied import-features`, `glied export-features`, `glied merge-caches`: moving features between caches
and the files other bottom-up tools write (formats: :mod:`glied.datasets.bottomup_files`);
`glied verify-cache`: every entry checked against its checksums, damaged ones listed (and dropped).

All three write through :class:`~glied.datasets.cache.CacheWriter` (crash-safe, and a re-run skips the ids
already written), except the TSV export, which is written to a temporary file and renamed at the end.
"""
from __future__ import annotations

import sys

from glied.datasets import bottomup_files as bf
from glied.datasets import identity as idn
from glied.datasets.cache import CacheWriter, FeatureCache, check_cache, make_manifest
from glied.errors import InputError
from glied.fileio import write_atomic


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _iter_sources(sources: list[str], box_dir: str | None):
    kinds = {bf.sniff_source(s) for s in sources}
    if len(kinds) > 1:
        raise InputError("import-features: give either TSV files or npz folders, not both at once")
    for s in sources:
        if bf.sniff_source(s) == "npz":
            yield from bf.read_npz_dir(s, box_dir)
        else:
            for part in bf.expand_tsv_parts(s):
                yield from bf.read_tsv(part)


def import_features(sources: list[str], out: str, *, box_dir: str | None = None, name: str | None = None,
                    dtype: str = "float32") -> int:
    """Import TSV files/parts or npz folders into cache ``out``; returns the number of images written.

    The extractor identity recorded is {name: ``name`` or "imported-<format>", config: {source_format},
    weights_fingerprint: "unknown", feature_dim: from the first row}. Ids already in ``out`` are skipped.
    """
    kind = bf.sniff_source(sources[0])
    items = _iter_sources(sources, box_dir)
    first = next(items, None)
    if first is None:
        raise InputError(f"{sources[0]}: no images found to import")
    dim = int(first[1].features.shape[1])
    ident = {"name": name or f"imported-{kind}", "config": {"source_format": kind},
             "weights_fingerprint": "unknown", "feature_dim": dim}
    n = skipped = 0
    with CacheWriter(out, make_manifest(ident, dtype, None)) as w:
        def put(iid, r):
            nonlocal n, skipped
            if iid in w:
                skipped += 1
                return
            if r.features.shape[1] != dim:
                raise InputError(f"image {iid}: feature dim {r.features.shape[1]} differs from the first "
                                 f"image's {dim}; import sources with one feature size")
            w.put(iid, r)
            n += 1

        put(*first)
        for iid, r in items:
            put(iid, r)
    if skipped:
        _log(f"import-features: {skipped} ids were already in {out} and were skipped")
    return n


def export_tsv(cache: str, out: str) -> int:
    """Write every entry of ``cache`` as a bottom-up TSV at ``out`` (float32); returns the row count."""
    c = FeatureCache.open(cache)
    c.check_intact()
    n = 0

    def write(tmp: str) -> None:
        nonlocal n
        n = bf.write_tsv(tmp, ((i, c.regions(i)) for i in c.ids()))
    write_atomic(out, write)
    return n


def merge_caches(out: str, inputs: list[str]) -> tuple[int, int]:
    """Copy every entry of the caches ``inputs`` into ``out`` (identities must match).
    Returns (entries written, duplicates skipped).

    A duplicate id (already in ``out`` or in an earlier input) is skipped, so a merge can be re-run.
    """
    caches = [FeatureCache.open(p) for p in inputs]
    for c in caches:
        c.check_intact()
    ref = idn.of_manifest(caches[0].manifest)
    for c in caches[1:]:
        idn.check(idn.of_manifest(c.manifest), ref, what=f"cannot merge {c.root} with {caches[0].root}",
                  fix="Merge only shards of one extraction")
    m = caches[0].manifest
    n = dup = 0
    with CacheWriter(out, make_manifest(m["extractor"], m["dtype"], m.get("attributes"))) as w:
        for c in caches:
            for iid in c.ids():
                if iid in w:
                    dup += 1
                    continue
                w.put(iid, c.regions(iid), c.attributes(iid))
                n += 1
    return n, dup


def verify_cache(cache: str, repair: bool = False) -> tuple[int, dict[str, str]]:
    """(entries intact, {id: reason} damaged) of ``cache``; ``repair`` drops the damaged ones from its index
    so that `glied extract` into it extracts them again."""
    return check_cache(cache, repair=repair)
