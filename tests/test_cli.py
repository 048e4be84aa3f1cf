"""The CLI: fast --help, one-line errors with non-zero exit, the data commands end to end."""
import json
import subprocess
import sys
import time

import pytest


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "glied", *args], capture_output=True, text=True, **kw)


def test_help_does_not_import_torch():
    code = "import sys; from glied.cli import cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False"]
    r = run("--help")
    assert r.returncode == 0 and "make-shapes" in r.stdout and "prepare" in r.stdout


@pytest.mark.timing
def test_help_is_fast():
    """Wall-clock limits: meaningful on an idle machine only, so outside the default run (-m timing)."""
    code = ("import sys, time; t=time.perf_counter(); from glied.cli import cli; "
            "print(time.perf_counter()-t, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    t0 = time.perf_counter()
    r = run("--help")
    assert r.returncode == 0
    assert time.perf_counter() - t0 < 1.5  # interpreter start included
    assert float(out[0]) < 0.3


def test_make_shapes_then_prepare(tmp_path):
    r = run("make-shapes", str(tmp_path / "w"), "--count", "60", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert "wrote 60 images" in r.stdout
    r = run("prepare", str(tmp_path / "w" / "captions.json"), "--out", str(tmp_path / "p"), "--max-length", "24")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert m["dataset"] == "shapes" and m["images_root"] == str((tmp_path / "w").resolve())


def test_bad_input_gives_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    r = run("prepare", str(bad), "--out", str(tmp_path / "p"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert str(bad) in r.stderr and "not valid JSON" in r.stderr
    r = run("make-shapes", str(tmp_path / "w"), "--count", "0")
    assert r.returncode == 2 and "--count must be at least 1" in r.stderr
    r = run("make-shapes", str(tmp_path / "w"), "--images", "0")  # the old name still works, hidden from --help
    assert r.returncode == 2 and "--count must be at least 1" in r.stderr
    assert "--images" not in run("make-shapes", "--help").stdout


def test_omp_wait_policy_spins_only_on_an_idle_machine_with_one_process():
    from glied.cli import omp_wait_policy

    assert omp_wait_policy({}, 0.2, 2) == "ACTIVE"
    assert omp_wait_policy({}, 1.0, 2) == "PASSIVE"               # half the cores busy with other work
    assert omp_wait_policy({}, 3.5, 8) == "ACTIVE"
    assert omp_wait_policy({"WORLD_SIZE": "2"}, 0.0, 16) == "PASSIVE"   # torchrun: several processes
    assert omp_wait_policy({}, None, 2) == "PASSIVE"              # no load average: the safe choice
    assert omp_wait_policy({"OMP_WAIT_POLICY": "active"}, 9.0, 2) == "active"   # the user's value is kept


def test_the_cli_sets_the_policy_before_torch_loads():
    code = ("import os, sys; os.environ.pop('OMP_WAIT_POLICY', None); from glied import cli\n"
            "try:\n    cli.main(['--version'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules; print(os.environ['OMP_WAIT_POLICY'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] in ("ACTIVE", "PASSIVE")
