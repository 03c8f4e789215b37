"""The suite leaves the clone clean: a pytest plugin (loaded by tests/conftest.py) that records
``git status`` when the session starts and fails the session when it ends with a file changed
that ``.gitignore`` does not cover — a tracked file rewritten, or a new untracked one.

Outputs belong in ``tmp_path`` or an ignored folder (``runs/``); regenerating tracked files is an
explicit command (``make screenshots``, a benchmark's ``--out benchmarks/results/…``). Under
pytest-xdist only the controller checks, once, after every worker has finished. Outside a git
checkout (an unpacked sdist, no git) the check is skipped. Changes under
``$KFAC_LAB_SCREENSHOTS`` (what ``make screenshots`` regenerates on purpose) are allowed.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

__all__ = ["snapshot", "changes", "pytest_sessionstart", "pytest_sessionfinish"]

_KEY = "_kfac_lab_clean_clone"


def snapshot(root: str | Path) -> dict[str, tuple] | None:
    """``{path: (status, size, mtime_ns)}`` of every entry ``git status`` lists under ``root``'s
    checkout (tracked changes, and untracked files not ignored), or None when ``root`` is not in a
    git checkout (or git is missing)."""
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=30)
        if top.returncode != 0:
            return None
        out = subprocess.run(["git", "-C", top.stdout.strip(), "status", "--porcelain=v1", "-z",
                              "--untracked-files=all"], capture_output=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    base = Path(top.stdout.strip())
    entries = out.decode("utf-8", "surrogateescape").split("\0")
    state: dict[str, tuple] = {}
    i = 0
    while i < len(entries):
        item = entries[i]
        i += 1
        if len(item) < 4:
            continue
        code, path = item[:2], item[3:]
        if code[0] in "RC":  # a rename/copy: the next entry is the source path
            i += 1
        try:
            st = (base / path).stat()
            state[path] = (code, st.st_size, st.st_mtime_ns)
        except OSError:
            state[path] = (code, None, None)
    return state


def changes(before: dict[str, tuple], after: dict[str, tuple], allowed: tuple[str, ...] = ()) -> list[str]:
    """Paths whose ``git status`` entry appeared, vanished or changed (content size or time)
    between two snapshots, except those under one of the ``allowed`` prefixes."""
    paths = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    return [p for p in paths if not any(p == a or p.startswith(a.rstrip("/") + "/") for a in allowed)]


def _allowed(base: str) -> tuple[str, ...]:
    where = os.environ.get("KFAC_LAB_SCREENSHOTS", "").strip()
    if not where:
        return ()
    try:
        return (str(Path(where).resolve().relative_to(Path(base).resolve())),)
    except ValueError:
        return ()


def pytest_sessionstart(session) -> None:
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller checks
        return
    root = str(session.config.rootpath)
    setattr(session.config, _KEY, (root, snapshot(root)))


def pytest_sessionfinish(session, exitstatus) -> None:
    recorded = getattr(session.config, _KEY, None)
    if recorded is None or recorded[1] is None:
        return
    root, before = recorded
    after = snapshot(root)
    if after is None:
        return
    top = subprocess.run(["git", "-C", root, "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    changed = changes(before, after, _allowed(top.stdout.strip() or root))
    if not changed:
        return
    lines = ["the test session changed files that git tracks or does not ignore (tests must write to tmp_path "
             "or an ignored folder such as runs/; regenerating tracked files is an explicit command):"]
    lines += [f"  {p}" for p in changed]
    lines.append("(if you edited these yourself while the tests ran, run the suite again)")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.section("clean clone", sep="=", red=True, bold=True)
        for line in lines:
            reporter.write_line(line)
    else:
        print("\n".join(lines))
    if session.exitstatus == 0:
        session.exitstatus = 1
