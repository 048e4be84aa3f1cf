"""glied train under torchrun: two CPU processes with the gloo backend keep identical parameters."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

FIXTURES = Path(__file__).with_name("decoder_fixtures.py")
REPO = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent("""
    import importlib.util, os, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    spec = importlib.util.spec_from_file_location("fx", sys.argv[1])
    fx = importlib.util.module_from_spec(spec); spec.loader.exec_module(fx)
    from glied.pipeline.train import train
    root, out = Path(sys.argv[2]), Path(sys.argv[3])
    s = train(root / "prep", fx.MemoryFeatures(root), out / "run",
              fx.tiny_config(epochs=2, scst_epochs=1), log=lambda *_: None)
    rank = dist.get_rank()
    torch.save({"world": s["world_size"], "state": s["decoder"].state_dict()}, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
""")


def test_ddp_two_cpu_processes_keep_parameters_identical(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("fx", FIXTURES)
    fx = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fx)
    fx.make_prepared(tmp_path)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(FIXTURES), str(tmp_path), str(tmp_path)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ck["progress"] == {"xe_done": 2, "scst_done": 1, "step": 4}
    assert all(torch.equal(ck["model"][k], r0["state"][k]) for k in ck["model"])
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[1].split(",")[1] == "xe" and rows[3].split(",")[1] == "scst"
    assert float(rows[2].split(",")[2]) < float(rows[1].split(",")[2])  # XE loss went down: the ranks learned
