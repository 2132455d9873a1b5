"""benchmarks/train_step.py runs end to end (CPU, tiny sizes): eager, compiled, and prmc with its blocks rewritten.

The numbers come from the GPU (benchmarks/results/train_step.md); this proves the script still runs.
fp32 on CPU: transformers' grouped_mm fallback op cannot be compiled there (its backward guards on a
data-dependent size), so the experts run transformers' eager loop, and aot_eager stands in for Inductor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_step_smoke(tmp_path):
    cmd = [
        sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), "--device", "cpu", "--tiny",
        "--configs", "qwen3-30b-a3b", "--compiler", "aot_eager", "--experts", "eager",
        "--steps", "1", "--warmup", "1", "--out", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((tmp_path / "train_step.json").read_text())
    assert [r["mode"] for r in data["rows"]] == ["eager", "inductor", "prmc"]
    prmc_row = data["rows"][-1]
    assert prmc_row["prmc_blocks_rewritten"] >= 4 and prmc_row["prmc_blocks_refused"] == 0
    losses = [r["first_loss"] for r in data["rows"]]
    assert max(losses) - min(losses) < 1e-4 * abs(losses[0]), losses
    assert (tmp_path / "train_step.md").read_text().count("| qwen3-30b-a3b |") == 3

