"""Every Python snippet of README.md runs as written: each ```python block in a fresh interpreter,
in an empty temporary directory (so a snippet that writes runs/lab.zarr writes it there), with
warnings of the RuntimeWarning kind — xarray's consolidated-metadata warning among them — as
errors. A README whose snippet needs a name it does not define fails here."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text: str) -> list[str]:
    return [m.group(1) for m in FENCE.finditer(text)]


BLOCKS = python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))


def test_blocks_are_found():
    assert len(BLOCKS) >= 3  # the quick start, the preconditioner, the store in xarray
    assert python_blocks("x\n```python\na = 1\n```\n```bash\nls\n```\n") == ["a = 1\n"]


@pytest.mark.slow
@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}-{b.strip().splitlines()[-1][:30]}" for i, b in enumerate(BLOCKS)])
def test_readme_snippet_runs_as_written(code, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    env.pop("KFAC_LAB_STORE", None)
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"README snippet failed:\n{code}\n--- stderr ---\n{done.stderr[-4000:]}"
