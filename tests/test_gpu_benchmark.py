"""``benchmarks/gpu.py`` runs end to end: its ``--cpu`` smoke run fits both models plain and with ``recommended()``,
counts the syncs (none on a CPU) and the RecipeWarnings of the healthy fits (none), and times them."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_benchmark_smoke_run_on_cpu():
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--cpu", "--steps", "8",
                          "--sync-steps", "8", "--repeats", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "device: CPU (smoke run)" in text
    assert [m for m in re.findall(r"== (\w+), precision=([\w-]+) ==", text)] == [("cnn", "32-true"),
                                                                              ("transformer", "32-true")]
    assert re.findall(r"false alarm\): (\d+)", text) == ["0", "0"]
    ratios = [float(r) for r in re.findall(r"ratio x(\d+\.\d+) \(repeats", text)]
    assert len(ratios) == 2 and all(r > 0 for r in ratios)
    assert "peak memory" not in text  # no GPU memory on a CPU
