"""The benchmarks run end to end on CPU: bench/speed.py on the tiny model (`--smoke`), bench/load.py on
the fake engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_speed_bench_smoke(tmp_path):
    out = tmp_path / "speed.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "speed.py"), "--smoke", "--json", str(out)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "| variant | size | s/image |" in run.stdout
    result = json.loads(out.read_text())
    variants = {variant["variant"]: variant for variant in result["variants"]}
    assert list(variants) == ["diffusers", "quality", "balanced", "turbo"]
    for variant in variants.values():
        assert variant["cold_start_s"] > 0
        assert [(row["width"], row["height"]) for row in variant["rows"]] == [(128, 128), (192, 192)]
        assert all(row["seconds"] > 0 and row["speedup"] > 0 for row in variant["rows"])
    assert "fp8" in variants["balanced"]["skipped"]  # needs a GPU
    assert all(row["psnr_db"] is not None and row["ssim"] is not None for row in variants["turbo"]["rows"])
    assert variants["turbo"]["rows"][0]["steps_computed"].endswith("/3")
    http = result["http"]
    assert http["metrics"]["speed_preset"] == http["preset"] == "balanced"
    assert http["http_s"] > 0 and http["engine_s"] > 0


def run_load_bench(*args: str) -> dict[str, str]:
    """bench/load.py on the fake engine, SQLite only; its exit status must be 0 (nothing lost). The row."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load.py"), "--seconds", "2", "--backends", "sqlite", *args],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| backend |"))
    columns = [cell.strip() for cell in lines[header].strip("|").split("|")]
    return dict(zip(columns, (cell.strip() for cell in lines[header + 2].strip("|").split("|")), strict=True))


def test_load_bench_smoke():
    """A few seconds of each mode: every accepted job completes, and the API's CPU per submit is measured."""
    for row in (run_load_bench("--clients", "2"), run_load_bench("--rate", "20")):
        assert row["backend"] == "sqlite" and int(row["submits"]) > 0
        assert int(row["completed"]) == int(row["submits"]) and row["lost"] == "0"
        assert float(row["API CPU ms/submit"]) > 0
    assert row["rate/s"] == "20.0" and row["errors"] == "0"
