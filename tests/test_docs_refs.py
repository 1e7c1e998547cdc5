"""The project's references resolve inside the repository.

Code comments cite the math as "docs/math.md §N", and docs/math.md names, for every formula,
the rpgrl function that computes it. A reader (or a user of the installed package) must be
able to follow each of these: no pointer to a file outside the checkout, no section number
that docs/math.md lacks, no function name that does not exist.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
MATH = REPO / "docs" / "math.md"

#: Where readers meet references: the package, the docs and the README.
SHIPPED = sorted(REPO.joinpath("rpgrl").rglob("*.py")) + sorted(REPO.joinpath("docs").rglob("*.md")) + [
    REPO / "README.md"
]
#: Everything that may cite docs/math.md sections.
CITING = SHIPPED + sorted(
    p for d in ("tests", "benchmarks", "examples", "configs") for p in REPO.joinpath(d).rglob("*")
    if p.suffix in (".py", ".md", ".sh", ".yaml")
)

OUTSIDE = re.compile(r"\.\./shared\b|\bshared/(?:spec|notes|data)\b")
SECTION_NUM = r"\d+(?:\.\d+)*"
#: "§2", "§2-4", "§1.1"
SECTION_REF = re.compile(rf"§({SECTION_NUM})(?:-({SECTION_NUM}))?")
#: "docs/math.md §5 and §7", "math.md §2 / §4.1", "docs/math.md §1.1, mode 1", across line breaks.
MATH_REF = re.compile(rf"math\.md((?:\s*(?:,|/|and|or)?\s*§{SECTION_NUM}(?:-{SECTION_NUM})?)+)")
#: The old way of citing the internal notes, which a reader cannot open.
OLD_SPEC = re.compile(r"\bspec\s+(?:sections?|Sec\.)\s*\d|\bspec\s+\d|\bthe spec's\b|\b(?:in|of) the spec\b")
#: A name cited by docs/math.md: `rpgrl.module.function` (also `module.Class.method`).
CODE_NAME = re.compile(r"`(rpgrl(?:\.[A-Za-z_]\w*)+)")


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO))


def _sections() -> set[str]:
    heads = re.findall(rf"^#{{2,3}} ({SECTION_NUM})\.? ", MATH.read_text(encoding="utf-8"), flags=re.M)
    return set(heads)


def _cited(lo: str, hi: str | None) -> list[str]:
    """The sections one reference names: "2-4" is 2, 3, 4; "1.1" is itself."""
    if hi is None:
        return [lo]
    if lo.isdigit() and hi.isdigit():
        return [str(n) for n in range(int(lo), int(hi) + 1)]
    return [lo, hi]


def _resolve(name: str):
    """Walk ``name`` from the package down: submodules of a package by import (a package may
    re-export a function under its module's name, e.g. ``rpgrl.losses.aggregate``), anything
    else by getattr."""
    parts = name.split(".")
    obj, path = importlib.import_module(parts[0]), parts[0]
    for part in parts[1:]:
        path = f"{path}.{part}"
        if isinstance(obj, ModuleType) and hasattr(obj, "__path__"):
            try:
                obj = importlib.import_module(path)
                continue
            except ModuleNotFoundError as exc:
                if exc.name != path:  # the submodule exists but one of its imports is missing
                    raise
        obj = getattr(obj, part)
    return obj


def test_math_doc_has_the_section_numbering_the_code_cites():
    assert MATH.is_file(), "docs/math.md is missing"
    assert {"1", "1.1", "2", "3", "4", "4.1", "5", "6", "7", "8", "9"} <= _sections()


def test_no_shipped_file_points_outside_the_repository():
    bad = [f"{_rel(p)}:{i}: {line.strip()}"
           for p in SHIPPED for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
           if OUTSIDE.search(line)]
    assert not bad, "references to files outside the checkout:\n" + "\n".join(bad)


def test_no_shipped_file_cites_the_unpublished_spec():
    bad = [f"{_rel(p)}:{i}: {line.strip()}"
           for p in SHIPPED for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
           if OLD_SPEC.search(line)]
    assert not bad, "cite docs/math.md §N (or the paper) instead:\n" + "\n".join(bad)


def test_every_cited_section_exists():
    sections = _sections()
    bad, n_refs = [], 0
    for p in CITING:
        if p == MATH:
            continue
        text = p.read_text(encoding="utf-8")
        for m in SECTION_REF.finditer(text):
            n_refs += 1
            missing = [s for s in _cited(m.group(1), m.group(2)) if s not in sections]
            if missing:
                line = text.count("\n", 0, m.start()) + 1
                bad.append(f"{_rel(p)}:{line}: {m.group(0)} (docs/math.md has no §{', §'.join(missing)})")
    assert n_refs > 100, f"only {n_refs} section references found: is the pattern still right?"
    assert not bad, "\n".join(bad)


def test_section_signs_in_the_code_name_their_document():
    """A bare "§6" in a comment does not say which document it means: the package must write
    "docs/math.md §6" (ranges and lists such as "§5 and §7" may share one prefix)."""
    bad = []
    for p in sorted(REPO.joinpath("rpgrl").rglob("*.py")):
        text = p.read_text(encoding="utf-8")
        covered = sum(len(SECTION_REF.findall(m.group(1))) for m in MATH_REF.finditer(text))
        if covered != len(SECTION_REF.findall(text)):
            bad.append(f"{_rel(p)}: {len(SECTION_REF.findall(text))} section signs, "
                       f"{covered} inside a docs/math.md reference")
    assert not bad, "\n".join(bad)


def test_every_function_named_by_the_math_doc_exists():
    text = MATH.read_text(encoding="utf-8")
    names = sorted(set(CODE_NAME.findall(text)))
    assert len(names) >= 30, names
    missing = []
    for name in names:
        try:
            _resolve(name)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{name}: {exc!r}")
    assert not missing, "docs/math.md names code that does not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("section", ["1", "1.1", "2", "3", "4", "4.1", "5", "6", "7", "8", "9"])
def test_every_section_names_its_code(section):
    """Each section of the math doc leads to at least one function of rpgrl."""
    text = MATH.read_text(encoding="utf-8")
    parts = re.split(rf"^#{{2,3}} ({SECTION_NUM})\.? ", text, flags=re.M)
    bodies = dict(zip(parts[1::2], parts[2::2]))
    assert CODE_NAME.search(bodies[section]), f"docs/math.md §{section} names no rpgrl function"
