"""Every output file goes through the one atomic-write helper (glied/fileio.py): a process killed in the middle
of a save leaves the previous file whole, and the next run removes the temporary file it left behind."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from glied.errors import InputError
from glied.fileio import atomic_open, write_json_atomic, write_text_atomic

REPO = Path(__file__).resolve().parents[1]


def test_killed_save_keeps_the_old_file_and_the_next_run_cleans_up(tmp_path):
    target = tmp_path / "metrics_test.json"
    write_json_atomic(target, {"CIDEr": 1.25})
    old = target.read_bytes()
    killer = (f"import os, signal; from glied.fileio import write_atomic\n"
              f"def write(tmp):\n"
              f"    f = open(tmp, 'w'); f.write('{{\"CIDEr\": 0.'); f.flush()\n"
              f"    os.kill(os.getpid(), signal.SIGKILL)\n"
              f"write_atomic(r'{target}', write)\n")
    r = subprocess.run([sys.executable, "-c", killer], env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert r.returncode == -signal.SIGKILL
    assert target.read_bytes() == old                         # never a 0-byte or half-written file
    left = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(".metrics_test.json.")
    r = subprocess.run([sys.executable, "-c", f"from glied.fileio import write_text_atomic; "
                                              f"write_text_atomic(r'{tmp_path / 'report.txt'}', 'ok')"],
                       env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert r.returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics_test.json", "report.txt"]


def test_stream_replaced_only_when_complete(tmp_path):
    p = tmp_path / "failures.jsonl"
    with atomic_open(p) as f:
        f.write('{"id": "a"}\n')
    with pytest.raises(RuntimeError):
        with atomic_open(p) as f:
            f.write('{"id": "b"}\n')
            raise RuntimeError("killed half way")
    assert p.read_text() == '{"id": "a"}\n' and os.listdir(tmp_path) == ["failures.jsonl"]
    with pytest.raises(InputError, match="does not exist"):
        write_text_atomic(tmp_path / "missing" / "x.png", "")


# Writes that are not through the helper: each line below writes into a temporary name the helper gave it.
_WRITE = re.compile(r"\.write_text\(|\.write_bytes\(|imwrite\(|torch\.save\(|np\.savez?\((?!f\b)|pickle\.dump\(|"
                    r"(?<![\w.])open\([^)]*['\"][wax]b?\+?['\"]")
_ALLOWED = {
    "glied/fileio.py": "the helper itself",
    "glied/pipeline/detector.py": "log.jsonl is appended line by line (an append-only log)",
    "glied/extractors/bottomup/parity/make_random_ckpt.py": "a test-support script",
    "glied/datasets/bottomup_files.py": "write_tsv writes the temporary file that export_tsv's write_atomic gives it",
}


def test_no_output_is_written_in_place():
    bad = []
    for path in sorted((REPO / "glied").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel in _ALLOWED:
            continue
        for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#")[0]
            through_helper = "tmp" in code or "buf)" in code          # a temporary name, or memory
            if _WRITE.search(code) and not through_helper and '"""' not in line and "``" not in line:
                bad.append(f"{rel}:{k}: {line.strip()}")
    assert not bad, "write through glied.fileio.write_atomic:\n" + "\n".join(bad)
