"""The notebooks: each runs top to bottom, headless, at a reduced size; the committed files carry
no outputs and match their generator (``scripts/make_notebooks.py``).

Execution uses nbclient with the kernel named ``python3`` — resolved to *this* interpreter
(``sys.executable``, the venv's python) through a kernel spec written to a temporary directory,
so neither a ``jupyter kernelspec install`` nor a user's own ``python3`` spec can change which
Python runs them. The reduced sizes are injected as a cell right after each notebook's
``parameters`` cell (as papermill does); nothing in the notebooks reads the environment.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import nbclient  # test extras: nbclient, nbformat, ipykernel (the kernel) — never skipped
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "python3"
CELL_TIMEOUT = 600

#: The sizes the tests run each notebook at (seconds, not the default minute).
SMALL = {
    "00_lecture_tour.ipynb": 'PRESET = "quick"',
    "01_kronecker_factored_fisher.ipynb": "N = 200\nKFAC_STEPS = 2\nLAYERS = [2, 3]",
    "02_inverse_structure.ipynb": "N = 200\nKFAC_STEPS = 2\nLAYERS = [2, 3]",
    "03_autoencoders_race.ipynb": 'PROBLEM = "tiny"\nSECONDS = 1.0\nLIVE_STEPS = 10',
    "04_damping_and_momentum.ipynb": "N = 200\nKFAC_STEPS = 2\nSTEPS = 15\nLIVE_STEPS = 10",
    "05_invariance.ipynb": "STEPS = 5",
}


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def kernel_manager(tmp_path: Path):
    """An async kernel manager for the kernel ``python3`` = this interpreter with ipykernel."""
    import ipykernel  # noqa: F401 - the kernel runs in this interpreter: it must be installed here
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)", "language": "python", "metadata": {"debugger": False},
    }))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=ksm)


def inject(nb, source: str):
    """Insert ``source`` as a code cell right after the cell tagged ``parameters``."""
    idx = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(idx) == 1, "a notebook needs exactly one cell tagged 'parameters'"
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(idx[0] + 1, cell)
    return nb


def execute(path: Path, tmp_path: Path, overrides: str | None = None, timeout: int = CELL_TIMEOUT):
    """Run the notebook in a fresh kernel (cwd: notebooks/); returns the executed notebook."""
    nb = nbformat.read(path, as_version=4)
    if overrides:
        inject(nb, overrides)
    km = kernel_manager(tmp_path)
    client = nbclient.NotebookClient(nb, km=km, kernel_name=KERNEL, timeout=timeout,
                                     resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    finally:
        shutdown(km)
    return nb


def shutdown(km) -> None:
    """nbclient shuts down only the kernels it created itself: stop ours."""
    from jupyter_core.utils import run_sync  # jupyter_core >= 5.4 comes with nbclient

    if run_sync(km.is_alive)():
        run_sync(km.shutdown_kernel)(now=True)


def errors(nb) -> list[str]:
    out = []
    for i, c in enumerate(nb.cells):
        for o in c.get("outputs", []):
            if o.get("output_type") == "error":
                out.append(f"cell {i}: {o.get('ename')}: {o.get('evalue')}")
    return out


# ------------------------------------------------------------------------------ static checks
def test_the_six_notebooks_exist():
    names = [p.name for p in notebook_paths()]
    assert names == sorted(SMALL), names


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_committed_notebooks_have_no_outputs(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name} cell {i} has outputs: run scripts/strip_notebooks.py"
            assert cell["execution_count"] is None, f"{path.name} cell {i} has an execution count"
    assert "widgets" not in nb["metadata"], f"{path.name} carries widget state: run scripts/strip_notebooks.py"


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_notebook_conventions(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == KERNEL
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code"
    intro = nb.cells[0]
    assert intro.cell_type == "markdown" and "arxiv.org/abs/1503.05671" in intro.source


def test_strip_script_check_passes_and_strips(tmp_path):
    script = ROOT / "scripts" / "strip_notebooks.py"
    ok = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # a notebook with outputs, counts and widget state is reported, then stripped, idempotently
    nb = nbformat.read(notebook_paths()[0], as_version=4)
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="hi\n")]
    nb.cells[1].execution_count = 3
    nb.cells[1].metadata["execution"] = {"iopub.status.busy": "2026-01-01"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {}}
    dirty = tmp_path / "dirty.ipynb"
    nbformat.write(nb, dirty)
    bad = subprocess.run([sys.executable, str(script), "--check", str(dirty)], capture_output=True, text=True)
    assert bad.returncode == 1 and "needs stripping" in bad.stdout
    subprocess.run([sys.executable, str(script), str(dirty)], check=True, capture_output=True)
    clean = json.loads(dirty.read_text())
    assert clean["cells"][1]["outputs"] == [] and clean["cells"][1]["execution_count"] is None
    assert "execution" not in clean["cells"][1]["metadata"] and "widgets" not in clean["metadata"]
    assert subprocess.run([sys.executable, str(script), "--check", str(dirty)]).returncode == 0
    assert any("parameters" in c["metadata"].get("tags", []) for c in clean["cells"]), "tags are kept"


def test_notebooks_match_their_generator():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_notebooks.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# ------------------------------------------------------------------------------ execution
def test_kernel_python3_is_this_interpreter(tmp_path):
    """Both ways of resolving ``python3`` give the venv's interpreter: the tests' explicit spec,
    and plain nbclient (what ``pytest --nbmake`` or a user's ``NotebookClient`` does)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    nb.cells.append(nbformat.v4.new_code_cell("import sys, kfac_lab\nprint(sys.executable)"))
    km = kernel_manager(tmp_path)
    try:
        nbclient.NotebookClient(nb, km=km, timeout=120).execute()
    finally:
        shutdown(km)
    assert nb.cells[0].outputs[0]["text"].strip() == sys.executable
    nb.cells[0].outputs = []
    nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=120).execute()
    assert nb.cells[0].outputs[0]["text"].strip() == sys.executable


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL), ids=lambda n: n.split(".")[0])
def test_notebook_runs_top_to_bottom(name, tmp_path):
    path = NOTEBOOKS / name
    t0 = time.perf_counter()
    nb = execute(path, tmp_path, SMALL[name])
    seconds = time.perf_counter() - t0
    assert not errors(nb), errors(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "every code cell ran"
    shown = sum(1 for c in code for o in c.outputs
                if o.get("output_type") in ("display_data", "execute_result")
                and ("application/vnd.plotly.v1+json" in o.get("data", {})
                     or "application/vnd.jupyter.widget-view+json" in o.get("data", {})))
    assert shown >= 1, "the notebook shows at least one figure or widget"
    print(f"{name}: {seconds:.1f} s at the test size")
