"""Files and folders the stages write honour the umask (no owner-only 0600 files from temporary names), and
every output goes through the one atomic-write helper, which also removes leftovers of interrupted saves."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


def test_make_shapes_and_prepare_honour_the_umask(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    script = (f"import os, sys; os.umask(0o022); from glied.cli import main; "
              f"main(['make-shapes', r'{tmp_path / 'w'}', '--images', '12', '--workers', '1']) if sys.argv[1] == 'w' "
              f"else main(['prepare', r'{tmp_path / 'w' / 'captions.json'}', '--out', r'{tmp_path / 'p'}'])")
    for what in ("w", "p"):
        r = subprocess.run([sys.executable, "-c", script, what], env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
    for root in (tmp_path / "w", tmp_path / "p"):
        modes = _modes(root)
        assert modes and all(m == (0o755 if (root / k).is_dir() else 0o644) for k, m in modes.items()), modes
