"""The notebooks: each is a pair (``.ipynb`` + jupytext percent-format ``.py``) holding the same
cells, committed without outputs (nbstripout's rules), and runs top to bottom — headless,
through papermill, at a reduced size given as parameters.

Execution uses papermill (nbclient) with the kernel named ``python3`` resolved to *this*
interpreter (``sys.executable``, the venv's python) through a kernel spec written to a temporary
directory, so neither a ``jupyter kernelspec install`` nor a user's own ``python3`` spec can
change which Python runs them. Executed notebooks go to ``tmp_path``; the kernel's working
directory is a temporary copy of ``notebooks/``: nothing tracked is written.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jupytext
import nbclient  # test extras: nbclient, nbformat, ipykernel (the kernel), papermill — never skipped
import nbformat
import papermill
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "python3"
CELL_TIMEOUT = 600
FORMATS = "ipynb,py:percent"

#: The parameters the tests run each notebook with (seconds, not the default minute).
SMALL = {
    "00_lecture_tour": {"PRESET": "quick"},
    "01_natural_gradient": {"N": 100, "RANDOM_DIRECTIONS": 200},
    "02_kronecker_factored_fisher": {"N": 200, "KFAC_STEPS": 2, "LAYERS": [2, 3]},
    "03_inverse_structure": {"N": 200, "KFAC_STEPS": 2, "LAYERS": [2, 3], "SUBSET": 20},
    "04_damping_and_momentum": {"N": 200, "KFAC_STEPS": 4, "STEPS": 25, "LAB": True, "LIVE_STEPS": 6},
    "05_race": {"PROBLEM": "tiny", "SECONDS": 1.0, "LAB": True, "LIVE_STEPS": 6},
    "06_invariance": {"STEPS": 5},
    "07_convolutions": {"N": 120, "KFAC_STEPS": 1, "TUNE_STEPS": 2, "RACE_STEPS": 4, "SGD_GRID": [0.05],
                        "ADAM_GRID": [1e-3]},
}
#: Text the run must print with those parameters (proof that papermill's values were used).
PRINTS = {
    "02_kronecker_factored_fisher": "200 cases",
    "03_inverse_structure": "200 cases",
    "07_convolutions": "120 cases",
}
#: Executed notebooks whose size is bounded (bytes, at the test size): the figures are block-averaged.
MAX_BYTES = {"07_convolutions": 5_000_000}


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def committed_text(path: Path) -> str:
    """What ``git add`` would store for ``path``: the file itself — or, where ``make setup``
    installed nbstripout's git filter for it, the file as that filter cleans it (a working copy
    run in JupyterLab keeps its outputs; git never sees them)."""
    rel = path.relative_to(ROOT).as_posix()
    attr = subprocess.run(["git", "check-attr", "filter", "--", rel], cwd=ROOT, capture_output=True, text=True)
    clean = subprocess.run(["git", "config", "--get", "filter.nbstripout.clean"], cwd=ROOT, capture_output=True,
                           text=True)
    if attr.stdout.strip().endswith(": nbstripout") and clean.returncode == 0:
        return subprocess.run([sys.executable, "-m", "nbstripout", "-t", str(path)], capture_output=True, text=True,
                              check=True).stdout
    return path.read_text(encoding="utf-8")


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


def shutdown(km) -> None:
    """nbclient shuts down only the kernels it created itself: stop ours."""
    from jupyter_core.utils import run_sync  # jupyter_core >= 5.4 comes with nbclient

    if run_sync(km.is_alive)():
        run_sync(km.shutdown_kernel)(now=True)


def execute(name: str, tmp_path: Path, parameters: dict | None = None, timeout: int = CELL_TIMEOUT):
    """Run ``notebooks/<name>.ipynb`` through papermill with ``parameters`` in a fresh kernel
    (cwd: a temporary copy of notebooks/); returns the executed notebook (written to tmp_path)."""
    workdir = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOKS, workdir)
    km = kernel_manager(tmp_path)
    try:
        return papermill.execute_notebook(
            workdir / f"{name}.ipynb", tmp_path / f"{name}.out.ipynb", parameters=parameters or {},
            kernel_name=KERNEL, km=km, cwd=str(workdir), execution_timeout=timeout, progress_bar=False)
    finally:
        shutdown(km)


# ------------------------------------------------------------------------------ static checks
def test_the_six_notebooks_are_pairs():
    assert [p.stem for p in notebook_paths()] == sorted(SMALL)
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.py")) == sorted(SMALL), "every .ipynb has its .py and back"


def test_jupytext_pairs_the_folder():
    """notebooks/jupytext.toml pairs every notebook there (what JupyterLab's jupytext and
    ``jupytext --sync`` read), without a version stamp that would churn the .py files."""
    from jupytext.config import find_jupytext_configuration_file, load_jupytext_configuration_file

    found = find_jupytext_configuration_file(str(NOTEBOOKS))
    assert found and Path(found).resolve() == (NOTEBOOKS / "jupytext.toml").resolve()
    config = load_jupytext_configuration_file(found)
    assert config.formats in (FORMATS, [FORMATS])


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_pair_holds_the_same_cells(path):
    """The .py is exactly what jupytext writes from the .ipynb (same cells, sources, tags): edit
    either, then save in JupyterLab or run ``jupytext --sync notebooks/*.ipynb``."""
    py = path.with_suffix(".py")
    expected = jupytext.writes(jupytext.read(path), fmt="py:percent")
    assert py.read_text(encoding="utf-8") == expected, (
        f"{py.name} and {path.name} differ: run `.venv/bin/jupytext --sync notebooks/{path.name}` "
        "(the more recently modified file wins)")
    cells = lambda nb: [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in nb.cells]  # noqa: E731
    assert cells(jupytext.read(py)) == cells(jupytext.read(path))


@pytest.fixture(scope="module")
def needs_stripping(tmp_path_factory) -> dict[str, str]:
    """``{name: nbstripout's words}`` for the committed notebooks it would change (one run for all)."""
    folder = tmp_path_factory.mktemp("committed")
    for path in notebook_paths():
        (folder / path.name).write_text(committed_text(path), encoding="utf-8")
    res = subprocess.run([sys.executable, "-m", "nbstripout", "--dry-run", *sorted(map(str, folder.iterdir()))],
                         capture_output=True, text=True, check=True)
    return {Path(line.split()[-1]).name: line for line in res.stdout.splitlines() if line.strip()}


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_committed_notebooks_are_stripped(path, needs_stripping):
    """No outputs, counts, timings or widget state in git: nbstripout would change nothing."""
    nb = json.loads(committed_text(path))
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name} cell {i} has outputs"
            assert cell["execution_count"] is None, f"{path.name} cell {i} has an execution count"
    assert "widgets" not in nb["metadata"], f"{path.name} carries widget state"
    assert path.name not in needs_stripping, (
        f"{needs_stripping.get(path.name)}: run `.venv/bin/nbstripout notebooks/{path.name}` "
        "(`make setup` installs it as a git filter)")


def test_nbstripout_strips_what_a_jupyterlab_session_leaves(tmp_path):
    """The tool the README names removes outputs, counts, timings and widget state and keeps
    the tags (the parameters cell) and the pairing metadata: the committed file comes back."""
    src = notebook_paths()[0]
    nb = nbformat.read(src, as_version=4)
    code = next(c for c in nb.cells if c.cell_type == "code")
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hi\n")]
    code.execution_count = 3
    code.metadata["execution"] = {"iopub.status.busy": "2026-01-01"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {}}
    dirty = tmp_path / src.name
    nbformat.write(nb, dirty)
    verify = [sys.executable, "-m", "nbstripout", "--verify", str(dirty)]
    assert subprocess.run(verify, capture_output=True).returncode == 1, "--verify sees the outputs"
    subprocess.run([sys.executable, "-m", "nbstripout", str(dirty)], check=True)
    # the committed file is clean (test above): equal to it, the stripped copy is clean too
    assert dirty.read_text(encoding="utf-8") == committed_text(src), "stripping restores the committed file"


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_notebook_conventions(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == KERNEL
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code"
    intro = nb.cells[0]
    assert intro.cell_type == "markdown" and "arxiv.org/abs/1503.05671" in intro.source
    params = {}
    exec(tagged[0].source, params)  # noqa: S102 - our own parameters cell: plain assignments
    assert set(SMALL[path.stem]) <= set(params), "the test sizes name parameters the notebook has"


def test_notebooks_link_only_to_files_in_the_repository():
    """Relative links in the markdown resolve to files of the clone (docs/, other notebooks)."""
    import re

    missing = []
    for path in notebook_paths():
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type != "markdown":
                continue
            for target in re.findall(r"\]\(([^)#\s]+)\)", cell.source):
                if "://" not in target and not (NOTEBOOKS / target).exists():
                    missing.append(f"{path.name}: {target}")
    assert not missing, missing


# ------------------------------------------------------------------------------ execution
def test_kernel_python3_is_this_interpreter(tmp_path):
    """Both ways of resolving ``python3`` give the venv's interpreter: the tests' explicit spec,
    and plain nbclient (what ``papermill -k python3`` or a user's ``NotebookClient`` does)."""
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


def errors(nb) -> list[str]:
    return [f"cell {i}: {o.get('ename')}: {o.get('evalue')}" for i, c in enumerate(nb.cells)
            for o in c.get("outputs", []) if o.get("output_type") == "error"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_runs_top_to_bottom(name, tmp_path):
    t0 = time.perf_counter()
    nb = execute(name, tmp_path, SMALL[name])
    seconds = time.perf_counter() - t0
    assert not errors(nb), errors(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "every code cell ran"
    shown = sum(1 for c in code for o in c.outputs
                if o.get("output_type") in ("display_data", "execute_result")
                and ("application/vnd.plotly.v1+json" in o.get("data", {})
                     or "application/vnd.jupyter.widget-view+json" in o.get("data", {})))
    assert shown >= 1, "the notebook shows at least one figure or widget"
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    i = next(k for k, t in enumerate(tags) if "parameters" in t)
    assert "injected-parameters" in tags[i + 1], "papermill put the test's values right after the parameters"
    if name in PRINTS:
        printed = "".join(o.get("text", "") for c in code for o in c.outputs if o.get("output_type") == "stream")
        assert PRINTS[name] in printed, f"the run did not use the injected parameters: {printed[:500]}"
    if name in MAX_BYTES:
        size = (tmp_path / f"{name}.out.ipynb").stat().st_size
        assert size <= MAX_BYTES[name], f"{name} executed is {size:,} bytes"
    print(f"{name}: {seconds:.1f} s at the test size")
