"""pyproject.toml is the one list of dependencies (environment.yml installs from it), and the
package imports cheaply."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml  # PyYAML comes with jupyter_events (jupyterlab) and xarray's stack

ROOT = Path(__file__).resolve().parents[1]
#: What a conda environment may add to pyproject.toml: the interpreter and pip (nothing pip installs).
CONDA_ONLY = {"python", "pip"}


def _name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pyproject_deps() -> dict[str, str]:
    data = pyproject()["project"]
    specs = data["dependencies"] + [s for group in data["optional-dependencies"].values() for s in group]
    return {_name(s): s.replace(" ", "") for s in specs}


def environment() -> tuple[list[str], list[str]]:
    """(conda-level specs, pip lines) of environment.yml."""
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda, pip = [], []
    for item in env["dependencies"]:
        if isinstance(item, dict):
            assert set(item) == {"pip"}, f"environment.yml: unexpected section {item}"
            pip += item["pip"]
        else:
            conda.append(item)
    return conda, pip


def test_environment_yml_installs_the_project_from_pyproject_and_lists_nothing_else():
    conda, pip = environment()
    assert pip == ["-e .[test]"], f"environment.yml's pip section must only install the project: {pip}"
    extras = pyproject()["project"]["optional-dependencies"]
    assert "test" in extras
    names = {_name(s) for s in conda}
    assert names <= CONDA_ONLY, (f"environment.yml lists {sorted(names - CONDA_ONLY)}: add Python packages "
                                 "to pyproject.toml instead (one source of truth)")


def test_environment_python_matches_requires_python():
    conda, _ = environment()
    python = [s for s in conda if _name(s) == "python"]
    assert python == ["python" + pyproject()["project"]["requires-python"]]


def test_jupyterlab_and_the_notebook_tools_are_dependencies():
    deps = pyproject_deps()
    assert {"jupyterlab", "jupytext"} <= set(_name(s) for s in pyproject()["project"]["dependencies"])
    assert {"papermill", "nbstripout", "playwright", "pytest-playwright"} <= set(deps)


def test_torch_is_a_range_not_a_pin_for_users():
    assert pyproject_deps()["torch"] == "torch>=2.3"


def test_import_is_light_and_lazy():
    code = "import sys, kfac_lab; print(int('panel' in sys.modules), int('xarray' in sys.modules)); kfac_lab.KFAC"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "0"]
