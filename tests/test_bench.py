"""The benchmarks run end to end on CPU: bench/speed.py on the tiny model (`--smoke`), bench/load.py on
the fake engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.drill

ROOT = Path(__file__).resolve().parent.parent


def test_speed_bench_smoke(tmp_path):
    """Two presets on the tiny model in one process (a GPU run takes one per command), turbo's step cache
    forced to skip, a restart measured in a fresh process, results kept in a file for the next command."""
    out, results = tmp_path / "speed.json", tmp_path / "results" / "runs.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "speed.py"), "--smoke", "--preset", "eager,turbo",
         "--force-skip", "0.5", "--restart", "--json", str(out), "--results", str(results)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "| preset | size | s/image | images/h | × eager | % of floor |" in run.stdout
    runs = {item["label"]: item for item in json.loads(out.read_text())["runs"]}
    assert list(runs) == ["eager", "turbo-forced"]
    for item in runs.values():
        assert item["cold_start_s"] > 0
        [row] = item["rows"]
        assert (row["width"], row["height"]) == (128, 128) and row["seconds"] > 0 and row["speedup"] > 0
        assert row["compiled"] is False and not row["invalid"]  # --smoke does not compile
    turbo = runs["turbo-forced"]
    assert "fp8" in turbo["skipped"] and turbo["forced_skip"] == 0.5  # float8 needs a GPU
    assert turbo["rows"][0]["steps_computed"] == "2/3 forced"
    assert turbo["rows"][0]["psnr_db"] is not None and turbo["rows"][0]["ssim"] is not None  # against eager
    assert turbo["restart"]["process_s"] >= turbo["restart"]["first_image_s"] > 0  # a fresh process
    assert runs["eager"]["restart"] is None  # nothing compiles there
    kept = json.loads(results.read_text())["runs"]
    assert [item["label"] for item in kept] == list(runs)
    assert all((results.parent / item["rows"][0]["image_file"]).is_file() for item in kept)


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


def test_load_bench_runs_a_postgres_fleet():
    """The PostgreSQL fleet of bench/load.py: a private server, processes sharing only its URL."""
    row = run_load_bench("--clients", "2", "--backends", "postgres")
    assert row["backend"] == "postgres" and int(row["submits"]) > 0
    assert int(row["completed"]) == int(row["submits"]) and row["lost"] == "0"
