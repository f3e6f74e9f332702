"""pyflakes over every package (pyproject's package-dir), tests and bench: an unused import, an undefined name
or a shadowed one fails the suite instead of waiting for someone to run the linter."""
from __future__ import annotations

import io
import tomllib
from pathlib import Path

from pyflakes.api import checkRecursive
from pyflakes.reporter import Reporter

ROOT = Path(__file__).resolve().parents[1]


def linted() -> list[str]:
    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    return [str(ROOT / folder) for folder in sorted({*folders, "tests", "bench"})]


def test_pyflakes_finds_nothing_in_the_packages_tests_and_bench():
    out = io.StringIO()
    checkRecursive(linted(), Reporter(out, out))
    assert out.getvalue() == ""


def test_the_lint_covers_every_package_and_would_report_a_message(tmp_path):
    assert {Path(p).name for p in linted()} >= {"meterline", "schemas", "streams", "sql", "app", "tests", "bench"}
    (tmp_path / "bad.py").write_text("import os\n")
    out = io.StringIO()
    assert checkRecursive([str(tmp_path)], Reporter(out, out)) == 1 and "'os' imported but unused" in out.getvalue()
