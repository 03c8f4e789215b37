#!/usr/bin/env python
"""Strip outputs from notebooks before they are committed.

    python scripts/strip_notebooks.py                 # strips notebooks/*.ipynb in place
    python scripts/strip_notebooks.py a.ipynb b.ipynb # those files
    python scripts/strip_notebooks.py --check         # exit 1 (naming them) if any needs stripping

Removes every code cell's outputs and execution count, the per-cell execution timings nbclient
and JupyterLab record (``metadata.execution``, ``metadata.ExecuteTime``, ``collapsed``,
``scrolled``) and the notebook-level widget state (``metadata.widgets``); keeps cell tags (the
``parameters`` cell), sources and ids. Idempotent; files already clean are not rewritten.
Needs only the standard library (a notebook is JSON), so it runs before any install.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CELL_META_DROP = ("execution", "ExecuteTime", "collapsed", "scrolled")
NB_META_DROP = ("widgets",)


def strip(nb: dict) -> dict:
    """The notebook (a JSON dict, nbformat 4) without outputs, counts, timings or widget state."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        meta = cell.get("metadata", {})
        for key in CELL_META_DROP:
            meta.pop(key, None)
    for key in NB_META_DROP:
        nb.get("metadata", {}).pop(key, None)
    return nb


def dumps(nb: dict) -> str:
    """Serialise as nbformat does (indent 1, keys sorted, UTF-8 text, trailing newline)."""
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def problems(nb: dict) -> list[str]:
    """What would be stripped, in words (empty: the notebook is clean)."""
    out = []
    for i, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") == "code":
            if cell.get("outputs"):
                out.append(f"cell {i}: {len(cell['outputs'])} output(s)")
            if cell.get("execution_count") is not None:
                out.append(f"cell {i}: execution_count {cell['execution_count']}")
        dropped = [k for k in CELL_META_DROP if k in cell.get("metadata", {})]
        if dropped:
            out.append(f"cell {i}: metadata {dropped}")
    dropped = [k for k in NB_META_DROP if k in nb.get("metadata", {})]
    if dropped:
        out.append(f"notebook metadata {dropped}")
    return out


def default_paths() -> list[Path]:
    return sorted((ROOT / "notebooks").glob("*.ipynb"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook has outputs")
    args = parser.parse_args(argv)
    paths = args.paths or default_paths()
    dirty = 0
    for path in paths:
        text = path.read_text(encoding="utf-8")
        nb = json.loads(text)
        found = problems(nb)
        if args.check:
            if found:
                dirty += 1
                print(f"{path}: needs stripping ({'; '.join(found[:5])}{' …' if len(found) > 5 else ''})")
            continue
        new = dumps(strip(nb))
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"stripped {path}")
    if args.check and dirty:
        print(f"{dirty} notebook(s) have outputs: run `python scripts/strip_notebooks.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
