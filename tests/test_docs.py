"""The documentation is self-contained: no tracked file refers to a document the repository does
not contain, every link between our documents resolves (file and heading), and
docs/architecture.md names every module of the package."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from dashboards.conftest import unavailable

ROOT = Path(__file__).resolve().parents[1]

# Documents that live outside the repository (spelled in pieces so this file does not match itself).
OUTSIDE = re.compile("|".join([
    r"\b(?:ALGORITHM|DESIGN)(?:\.md\b|\s*§)",   # the project's private notes
    "STACK" + "_NOTES",
    "shared" + "/paper",
    r"\.\./" + "shared",
]))
# A reference to one of our documents from anywhere: docs/<name>.md[#anchor]
DOC_REF = re.compile(r"(?<![\w/.])docs/([\w.-]+\.md)(?:#([^\s)\]`'\",;|<>]+))?")
# A markdown link or image: [text](target) — the target without a title
MD_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def tracked_files() -> list[Path]:
    if shutil.which("git") is None:
        unavailable("needs git to list the tracked files")  # skips outside CI, fails under CI
    done = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True)
    if done.returncode != 0:
        unavailable("not a git checkout (an unpacked sdist): no tracked files to check")
    return [ROOT / p for p in done.stdout.decode().split("\0") if p and (ROOT / p).is_file()]


def text_of(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:4096]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def slug(heading: str) -> str:
    """The anchor GitHub gives a markdown heading: lower case, punctuation dropped, spaces → '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    out, in_code = set(), False
    for line in md.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            out.add(slug(m.group(1)))
    return out


def test_slug_follows_github():
    assert slug("The step: α and μ") == "the-step-α-and-μ"
    assert slug("λ: Levenberg–Marquardt") == "λ-levenbergmarquardt"
    assert slug("The `kfac-lab` command") == "the-kfac-lab-command"


def test_no_tracked_file_refers_to_a_document_outside_the_repository():
    bad = []
    for path in tracked_files():
        text = text_of(path)
        if text is None:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not bad, ("these lines refer to documents the repository does not contain; point them at "
                     "docs/ (docs/algorithm.md, docs/conventions.md, docs/architecture.md, …) or cite the "
                     "paper as 'M&G 2015 §N':\n" + "\n".join(bad))


def test_references_to_our_docs_resolve():
    bad = []
    cache: dict[Path, set[str]] = {}
    for path in tracked_files():
        text = text_of(path)
        if text is None:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            for m in DOC_REF.finditer(line):
                target = ROOT / "docs" / m.group(1)
                where = f"{path.relative_to(ROOT)}:{n}: docs/{m.group(1)}"
                if not target.is_file():
                    bad.append(f"{where}: no such document")
                    continue
                anchor = (m.group(2) or "").rstrip(".")
                if anchor and anchor not in cache.setdefault(target, anchors(target)):
                    bad.append(f"{where}#{anchor}: no such heading")
    assert not bad, "references to missing documents or headings:\n" + "\n".join(bad)


def test_markdown_links_resolve():
    bad = []
    for path in tracked_files():
        if path.suffix != ".md":
            continue
        text = path.read_text(encoding="utf-8")
        for n, line in enumerate(text.splitlines(), 1):
            for m in MD_LINK.finditer(line):
                target = m.group(1)
                if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: …
                    continue
                file_part, _, anchor = target.partition("#")
                dest = (path.parent / file_part).resolve() if file_part else path
                where = f"{path.relative_to(ROOT)}:{n}: ({target})"
                if not dest.exists():
                    bad.append(f"{where}: no such file")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    bad.append(f"{where}: no such heading")
    assert not bad, "markdown links to missing files or headings:\n" + "\n".join(bad)


def test_architecture_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    sections = re.split(r"\n(?=#{2,3} )", text)
    missing = []
    for path in sorted((ROOT / "kfac_lab").rglob("*.py")):
        rel = path.relative_to(ROOT / "kfac_lab")
        if len(rel.parts) == 1:
            section = next(s for s in sections if s.startswith("## The package"))
        else:
            pkg = rel.parts[0]
            if rel.name == "__init__.py" and pkg != "data":
                continue
            section = next((s for s in sections if s.startswith("### ") and f"`{pkg}/`" in s.splitlines()[0]), "")
        if f"`{rel.name}`" not in section and f"`{rel.as_posix()}`" not in section:
            missing.append(str(rel))
    assert not missing, ("docs/architecture.md does not say what these files hold (add a row to their "
                         "package's table): " + ", ".join(missing))
