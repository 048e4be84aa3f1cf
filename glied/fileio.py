"""Small file helpers shared by every stage: checksums and the one atomic write (temporary name, then rename).

Every output file of glied is written through :func:`write_atomic` (or :func:`atomic_open` for a stream and
the ``write_*_atomic`` shorthands), so a process killed mid-write leaves the old file, never a torn one.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator

from glied.errors import InputError


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` with the process umask applied: what ``open()``/``mkdir()`` would give a new file/folder
    (``mkstemp``/``mkdtemp`` give 0600/0700 whatever the umask; files written through them are chmod-ed)."""
    return mode & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it (os.umask(0) would briefly open a window, in which another
    thread could create a world-writable file)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)          # no /proc: the classic read-and-restore, with a safe value in between
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, write: Callable[[str], None], durable: bool = False) -> None:
    """``write(tmp_path)`` into a temporary file beside ``path``, then rename it over ``path``.

    A reader sees either the old file or the complete new one; a failed write leaves no temporary file, and
    the temporary files of saves that were killed (``.NAME.PID.*.tmp`` of a process no longer running) are
    removed the first time this process writes into that folder. The file gets the mode ``open()`` would
    give it (umask honoured). ``durable``: fsync the file and its folder (survives a power loss).
    """
    with _replacing(Path(path), durable) as tmp:
        write(tmp)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kw) -> Iterator[IO]:
    """``with atomic_open(path) as f:`` streams a file (e.g. a log written line by line) to a temporary name;
    ``path`` is replaced only when the block ends without an exception (same rules as :func:`write_atomic`)."""
    with _replacing(Path(path), False) as tmp, open(tmp, mode, **kw) as f:
        yield f


@contextmanager
def _replacing(path: Path, durable: bool) -> Iterator[str]:
    """Yields a temporary name beside ``path``; renames it onto ``path`` when the block ends without an
    exception, removes it otherwise. A full disk is one line naming ``path`` (the old file stays)."""
    tmp = _tmp_beside(path)
    try:
        try:
            yield tmp
            _commit(tmp, path, durable)
        except OSError as e:
            _raise_if_full(e, path)
            raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _raise_if_full(e: OSError, path: Path) -> None:
    """A full disk (or quota, or file-size limit) while saving ``path``: one line naming it; the old file stays."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        raise InputError(f"{path}: could not be saved ({e.strerror}); the previous version is kept. Free some "
                         f"space and run the command again") from None


def _tmp_beside(path: Path) -> str:
    if not path.parent.is_dir():
        raise InputError(f"{path}: the folder {path.parent} does not exist; create it or write elsewhere")
    _remove_stale_tmp(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    return tmp


def _commit(tmp: str, path: Path, durable: bool) -> None:
    os.chmod(tmp, umask_mode())
    if durable:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, durable: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`write_atomic`)."""
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data), durable=durable)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`write_atomic`)."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that a rename or a new file in it survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_CLEANED: set[str] = set()
_TMP_NAME = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")


def _remove_stale_tmp(folder: Path) -> None:
    """Remove ``.NAME.PID.*.tmp`` files left in ``folder`` by saves whose process is gone (once per folder and
    process: a folder of many files is listed once)."""
    key = os.path.abspath(folder)
    if key in _CLEANED or not os.path.isdir(key):
        return
    _CLEANED.add(key)
    with os.scandir(key) as it:
        for e in it:
            m = _TMP_NAME.match(e.name) if e.name.endswith(".tmp") else None
            if m is None or not _pid_gone(int(m.group(1))):
                continue
            try:
                if e.is_file(follow_symlinks=False):
                    os.unlink(e.path)
            except OSError:
                pass


def _pid_gone(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:                 # exists, owned by someone else
        return False
    return False


def write_json_atomic(path: str | os.PathLike, obj: object, indent: int | None = None) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent)
    write_atomic(path, write)
