"""Checkpoints of every trained part: one file rule, one loader, one run-folder resolver.

A glied checkpoint is ``torch.save`` of a plain dict ``{"format": NAME, "version": N, ...}`` holding only
tensors and JSON-able values. It is written atomically (:func:`glied.fileio.write_atomic`: a reader sees the
old file or the whole new one) and read with ``torch.load(weights_only=True)``, so loading never runs code.
Each part has its :class:`Format`:

==================  ===============  =========================  ===============================
part                format name      run-folder file(s)         written by
==================  ===============  =========================  ===============================
region detector     glied-bottomup   checkpoint.pt              ``glied train-detector``
attribute words     glied-mil        model.pt (last.pt: resume) ``glied train-attributes``
caption decoder     glied-decoder    best.pt, last.pt           ``glied train``
retrieval model     glied-retrieval  best.pt, last.pt           ``glied train-retrieval``
retrieval index     glied-retrieval- index.pt                   ``glied index``
                    index
==================  ===============  =========================  ===============================

The keys inside each format are documented by the module that owns it:
:mod:`glied.extractors.bottomup.weights`, :mod:`glied.extractors.mil.checkpoint`,
:mod:`glied.models.checkpoint`, :mod:`glied.pipeline.retrieval`.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

from glied.errors import WeightsError
from glied.fileio import write_bytes_atomic


@dataclass(frozen=True)
class Format:
    """One checkpoint format.

    name/version: the ``format``/``version`` keys every file of this format carries.
    what: the part in words, for messages ("bottom-up detector").
    run_files: file names tried, in order, when a run folder is given instead of a file.
    hint: how to make one ("train one with `glied train-detector`"), the fix in every error message.
    unfinished: a file that means "training started but has not finished" when no run file is there.
    """

    name: str
    version: int
    what: str
    run_files: tuple[str, ...]
    hint: str
    unfinished: str | None = None


def resolve(path: str | os.PathLike, fmt: Format) -> Path:
    """A run folder -> its first existing ``fmt.run_files``; a file -> itself. WeightsError naming the path
    and the fix otherwise."""
    p = Path(path)
    if p.is_dir():
        for name in fmt.run_files:
            if (p / name).is_file():
                return p / name
        if fmt.unfinished and (p / fmt.unfinished).is_file():
            raise WeightsError(f"{p}: training has not finished (only {fmt.unfinished}); resume it with --resume "
                               f"or pass {p / fmt.unfinished}")
        raise WeightsError(f"{p}: no {' or '.join(fmt.run_files)} in this {fmt.what} run folder; {fmt.hint}")
    if not p.is_file():
        raise WeightsError(f"{p}: {fmt.what} run folder or checkpoint not found; {fmt.hint}")
    return p


def save(path: str | os.PathLike, obj: dict, fmt: Format) -> None:
    """Write ``{"format", "version", **obj}`` to ``path`` atomically (the folder is created if needed)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {**obj, "format": fmt.name, "version": fmt.version}
    buf = io.BytesIO()          # serialise in memory: a full disk is then an OSError naming the file, which
    torch.save(data, buf)       # torch's own file writer reports as an opaque RuntimeError
    write_bytes_atomic(path, buf.getbuffer())


def load_failure(e: Exception) -> str:
    """One line saying why ``torch.load(weights_only=True)`` refused a file. Torch's own message advises
    loading with ``weights_only=False``, which would run the file's code: it is never repeated."""
    msg = str(e)
    if "weights only load failed" in msg.lower() or "weights_only" in msg:
        return ("it holds Python objects besides tensors and plain settings, and loading those could run "
                "code, so it is refused")
    first = msg.splitlines()[0][:160] if msg else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def load(path: str | os.PathLike, fmt: Format, required: tuple[str, ...] = ()) -> dict:
    """Resolve ``path`` (:func:`resolve`), load it without executing code and check its format, version and
    ``required`` keys; returns the dict with ``"path"`` (the file read) added. WeightsError, naming the file
    and the fix, for anything else."""
    import torch

    p = resolve(path, fmt)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle errors, truncated files, unsafe content: a bad file
        raise WeightsError(f"{p}: cannot load as a glied {fmt.what} checkpoint ({load_failure(e)}); "
                           f"{fmt.hint} or pass another file") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt.name:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise WeightsError(f"{p}: not a glied {fmt.what} checkpoint (format {found!r}, expected {fmt.name!r}); "
                           f"{fmt.hint} or pass another file")
    if obj.get("version") != fmt.version:
        raise WeightsError(f"{p}: {fmt.what} checkpoint version {obj.get('version')} is not the version "
                           f"{fmt.version} this glied reads; {fmt.hint}")
    for key in required:
        if key not in obj:
            raise WeightsError(f"{p}: {fmt.what} checkpoint lacks {key!r}; {fmt.hint}")
    obj["path"] = str(p)
    return obj


# ---- resuming a run ------------------------------------------------------------------------------------------
EXTENDABLE = ("epochs", "scst_epochs")   # the only settings a resume may change: raised, to train longer


def resume_settings(stored: dict, given: dict, *, where: str, flags: dict | None = None,
                    extendable: tuple[str, ...] = EXTENDABLE) -> dict:
    """The settings of a resumed run: the ``stored`` ones, with ``given`` (what the user typed; None = not
    given) checked against them. The one resume rule of every training loop (detector, MIL, decoder):

    * a given value equal to the stored one is fine; an epoch count (``extendable``) may be raised to train
      longer;
    * any other difference is refused with one line naming the flag:
      ``{where}: --lr 0.01 conflicts with the run's stored 0.0005; drop the flag or start a new run``.

    Randomness is restored with the settings: every loop draws its shuffling, augmentation and sampling
    from generators seeded by (stored seed, epoch), so a resumed run repeats the uninterrupted one.
    ``flags`` maps setting names to their flag where it is not ``--`` + name with ``_`` -> ``-``.
    """
    from glied.errors import ConfigError

    out = dict(stored)
    for key, value in given.items():
        if value is None or key not in stored or value == stored[key]:
            continue
        if key in extendable and isinstance(value, int) and value > stored[key]:
            out[key] = value
            continue
        flag = (flags or {}).get(key, "--" + key.replace("_", "-"))
        raise ConfigError(f"{where}: {flag} {value} conflicts with the run's stored {stored[key]}; "
                          f"drop the flag or start a new run")
    return out
