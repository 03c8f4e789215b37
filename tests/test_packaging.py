"""The two dependency lists agree, and the package imports cheaply."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-")


def pyproject_deps() -> dict[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    specs = data["project"]["dependencies"] + [s for group in data["project"]["optional-dependencies"].values() for s in group]
    return {_name(s): s.replace(" ", "") for s in specs}


def environment_deps() -> dict[str, str]:
    specs = []
    in_pip = False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("- pip:"):
            in_pip = True
            continue
        if in_pip and stripped.startswith("- ") and not stripped.startswith("- -e"):
            specs.append(stripped[2:])
    return {_name(s): s.replace(" ", "") for s in specs}


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    assert environment_deps() == pyproject_deps()


def test_torch_is_a_range_not_a_pin_for_users():
    assert pyproject_deps()["torch"] == "torch>=2.3"


def test_import_is_light_and_lazy():
    code = "import sys, kfac_lab; print(int('panel' in sys.modules), int('xarray' in sys.modules)); kfac_lab.KFAC"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "0"]
