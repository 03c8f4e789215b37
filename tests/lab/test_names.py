"""One name per public class: the new names, and the old spellings as deprecated aliases."""
from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("module,old,new", [
    ("kfac_lab.widgets", "TrainingLab", "TrainingLabWidget"),
    ("kfac_lab.widgets", "FisherExplorer", "FisherExplorerWidget"),
    ("kfac_lab.widgets.training", "TrainingLab", "TrainingLabWidget"),
    ("kfac_lab.widgets.fisher", "FisherExplorer", "FisherExplorerWidget"),
    ("kfac_lab.dashboards", "TrainingLab", "TrainingLabApp"),
    ("kfac_lab.dashboards", "FisherExplorer", "FisherExplorerApp"),
    ("kfac_lab.dashboards.training_lab", "TrainingLab", "TrainingLabApp"),
    ("kfac_lab.dashboards.fisher_explorer", "FisherExplorer", "FisherExplorerApp"),
])
def test_old_names_warn_and_give_the_new_class(module, old, new):
    mod = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=new):
        cls = getattr(mod, old)
    assert cls.__name__ == new
    top = importlib.import_module(module.split(".")[0] + "." + module.split(".")[1])
    assert getattr(top, new) is cls


def test_each_public_class_is_defined_once():
    import ast
    import pathlib

    import kfac_lab

    seen: dict[str, str] = {}
    for path in pathlib.Path(kfac_lab.__file__).parent.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                assert node.name not in seen, f"{node.name} in {seen.get(node.name)} and {path}"
                seen[node.name] = str(path)
