"""The README front page and the docs site point at things that exist: README.md stays a front
page (<= 200 lines), its links resolve, every repository path the README and docs/ name (scripts,
benchmarks, evaluations, test files) is there, and no script reaches into tests/ through
sys.path. ``mkdocs build --strict`` itself runs in ``make test`` and ``make docs``."""

from __future__ import annotations

import re

import pytest
from helpers import ROOT

PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]
# A repository path as the docs write it: in backticks or after python/bash, under one of these.
TOP = r"(?:benchmarks|evaluations|experiments|scripts|tests|examples|src/bonefrac)"
PATH = re.compile(rf"(?:`|(?:python3?|bash) )(?P<path>{TOP}/[\w./-]*\w)")
LINK = re.compile(r"\]\((?P<target>[^)#\s]+)(?:#[^)]*)?\)")


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move the detail to docs/"


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = [m["target"] for m in LINK.finditer(text) if "://" not in m["target"]]
    assert targets, "README.md links to no docs page"
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_paths_named_in_the_docs_exist(page):
    text = page.read_text(encoding="utf-8")
    named = {m["path"].rstrip(".") for m in PATH.finditer(text)}
    # placeholders (runs/NAME, shard_*) and paths a command creates are not repository files
    named = {p for p in named if not re.search(r"[A-Z]{3,}|\*|/Results|/runs/", p)}
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"{page.name} names paths that do not exist: {missing}"


def test_no_script_puts_tests_on_sys_path():
    scripts = [p for d in ("benchmarks", "evaluations", "experiments", "scripts")
               for p in (ROOT / d).rglob("*.py")]
    offenders = [str(p.relative_to(ROOT)) for p in scripts
                 if re.search(r"sys\.path\.(insert|append)|sys\.path\s*\[", p.read_text())]
    assert not offenders, f"import shared code from bonefrac.testing instead: {offenders}"
