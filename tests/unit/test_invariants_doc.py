"""docs/invariants.md is where the invariants the code cites are defined:
every "invariant N" in the code and tests names one defined there, and every
test it lists as proof exists."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "invariants.md"
CITED = re.compile(r"\binvariants? (\d+)", re.IGNORECASE)


def defined() -> dict[int, str]:
    sections = re.split(r"^## Invariant (\d+): ", DOC.read_text(encoding="utf-8"), flags=re.M)
    return {int(n): body for n, body in zip(sections[1::2], sections[2::2])}


def test_the_doc_defines_invariants_one_to_nine_in_order():
    assert list(defined()) == list(range(1, 10))


def test_every_citation_in_the_code_names_a_defined_invariant():
    numbers = defined()
    citations = []
    for folder in ("daemon", "consumers", "db", "tests"):
        for path in (REPO / folder).rglob("*.py"):
            for n in CITED.findall(path.read_text(encoding="utf-8")):
                citations.append((path.relative_to(REPO), int(n)))
    assert citations, "the scan found no citation at all"
    assert [c for c in citations if c[1] not in numbers] == []


def test_every_test_listed_as_proof_exists():
    listed = re.findall(r"^\s+- (tests/[\w/]+\.py)::(\w+)$", DOC.read_text(encoding="utf-8"), flags=re.M)
    assert len(listed) >= 8
    missing = []
    for file, name in listed:
        path = REPO / file
        functions = {
            node.name for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        } if path.exists() else set()
        if name not in functions:
            missing.append(f"{file}::{name}")
    assert missing == []


def test_each_invariant_names_its_tests():
    for n, body in defined().items():
        assert "- Tests:" in body and "tests/" in body, f"invariant {n} names no test"
