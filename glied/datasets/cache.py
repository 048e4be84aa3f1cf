"""The feature cache: per-image regions (+ optional attribute words) keyed by a stable image id.

Read::

    cache = FeatureCache.open("feats/")
    cache.check_compatible({"extractor": ckpt_extractor_identity, "attributes": ckpt_attr_identity})
    r = cache.regions("391895")          # RegionFeatures, features (R, D) in the cache dtype
    a = cache.attributes("391895")       # AttributeWords or None

Write (crash-safe and resumable; one writer per cache, enforced with a lock)::

    with CacheWriter("feats/", make_manifest(extractor_identity, "float16", attr_identity)) as w:
        for image_id, regions, words in results:
            if image_id not in w:
                w.put(image_id, regions, words)

Storage layout and the crash-safety argument: :mod:`glied.datasets.cache_store` and ``docs/cache.md``.
Manifest keys: ``format`` ("glied-feature-cache"), ``format_version``, ``extractor`` {name, config,
weights_fingerprint, feature_dim}, ``dtype`` ("float16"|"float32"), ``attributes`` {name, config, vocab,
top_k, ...} or None, ``created`` (UTC ISO time), ``glied_version``. Identity = everything but ``created``,
``glied_version`` and ``storage`` (:mod:`glied.datasets.identity` builds, compares and checks identities).
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import time
import weakref

import numpy as np

from glied.datasets import cache_store as cs
from glied.datasets import identity as idn
from glied.errors import ConfigError, InputError
from glied.fileio import fsync_dir, write_bytes_atomic
from glied.records import AttributeWords, RegionFeatures

FORMAT = "glied-feature-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
DTYPES = ("float16", "float32")


def make_manifest(extractor: dict, dtype: str = "float16", attributes: dict | None = None) -> dict:
    """A cache manifest for features from ``extractor`` identity {name, config, weights_fingerprint,
    feature_dim}, stored as ``dtype``, with optional ``attributes`` identity {name, config, vocab, top_k}."""
    from glied import __version__

    if dtype not in DTYPES:
        raise ConfigError(f"cache dtype must be one of {DTYPES}, not {dtype!r}")
    missing = [k for k in ("name", "config", "weights_fingerprint", "feature_dim") if k not in extractor]
    if missing:
        raise ConfigError(f"extractor identity lacks {missing}; an extractor's identity() must return them")
    if attributes is not None and ("vocab" not in attributes or "top_k" not in attributes):
        raise ConfigError("attribute identity must include 'vocab' and 'top_k'")
    return json.loads(json.dumps({
        "format": FORMAT, "format_version": FORMAT_VERSION, "extractor": extractor, "dtype": dtype,
        "attributes": attributes,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "glied_version": __version__, "storage": {"layout": "append-log", "version": 1},
    }))


def _read_manifest(root: str) -> dict:
    p = os.path.join(root, MANIFEST)
    if not os.path.isdir(root):
        raise InputError(f"feature cache {root} does not exist; "
                         f"create it with `glied extract ... --out {root}`")
    try:
        with open(p, encoding="utf-8") as f:
            m = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{root} is not a glied feature cache (no {MANIFEST}); "
                         f"create it with `glied extract` or `glied import-features`") from None
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{p}: unreadable cache manifest ({e}); restore it or re-extract") from None
    if m.get("format") != FORMAT:
        raise InputError(f"{p}: not a glied feature cache manifest (format {m.get('format')!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{p}: cache format version {m.get('format_version')} is not supported by this "
                         f"glied (reads version {FORMAT_VERSION}); re-extract or upgrade glied")
    return m


class DamagedEntryError(InputError):
    """A cache entry whose bytes cannot be trusted (checksum mismatch, data file truncated or deleted)."""

    def __init__(self, root: str, image_id: str, why: str):
        super().__init__(f"feature cache {root}: entry {image_id!r} is damaged ({why}); run `glied verify-cache "
                         f"{root} --repair` to drop the damaged entries, then `glied extract ... --out {root}` "
                         f"re-extracts them")
        self.image_id, self.why = image_id, why


class EntryError(ConfigError, ValueError):
    """An entry that cannot be put (a duplicate id, features of the wrong size): one line for the CLI."""


_HELD_LOCKS: "weakref.WeakSet" = weakref.WeakSet()     # the lock files this process has open


def _drop_locks_in_child() -> None:
    """After fork, in the child (e.g. a DataLoader worker decoding images): close the inherited lock files. An
    flock belongs to the open file, not the process, so a child that outlived a killed writer would keep its
    cache locked and the resume would be refused until the child exits."""
    for f in list(_HELD_LOCKS):
        try:
            f.close()
        except OSError:
            pass


os.register_at_fork(after_in_child=_drop_locks_in_child)


def _take_lock(root: str):
    """Open and flock ``root``/lock for the one writer (InputError when another process holds it)."""
    lock = open(os.path.join(root, "lock"), "a+")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise InputError(f"feature cache {root} is being written by another process (lock held); "
                         f"wait for it or write to another --out") from None
    _HELD_LOCKS.add(lock)
    return lock


def check_cache(path: str | os.PathLike, repair: bool = False) -> tuple[int, dict[str, str]]:
    """Check every entry of a cache (index lines, data ranges, data CRC32s); returns (number of intact
    entries, {id: reason} of the damaged ones). ``repair``: also drop them from the index (under the writer lock), so the next
    ``glied extract`` into the cache extracts exactly those images again; intact entries are kept as they are."""
    root = os.fspath(path)
    _read_manifest(root)
    lock = _take_lock(root) if repair else None
    try:
        c = FeatureCache.open(root, check_crc=True)
        c.verify()
        bad = dict(c.damaged)
        if repair and (bad or c._index.bad_tail_bytes):
            cs.rewrite_index(root, c._index)
        return len(c), bad
    finally:
        if lock is not None:
            lock.close()


class FeatureCache:
    """Read-only view of a feature cache (see module docstring). Safe to share with forked workers."""

    def __init__(self, root: str, manifest: dict, index: cs.IndexReader, check_crc: bool = True):
        self.root, self.manifest = root, manifest
        self._index = index
        self._files = cs.DataFiles(root)
        self._check_crc = check_crc

    @classmethod
    def open(cls, path: str | os.PathLike, *, check_crc: bool = True) -> "FeatureCache":
        """Open a cache for reading. Entries that cannot be served (damaged index line, bytes outside their
        data file) are left out and listed in :attr:`damaged`. ``check_crc``: check each entry's data CRC32
        on every read (the default; False exists for benchmarks that measure its cost)."""
        root = os.fspath(path)
        m = _read_manifest(root)
        rd = cs.IndexReader().read(os.path.join(root, cs.INDEX_NAME))
        cs.check_ranges(rd, root)
        return cls(root, m, rd, check_crc)

    def refresh(self) -> None:
        """Pick up entries committed since open (e.g. by a running extraction)."""
        self._index.read(os.path.join(self.root, cs.INDEX_NAME), self._index.valid_bytes)
        cs.check_ranges(self._index, self.root)

    @property
    def damaged(self) -> dict[str, str]:
        """{id (or "index.log line N"): reason} of entries found damaged so far; never served."""
        return self._index.damaged

    def check_intact(self) -> None:
        """Raise :class:`DamagedEntryError` if opening found damaged entries (before a whole-cache copy)."""
        if self._index.damaged:
            key, why = next(iter(self._index.damaged.items()))
            n = len(self._index.damaged)
            raise DamagedEntryError(self.root, key, why + (f"; and {n - 1} more" if n > 1 else ""))

    def num_regions(self, image_id) -> int:
        """Number of regions of one entry, from the index (no data read)."""
        e = self._index.entries.get(str(image_id))
        if e is None:
            self._missing(str(image_id))
        return next(int(shape[0]) for name, _, shape in e[7] if name == "features")

    def _missing(self, key: str):
        why = self._index.damaged.get(key)
        if why is not None:
            raise DamagedEntryError(self.root, key, why)
        raise InputError(f"image id {key!r} is not in feature cache {self.root} ({len(self)} entries); "
                         f"extract it first with `glied extract ... --out {self.root}`")

    def __contains__(self, image_id) -> bool:
        return str(image_id) in self._index.entries

    def __len__(self) -> int:
        return len(self._index.entries)

    def ids(self) -> list[str]:
        """Ids of all committed entries, in the order they were written."""
        return list(self._index.entries)

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def feature_dim(self) -> int:
        return int(self.manifest["extractor"]["feature_dim"])

    @property
    def attribute_vocab(self) -> list[str] | None:
        a = self.manifest.get("attributes")
        return None if a is None else list(a["vocab"])

    def check_compatible(self, expected: dict) -> None:
        """Raise ConfigError naming every difference between this cache and ``expected``.

        ``expected`` holds any of the identity keys (``extractor``, ``attributes``, ``dtype``,
        ``format_version``) as a checkpoint recorded them; keys it omits are not checked.
        """
        idn.check(idn.of_manifest(self.manifest), expected, only_wanted=True,
                  what=f"feature cache {self.root} does not match",
                  fix="Re-extract with the matching extractor or use the cache it was trained on")

    def _arrays(self, image_id, check: bool | None = None) -> tuple[cs.Entry, dict[str, np.ndarray]]:
        """One entry's arrays, after checking its bytes against the CRC32 in its index line."""
        key = str(image_id)
        e = self._index.entries.get(key)
        if e is None:
            self._missing(key)
        e = cs.Entry(*e)
        try:
            buf = self._files.view(e.file, e.offset + e.nbytes)
        except OSError as err:
            self._damage(key, f"data unreadable: {err.strerror or err}")
        if ((self._check_crc if check is None else check)
                and cs.crc32(memoryview(buf)[e.offset:e.offset + e.nbytes]) != e.crc):
            self._damage(key, "data checksum mismatch")
        return e, cs.unpack_arrays(buf, e.offset, e.layout)

    def _damage(self, key: str, why: str):
        del self._index.entries[key]
        self._index.damaged[key] = why
        raise DamagedEntryError(self.root, key, why)

    def regions(self, image_id) -> RegionFeatures:
        """Regions of one image. Arrays are read-only views of the memory-mapped file (no copy)."""
        e, a = self._arrays(image_id)
        return RegionFeatures(boxes=a["boxes"], features=a["features"], obj_ids=a["obj_ids"].astype(np.int64),
                              obj_scores=a["obj_scores"], attr_ids=a["attr_ids"].astype(np.int64),
                              attr_scores=a["attr_scores"], image_w=e.image_w, image_h=e.image_h)

    def attributes(self, image_id) -> AttributeWords | None:
        """Attribute words of one image, or None when the cache was written without an attribute detector."""
        e, a = self._arrays(image_id)
        if "word_ids" not in a:
            return None
        return AttributeWords(word_ids=a["word_ids"].astype(np.int64), probs=a["word_probs"],
                              word_map=a.get("word_map"))

    def batch(self, ids) -> dict[str, np.ndarray]:
        """A padded training batch of the images ``ids`` (one copy, no per-image arrays kept).

        Returns {"features": (B, R, D) cache dtype, "boxes": (B, R, 4) float32, "mask": (B, R) bool (True =
        a real region), "image_wh": (B, 2) int32}, R = the most regions of any image in the batch; padding is
        zero. With attribute words also {"word_ids": (B, K) int64 padded with -1, "word_probs": (B, K)}.
        """
        recs = [self._arrays(i) for i in ids]
        b = len(recs)
        r = max((a["features"].shape[0] for _, a in recs), default=0)
        d = self.feature_dim
        feats = np.empty((b, r, d), self.dtype)                  # (B, R, D)
        boxes = np.zeros((b, r, 4), np.float32)                  # (B, R, 4)
        mask = np.zeros((b, r), bool)                            # (B, R)
        wh = np.zeros((b, 2), np.int32)                          # (B, 2)
        for j, (e, a) in enumerate(recs):
            n = a["features"].shape[0]
            feats[j, :n] = a["features"]
            feats[j, n:] = 0
            boxes[j, :n] = a["boxes"]
            mask[j, :n] = True
            wh[j] = (e.image_w, e.image_h)
        out = {"features": feats, "boxes": boxes, "mask": mask, "image_wh": wh}
        if recs and "word_ids" in recs[0][1]:
            k = max(a["word_ids"].shape[0] for _, a in recs)
            out["word_ids"] = np.full((b, k), -1, np.int64)      # (B, K)
            out["word_probs"] = np.zeros((b, k), np.float32)     # (B, K)
            for j, (_, a) in enumerate(recs):
                n = a["word_ids"].shape[0]
                out["word_ids"][j, :n] = a["word_ids"]
                out["word_probs"][j, :n] = a["word_probs"]
        return out

    def verify(self, ids=None) -> list[str]:
        """Ids whose stored bytes no longer match their checksum (empty list: all intact); they join
        :attr:`damaged` and are no longer served."""
        bad = []
        for k in (self.ids() if ids is None else ids):
            try:
                self._arrays(k, check=True)
            except DamagedEntryError:
                bad.append(str(k))
        return bad

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_files"] = cs.DataFiles(self.root)
        return d


def _stored_bytes(root: str) -> int:
    """Bytes in the index and data files of a cache folder (0: nothing written yet)."""
    idx = os.path.join(root, cs.INDEX_NAME)
    return (os.path.getsize(idx) if os.path.exists(idx) else 0) + sum(cs.data_sizes(root).values())


class CacheWriter:
    """Append entries to a cache, crash-safe (see :mod:`cache_store`). Creates the cache or resumes it.

    Opening an existing cache checks that its identity equals ``manifest``'s (ConfigError listing what
    differs otherwise), repairs a torn tail left by a crash, and takes an exclusive lock. Entries are
    committed in groups (every ``commit_every`` puts or ``commit_seconds``, and on :meth:`close`); an entry
    is visible to readers and to ``in`` only once committed.
    """

    def __init__(self, path: str | os.PathLike, manifest: dict, *, commit_every: int = 256,
                 commit_seconds: float = 2.0, max_file_bytes: int = 1 << 30):
        self.root = os.fspath(path)
        self.commit_every, self.commit_seconds = commit_every, commit_seconds
        self.max_file_bytes = max_file_bytes
        os.makedirs(os.path.join(self.root, cs.DATA_DIR), exist_ok=True)
        self._lock = _take_lock(self.root)
        try:
            if os.path.exists(os.path.join(self.root, MANIFEST)):
                have = _read_manifest(self.root)
                idn.check(idn.of_manifest(have), idn.of_manifest(manifest),
                          what=f"feature cache {self.root} was written by a different extractor setup",
                          fix="Use a new --out folder or the same settings")
                self.manifest = have
            else:
                n = _stored_bytes(self.root)
                if n:
                    raise InputError(f"{self.root}: the cache holds {n} bytes of entries but no {MANIFEST}, so "
                                     f"nothing says which extractor wrote them; restore {MANIFEST} from a "
                                     f"backup, or write to a new --out folder (or delete {self.root})")
                if manifest.get("format") != FORMAT:
                    raise ConfigError("CacheWriter needs a manifest from glied.datasets.cache.make_manifest")
                write_bytes_atomic(os.path.join(self.root, MANIFEST),
                                   json.dumps(manifest, indent=1).encode("utf-8"), durable=True)
                self.manifest = manifest
            self._dtype = np.dtype(self.manifest["dtype"])
            self._dim = int(self.manifest["extractor"]["feature_dim"])
            rd = cs.recover(self.root)
            self.recovered_bytes = rd.bad_tail_bytes
            self.dropped = dict(rd.damaged)         # {id or "index.log line N": reason}: extracted again
            self._committed = rd.entries            # id -> entry; used as a set of finished ids
            self._open_files(rd)
        except BaseException:
            self._lock.close()
            raise
        self._pending: list[bytes] = []
        self._pending_ids: set[str] = set()
        self._last_commit = time.monotonic()
        self.closed = False

    def _open_files(self, rd: cs.IndexReader) -> None:
        nums = [int(n[:-4]) for n in os.listdir(os.path.join(self.root, cs.DATA_DIR)) if n.endswith(".bin")]
        nums += [e[1] for e in rd.entries.values()]
        self._num = max(nums, default=0)
        new_data = not os.path.exists(os.path.join(self.root, cs.data_file_name(self._num)))
        self._data = open(os.path.join(self.root, cs.data_file_name(self._num)), "ab")
        if new_data:
            fsync_dir(os.path.join(self.root, cs.DATA_DIR))
        self._pos = self._data.tell()
        new_index = not os.path.exists(os.path.join(self.root, cs.INDEX_NAME))
        self._index = open(os.path.join(self.root, cs.INDEX_NAME), "ab")
        if new_index:
            fsync_dir(self.root)

    def __contains__(self, image_id) -> bool:
        return str(image_id) in self._committed or str(image_id) in self._pending_ids

    def __len__(self) -> int:
        return len(self._committed) + len(self._pending_ids)

    def ids(self) -> set[str]:
        return set(self._committed) | self._pending_ids

    def put(self, image_id, regions: RegionFeatures, attributes: AttributeWords | None = None) -> None:
        """Queue one entry (committed within ``commit_every`` puts/``commit_seconds``, or at close)."""
        key = str(image_id)
        if key in self:
            raise EntryError(f"image id {key!r} is already in feature cache {self.root}")
        r = regions
        feats = np.asarray(r.features)
        if feats.ndim != 2 or feats.shape[1] != self._dim:
            raise EntryError(f"{key}: the extractor gave features of shape {feats.shape}, but cache {self.root} "
                             f"holds (R, {self._dim}); fix the extractor or write to another --out")
        n = feats.shape[0]
        arrays = [("boxes", np.asarray(r.boxes, np.float32).reshape(n, 4)),
                  ("features", feats.astype(self._dtype, copy=False)),
                  ("obj_ids", np.asarray(r.obj_ids, np.int32).reshape(n)),
                  ("obj_scores", np.asarray(r.obj_scores, np.float32).reshape(n)),
                  ("attr_ids", np.asarray(r.attr_ids, np.int32).reshape(n)),
                  ("attr_scores", np.asarray(r.attr_scores, np.float32).reshape(n))]
        if attributes is not None:
            arrays += [("word_ids", np.asarray(attributes.word_ids, np.int32)),
                       ("word_probs", np.asarray(attributes.probs, np.float32))]
            if attributes.word_map is not None:
                arrays.append(("word_map", np.asarray(attributes.word_map, np.float16)))
        blob, layout = cs.pack_arrays(arrays)
        if self._pos and self._pos + len(blob) > self.max_file_bytes:
            self._roll()
        pad = (-self._pos) % cs.ENTRY_ALIGN
        if pad:
            self._data.write(b"\0" * pad)
            self._pos += pad
        self._data.write(blob)
        self._pending.append(cs.encode_index_line(key, self._num, self._pos, len(blob), cs.crc32(blob),
                                                  int(r.image_w), int(r.image_h), layout))
        self._pos += len(blob)
        self._pending_ids.add(key)
        if (len(self._pending) >= self.commit_every
                or time.monotonic() - self._last_commit >= self.commit_seconds):
            self.commit()

    def _roll(self) -> None:
        self.commit()
        self._data.close()
        self._num += 1
        self._data = open(os.path.join(self.root, cs.data_file_name(self._num)), "ab")
        self._pos = 0
        fsync_dir(os.path.join(self.root, cs.DATA_DIR))

    def commit(self) -> None:
        """Make every queued entry durable: fsync the data, then append + fsync their index lines."""
        self._last_commit = time.monotonic()
        if not self._pending:
            return
        self._data.flush()
        os.fsync(self._data.fileno())
        self._index.write(b"".join(self._pending))
        self._index.flush()
        os.fsync(self._index.fileno())
        self._committed.update(dict.fromkeys(self._pending_ids))
        self._pending, self._pending_ids = [], set()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.commit()
        finally:
            self._data.close()
            self._index.close()
            self._lock.close()
            self.closed = True

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
