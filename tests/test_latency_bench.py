"""bench/latency.py runs end to end on CPU with the tiny model and prints its table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.drill

ROOT = Path(__file__).resolve().parent.parent


def test_latency_bench_smoke():
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "latency.py"), "--size", "128", "--steps", "1", "--requests", "2"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    header, _, row = (line for line in run.stdout.splitlines() if line.startswith("|"))
    assert "claim wait p50 ms" in header and "v1 / engine" in header
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:3] == ["128²", "1", "2"]
    assert all(float(value) >= 0 for value in cells[3:5]) and all(float(value) > 0 for value in cells[5:])
