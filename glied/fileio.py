"""Small file helpers shared by every stage: checksums and atomic writes (temporary name, then rename)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable


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


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` into a temporary file beside ``path``, then rename it over ``path``.

    A reader sees either the old file or the complete new one; a failed write leaves no temporary file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(path: str | os.PathLike, obj: object, indent: int | None = None) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent)
    write_atomic(path, write)
