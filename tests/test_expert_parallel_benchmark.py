"""benchmarks/expert_parallel.py runs under torchrun on CPU (gloo), writes its JSON, and imports prmc before it
initialises the group."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("world", [2])
def test_benchmark_runs_under_torchrun(tmp_path, world):
    out = tmp_path / "ep.json"
    env = dict(os.environ, PYTHONPATH=ROOT, PRMC_BENCH_CPU="1", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--standalone",
        os.path.join(ROOT, "benchmarks", "expert_parallel.py"), "--small", "--out", str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rep = json.loads(out.read_text())
    assert rep["world"] == world and rep["backend"] == "gloo"
    assert set(rep["variants"]) == {"off", "on-c2"}
    for v in rep["variants"].values():
        assert v["tokens_per_s"] > 0 and v["a2a_ms"] > 0 and v["compute_ms"] > 0 and v["exposed_comm_ms"] >= 0
    assert sum(rep["rows_received_per_rank"]) == world * 64 * 2  # dropless: every routed row arrives


def test_benchmark_binds_no_live_group():
    """The benchmark imports prmc, hence torch.distributed.nn.functional (whose defaults bind group.WORLD), when it
    is imported, before main's init_process_group: imported after it, those defaults pin the gloo group past
    destroy_process_group and its worker threads can abort the process at exit (README, "Expert parallelism")."""
    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); import expert_parallel, torch.distributed as dist; "
        "assert not dist.is_initialized(); assert 'torch.distributed.nn.functional' in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                          text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
