"""The docs the code cites: every ``docs/methods.md §n`` names a section, every path they name exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SEARCHED = ("safegeom", "analyses", "figures", "benchmarks", "tests", "notebooks")
"""Folders whose files may cite the docs (README.md at the root too)."""
TEXT_SUFFIXES = {".py", ".md", ".ipynb", ".txt", ".toml", ".json"}

SECTION_REF = re.compile(r"docs/methods\.md §(\d+)(?:\s*[–-]\s*§?(\d+))?")
HEADING = re.compile(r"^## (\d+)\. ", re.MULTILINE)
BACKTICKED = re.compile(r"`([A-Za-z0-9_./-]+)`")
# Split so that this file does not match what it looks for.
STALE = re.compile("METHODS" + r"(\.md)? §|" + "DESIGN" + r"\.md|" + "METHODS" + r"\.md")


def _cited_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for folder in SEARCHED:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in TEXT_SUFFIXES and path.is_file() and "__pycache__" not in path.parts:
                files.append(path)
    return [f for f in files if f.resolve() != Path(__file__).resolve()]


def method_sections() -> set[int]:
    """The section numbers of ``docs/methods.md`` (its ``## n. Title`` headings)."""
    return {int(n) for n in HEADING.findall((DOCS / "methods.md").read_text(encoding="utf-8"))}


def section_refs(text: str) -> list[int]:
    """Every section number ``text`` cites as ``docs/methods.md §n`` (both ends of ``§n–m``)."""
    out: list[int] = []
    for first, last in SECTION_REF.findall(text):
        out.append(int(first))
        if last:
            out.append(int(last))
    return out


def test_section_refs_parse_ranges() -> None:
    text = "see docs/methods.md §6–7 and docs/methods.md §12, not METHODS §3"
    assert section_refs(text) == [6, 7, 12]


def test_methods_sections_are_numbered_in_order() -> None:
    sections = sorted(method_sections())
    assert sections == list(range(1, len(sections) + 1))
    assert len(sections) >= 10


def test_every_methods_reference_names_a_section() -> None:
    sections = method_sections()
    missing = []
    n_refs = 0
    for path in _cited_files():
        refs = section_refs(path.read_text(encoding="utf-8", errors="replace"))
        n_refs += len(refs)
        missing += [f"{path.relative_to(ROOT)}: §{n}" for n in refs if n not in sections]
    assert not missing, f"references to sections docs/methods.md lacks: {missing}"
    assert n_refs >= 50, f"only {n_refs} references found: is the pattern still the one used?"


def test_no_reference_to_docs_outside_the_repository() -> None:
    stale = []
    for path in _cited_files():
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
            if STALE.search(line):
                stale.append(f"{path.relative_to(ROOT)}:{i + 1}")
    assert not stale, f"cite docs/methods.md §n or docs/design.md instead: {stale}"


@pytest.mark.parametrize("doc", ["methods.md", "design.md"])
def test_paths_named_in_docs_exist(doc: str) -> None:
    """A backticked path (``safegeom/x.py``, ``train/methods/``) exists from the root or the package."""
    missing = []
    for token in BACKTICKED.findall((DOCS / doc).read_text(encoding="utf-8")):
        if "/" not in token or token.startswith(("-", "http")):
            continue
        path = token.rstrip("/")
        if not ((ROOT / path).exists() or (ROOT / "safegeom" / path).exists()):
            missing.append(token)
    assert not missing, f"{doc} names paths that do not exist: {missing}"


def test_design_maps_every_module_of_the_package() -> None:
    """docs/design.md's module map names each top-level module and subpackage of ``safegeom``."""
    named = set(BACKTICKED.findall((DOCS / "design.md").read_text(encoding="utf-8")))
    missing = []
    for path in sorted((ROOT / "safegeom").iterdir()):
        if path.is_dir() and (path / "__init__.py").is_file():
            key = f"{path.name}/"
        elif path.suffix == ".py" and not path.name.startswith("_"):
            key = path.name
        else:
            continue
        if key not in named:
            missing.append(key)
    assert not missing, f"add these to the module map of docs/design.md: {missing}"
