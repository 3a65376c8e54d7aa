"""`make test-fast`, the contributors' inner loop the README documents, selects what it says: the
in-process tests, stores and engine, and none of the multi-process drills, browser, deploy or compile tests."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_make_test_fast_leaves_out_the_drills_the_browser_deploy_and_compile():
    markers = re.search(r"^FAST_MARKERS := (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert markers is not None
    kept = {"tests/test_jobstore_conformance.py", "tests/test_errors.py", "tests/test_speed.py"}
    left_out = {"tests/test_fleet.py", "tests/test_crash_loop.py", "tests/test_playground.py",
                "tests/test_helm_chart.py", "tests/test_deploy_files.py"}
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                "-m", markers.group(1), *sorted(kept | left_out)],
                               cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    ids = [line for line in collected.stdout.splitlines() if "::" in line]
    files = {test_id.split("::")[0] for test_id in ids}
    assert files == kept, files
    assert not [test_id for test_id in ids if "compiles" in test_id or "compiled_slots" in test_id]
    assert "make test-fast" in (ROOT / "README.md").read_text()
