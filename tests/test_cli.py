"""The command line: `tiny-model` and `generate` as a user runs them."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

pytestmark = pytest.mark.drill


def fluxserve(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fluxserve", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_tiny_model_then_generate(tmp_path):
    built = fluxserve("tiny-model", str(tmp_path / "tiny"))
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "tiny" / "model_index.json").is_file()
    out = tmp_path / "out.webp"
    run = fluxserve("generate", "a tiny test", "-o", str(out), "--width", "200", "--height", "136",
                    "--steps", "3", "--model", str(tmp_path / "tiny"))
    assert run.returncode == 0, run.stderr
    assert "3/3" in run.stderr  # the progress bar reached the last step
    image = Image.open(out)
    assert image.format == "WEBP" and image.size == (200, 136)


def test_generate_rejects_bad_parameters(tmp_path):
    run = fluxserve("generate", "x", "-o", str(tmp_path / "o.jpg"), "--width", "5000")
    assert run.returncode != 0
    assert "width" in run.stderr
