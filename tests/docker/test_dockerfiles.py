"""The Dockerfiles pass hadolint (no Docker engine runs here, so lint is what CI can check)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_lints_clean_and_runs_glied_help(name):
    path = ROOT / "docker" / name
    text = path.read_text()
    assert 'CMD ["glied", "--help"]' in text and "pip install" in text
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (it comes with `pip install -e .[test]` on x86-64)")
    r = subprocess.run([hadolint, str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
