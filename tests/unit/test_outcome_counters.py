"""Outcome counters are declared, and the process's Stats names the ones it keeps:
a counter that Stats does not know is an error, and a counter renamed on one side
only fails here instead of silently dropping a metric."""
from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from daemon.core.batch import Outcome
from daemon.runtime.batch_policy import Stats

REPO = Path(__file__).resolve().parents[2]


def product_outcomes() -> list[type[Outcome]]:
    """Every Outcome subclass the product defines, found in the source (so one added in
    a module nothing here imports is found too), then imported."""
    found = []
    for path in sorted(p for folder in ("db", "daemon", "consumers") for p in (REPO / folder).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and b.id == "Outcome" for b in node.bases):
                module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                found.append(getattr(importlib.import_module(module), node.name))
    return found


def test_the_product_declares_its_outcomes():
    names = {cls.__name__ for cls in product_outcomes()}
    assert {"ApplyResult", "PublishResult"} <= names, names


def test_stats_keeps_exactly_the_counters_the_outcomes_declare():
    """Renaming a counter on either side (the outcome's field, or the Stats total) fails here."""
    declared = {name for cls in product_outcomes() for name in cls.counters()}
    assert declared == set(Stats.FROM_OUTCOMES), (
        f"outcome counters Stats does not keep: {sorted(declared - set(Stats.FROM_OUTCOMES))}; "
        f"Stats totals no outcome feeds: {sorted(set(Stats.FROM_OUTCOMES) - declared)}")
    stats_fields = {f.name: f for f in fields(Stats)}
    assert set(Stats.FROM_OUTCOMES) <= set(stats_fields), "each name in Stats.FROM_OUTCOMES is a Stats field"


def test_an_outcome_is_summed_into_stats_counter_by_counter():
    from daemon.core.apply import ApplyResult

    stats = Stats()
    stats.add(ApplyResult(upserted=3, payload_only=1, deleted=2, unchanged=4, embedded=2, reused=1, older=5))
    stats.add(ApplyResult(upserted=1))
    assert (stats.upserted, stats.payload_only, stats.deleted, stats.unchanged, stats.embedded, stats.reused,
            stats.older) == (4, 1, 2, 4, 2, 1, 5)


def test_a_counter_stats_does_not_keep_fails_loudly():
    @dataclass
    class Scanned(Outcome):
        scanned: int = 0

    with pytest.raises(TypeError, match=r"Scanned counts 'scanned', which Stats does not keep.*FROM_OUTCOMES"):
        Stats().add(Scanned(scanned=2))


def test_an_outcome_field_that_is_not_a_counter_is_refused_where_it_is_defined():
    with pytest.raises(TypeError, match=r"Labelled\.label is typed str.*must be int"):
        @dataclass
        class Labelled(Outcome):
            label: str = ""


def test_counters_are_the_fields_a_subclass_adds_and_merge_sums_them():
    @dataclass
    class Two(Outcome):
        first: int = 0
        second: int = 0

    assert Two.counters() == ("first", "second") and Outcome.counters() == ()
    one = Two(first=1)
    one.merge(Two(first=2, second=5))
    assert one.counts() == {"first": 3, "second": 5}
