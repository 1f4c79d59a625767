"""Smoke runs of the branch and compute-start benchmarks (--quick, tiny databases): they run and print numbers.

Each builds a whole zctl repository (zctl init, pgbench -i) once or twice,
so they are slow-marked; bench/RESULTS.md has the full runs.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_bench(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.slow
def test_branch_create_quick() -> None:
    out = run_bench("branch_create.py", "--quick")
    m = re.search(r"^CreateTimeline @head\s+([0-9.]+)\s+[0-9.]+\s+[0-9.]+\s+([0-9.]+)\s", out, re.M)
    assert m, out
    assert 0 < float(m.group(1)) < 1000 and 0 < float(m.group(2)) < 1000, out
    assert re.search(r"^anchor: CreateTimeline median, .* [0-9.]+x", out, re.M), out


@pytest.mark.slow
def test_compute_start_quick() -> None:
    out = run_bench("compute_start.py", "--quick", "--lazy", "--pgbench-seconds", "2")
    m = re.search(r"^1\s+([0-9.]+)\s", out, re.M)
    assert m and float(m.group(1)) > 0, out
    assert re.search(r"^anchor: median time to first answer, ours [0-9.]+ s / vanilla [0-9.]+ s = [0-9.]+x", out,
                     re.M), out
    assert re.search(r"^lazy: median [0-9.]+ s vs full copy [0-9.]+ s", out, re.M), out
    assert re.search(r"^pgbench -c 2 -T 2: lazy [0-9]+ TPS, full copy [0-9]+ TPS", out, re.M), out
