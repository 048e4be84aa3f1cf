"""The Dockerfiles pass hadolint and end in a command that works (no Docker engine runs here, so lint and the
command itself are what CI can check)."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_cmd_is_glied_help_and_that_command_works(name):
    text = (ROOT / "docker" / name).read_text()
    assert "pip install" in text
    cmds = re.findall(r"^CMD (.+)$", text, flags=re.M)
    assert len(cmds) == 1 and json.loads(cmds[0]) == ["glied", "--help"]
    # the image's CMD, run here through the same entry point the console script calls
    r = subprocess.run([sys.executable, "-c", "import sys; from glied.cli import main; sys.argv[0] = 'glied'; main()",
                        *json.loads(cmds[0])[1:]], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: glied") and "extract" in r.stdout and "caption" in r.stdout


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_lints_clean(name):
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (it comes with `pip install -e .[test]` on x86-64)")
    r = subprocess.run([hadolint, str(ROOT / "docker" / name)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
