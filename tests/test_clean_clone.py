"""The clean-clone check (tests/clean_clone.py): snapshots of ``git status`` on a real repository,
and a real pytest session — with and without pytest-xdist — that fails when a test rewrites a
tracked file and passes when it writes only to an ignored folder."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from clean_clone import changes, snapshot

TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path) -> Path:
    r = tmp_path / "clone"
    r.mkdir()
    git(r, "init", "-q")
    (r / ".gitignore").write_text("runs/\n__pycache__/\n")
    (r / "tracked.txt").write_text("original\n")
    (r / "dirty.txt").write_text("committed\n")
    git(r, "add", "-A")
    git(r, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    (r / "dirty.txt").write_text("edited before the session\n")
    return r


def test_snapshot_and_changes(repo, tmp_path):
    before = snapshot(repo)
    assert set(before) == {"dirty.txt"}               # what was already dirty is recorded, not blamed
    (repo / "runs").mkdir()
    (repo / "runs" / "out.json").write_text("{}")      # ignored: fine
    assert changes(before, snapshot(repo)) == []
    (repo / "tracked.txt").write_text("rewritten\n")
    (repo / "new.txt").write_text("new\n")
    (repo / "dirty.txt").write_text("edited again, longer than before\n")
    assert changes(before, snapshot(repo)) == ["dirty.txt", "new.txt", "tracked.txt"]
    assert changes(before, snapshot(repo), allowed=("new.txt", "tracked.txt")) == ["dirty.txt"]
    outside = tmp_path / "plain"
    outside.mkdir()
    assert snapshot(outside) is None                   # not a git checkout: no check


def _session(repo: Path, body: str, *args: str) -> subprocess.CompletedProcess:
    (repo / "conftest.py").write_text(textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from clean_clone import pytest_sessionfinish, pytest_sessionstart
        """))
    (repo / "test_writes.py").write_text(textwrap.dedent(body))
    git(repo, "add", "conftest.py", "test_writes.py")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tests")
    env = {k: v for k, v in os.environ.items() if k not in ("KFAC_LAB_SCREENSHOTS", "PYTEST_ADDOPTS")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                           *args], cwd=repo, capture_output=True, text=True, timeout=120, env=env)


def test_a_session_that_rewrites_a_tracked_file_fails_under_xdist(repo):
    done = _session(repo, """\
        from pathlib import Path
        def test_a(): Path("tracked.txt").write_text("rewritten by a test")
        def test_b(): Path("runs").mkdir(exist_ok=True); Path("runs/b.txt").write_text("fine")
        """, "-n", "2")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "2 passed" in done.stdout
    out = done.stdout
    assert out.count("clean clone") == 1 and "  tracked.txt" in out and "dirty.txt" not in out.split("clean clone")[1]


def test_a_session_that_writes_only_ignored_files_passes(repo):
    done = _session(repo, """\
        from pathlib import Path
        def test_a(tmp_path): (tmp_path / "x").write_text("fine"); Path("runs").mkdir(exist_ok=True)
        """)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "clean clone" not in done.stdout
