"""The Grafana dashboard (ops/grafana/outboxd-dashboard.json) and the Prometheus
alerting rules (ops/prometheus/outboxd-alerts.yml) checked against what outboxd
really exports: the metric names come from the real OpenTelemetry SDK and
Prometheus exporter (daemon.telemetry.Metrics, one value recorded on every
instrument, rendered as /metrics renders it), and every name and label in every
PromQL expression must be one of them. The rules also pass `promtool check
rules` and the promtool unit tests in ops/prometheus/outboxd-alerts.test.yml.

promtool is required (CI installs it: apt-get install prometheus); without it
these tests fail, unless OUTBOXD_SKIP_PROMTOOL=1."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

from daemon.telemetry import INSTRUMENTS, PREFIX, Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "ops" / "grafana" / "outboxd-dashboard.json"
RULES = ROOT / "ops" / "prometheus" / "outboxd-alerts.yml"
RULE_TESTS = ROOT / "ops" / "prometheus" / "outboxd-alerts.test.yml"

# Prometheus' own series the files may use besides what outboxd exports.
PROMETHEUS_OWN = frozenset({"up"})
# Target labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
JOB_CONVENTION = 'job=~"outboxd.*"'

# The alerts operators rely on (see the brief in the rules file's header).
REQUIRED_ALERTS = frozenset({
    "OutboxdLagHigh", "OutboxdLagCritical", "OutboxdDeadLetters", "OutboxdNotReady", "OutboxdDependencyDown",
    "OutboxdRetryStorm", "OutboxdBacklogStalled", "OutboxdConsumerLagGrowing", "OutboxdTargetDown",
    "OutboxdTargetMissing",
})


# --- what outboxd exports ---------------------------------------------------------------------------
# A representative value (and labels) for every instrument; a new instrument
# must be added here, or test_every_instrument_is_exported fails.
COUNTER_LABELS: dict[str, dict[str, str]] = {
    "events_applied": {"op": "upsert", "result": "ok"},
    "embeddings": {"kind": "computed"},
    "retries": {"stage": "batch", "dependency": "qdrant"},  # dependency: being added to the code
    "dependency_wait_seconds": {"dependency": "qdrant"},
    "embedding_budget_wait_seconds": {"reason": "budget", "scope": "database"},
    "dead_letters": {},
    "relay_published": {},
    "consumer_applied": {},
    "verify_chunks_checked": {},
    "verify_drift": {"kind": "stale"},
    "verify_repaired": {},
}
GAUGE_SETTERS = {
    "events_pending": lambda m: m.set_backlog(12, 34.5),
    "lag_seconds": lambda m: m.set_backlog(12, 34.5),
    "consumer_lag": lambda m: m.set_consumer_lag({0: 5, 1: 7}),
    "ready": lambda m: m.set_ready(True),
    "dependency_up": lambda m: m.set_dependency_up("qdrant", True),
    **{name: lambda m: m.set_verify(holder=1, position=0.25, pass_started_timestamp_seconds=1.7e9,
                                    last_pass_timestamp_seconds=1.7e9, expected_pass_seconds=200.0)
       for name in ("verify_holder", "verify_position", "verify_pass_started_timestamp_seconds",
                    "verify_last_pass_timestamp_seconds", "verify_expected_pass_seconds")},
}


@cache
def exposition() -> str:
    """/metrics as outboxd renders it: a MeterProvider with a PrometheusMetricReader
    on a registry of its own (as daemon.telemetry._build makes them), one value
    recorded on every instrument of INSTRUMENTS."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=True)
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry, scope_info_enabled=False)])
    try:
        metrics = Metrics(provider.get_meter("outboxd"), registry)
        missing = []
        for name, (kind, unit, _) in INSTRUMENTS.items():
            if kind == "counter" and name in COUNTER_LABELS:
                getattr(metrics, name).add(1, COUNTER_LABELS[name] or None)
            elif kind == "histogram":
                getattr(metrics, name).record(0.2 if unit == "s" else 10)
            elif kind == "gauge" and name in GAUGE_SETTERS:
                GAUGE_SETTERS[name](metrics)
            else:
                missing.append(f"{name} ({kind})")
        assert not missing, f"give these instruments a representative value in {__name__}: {missing}"
        body, content_type = metrics.render_prometheus()
        assert content_type.startswith("text/plain")
        return body.decode()
    finally:
        provider.shutdown()


@cache
def exported() -> tuple[frozenset[str], frozenset[str]]:
    """(every series name in the exposition: gauges, the _total of counters, the
    _bucket/_sum/_count of histograms; every label name on an outboxd_ series)."""
    from prometheus_client.parser import text_string_to_metric_families

    names: set[str] = set()
    labels: set[str] = set()
    for family in text_string_to_metric_families(exposition()):
        for sample in family.samples:
            names.add(sample.name)
            if sample.name.startswith(PREFIX):
                labels.update(sample.labels)
    return frozenset(names), frozenset(labels)


def known_names() -> frozenset[str]:
    return exported()[0] | PROMETHEUS_OWN


def known_labels() -> frozenset[str]:
    return exported()[1] | TARGET_LABELS


def test_every_instrument_is_exported():
    names, labels = exported()
    for name, (kind, _, _) in INSTRUMENTS.items():
        full = PREFIX + name
        expected = {
            "counter": {f"{full}_total"},
            "histogram": {f"{full}_bucket", f"{full}_sum", f"{full}_count"},
            "gauge": {full},
        }[kind]
        assert expected <= names, (name, sorted(n for n in names if n.startswith(full)))
    # the names the dashboard and the alerts are built on
    assert {
        "outboxd_events_pending", "outboxd_lag_seconds", "outboxd_events_applied_total", "outboxd_embeddings_total",
        "outboxd_encode_seconds_bucket", "outboxd_qdrant_seconds_bucket", "outboxd_batch_size_bucket",
        "outboxd_batch_seconds_bucket", "outboxd_retries_total", "outboxd_dead_letters_total",
        "outboxd_relay_published_total", "outboxd_consumer_applied_total", "outboxd_consumer_lag",
        "outboxd_ready", "outboxd_dependency_up", "outboxd_dependency_wait_seconds_total",
    } <= names
    assert {"op", "result", "kind", "stage", "dependency", "partition", "le"} <= labels
    # no unit suffix doubled or added where it would break the queries
    assert not any(n.endswith(("_seconds_seconds", "_ratio", "_seconds_total_total")) for n in names), sorted(names)


# --- PromQL ----------------------------------------------------------------------------------------
PROMQL_FUNCTIONS = frozenset(
    # aggregation operators
    "sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio "
    # functions
    "abs absent absent_over_time ceil changes clamp clamp_max clamp_min day_of_month day_of_week day_of_year "
    "days_in_month delta deriv exp floor histogram_avg histogram_count histogram_fraction histogram_quantile "
    "histogram_stddev histogram_stdvar histogram_sum holt_winters double_exponential_smoothing hour idelta "
    "increase irate label_join label_replace ln log2 log10 minute month predict_linear rate resets round scalar "
    "sgn sort sort_desc sort_by_label sort_by_label_desc sqrt time timestamp vector year avg_over_time "
    "min_over_time max_over_time sum_over_time count_over_time quantile_over_time stddev_over_time "
    "stdvar_over_time last_over_time present_over_time mad_over_time acos acosh asin asinh atan atanh cos cosh "
    "sin sinh tan tanh deg pi rad start end".split()
)
PROMQL_KEYWORDS = frozenset(
    "and or unless by without on ignoring group_left group_right offset bool atan2 inf nan".split()
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_RANGE = re.compile(r"\[[^\[\]]*\]")  # [5m], [$__rate_interval], subqueries [1h:5m]
_OFFSET = re.compile(r"\boffset\s+-?[0-9A-Za-z_$.]+|@\s*(?:start\(\)|end\(\)|[0-9.]+)")
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+")
_IDENT = re.compile(r"(?<![\w.:$])([A-Za-z_:][A-Za-z0-9_:]*)(?![\w:])(\s*\()?")


class PromQL:
    """The metric names, label names and functions of one PromQL expression, by
    a careful lexical pass: strings (label values, regexes) and Grafana variables
    dropped, label names taken from matchers and by/without/on/ignoring/group_*
    lists, durations and offsets dropped, then every identifier is a function
    (when a '(' follows), a keyword, or a metric name."""

    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.metrics: list[str] = []
        self.labels: set[str] = set()
        self.functions: set[str] = set()
        text = _STRING.sub('""', expr)
        text = _GRAFANA_VAR.sub("", text)
        for body in _MATCHERS.findall(text):
            self.labels.update(_MATCHER_LABEL.findall(body))
        text = _MATCHERS.sub(" ", text)
        for _, names in _GROUPING.findall(text):
            self.labels.update(n.strip() for n in names.split(",") if n.strip())
        text = _GROUPING.sub(" ", text)
        text = _RANGE.sub(" ", text)
        text = _OFFSET.sub(" ", text)
        for ident, call in _IDENT.findall(text):
            if call:
                self.functions.add(ident)
            elif ident.lower() not in PROMQL_KEYWORDS:
                self.metrics.append(ident)

    def problems(self) -> list[str]:
        out = []
        for name in sorted(set(self.metrics) - known_names()):
            out.append(f"unknown metric {name!r} in {self.expr!r}")
        for label in sorted(self.labels - known_labels()):
            out.append(f"unknown label {label!r} in {self.expr!r}")
        for function in sorted(self.functions - PROMQL_FUNCTIONS):
            out.append(f"unknown function {function!r} in {self.expr!r}")
        if not self.metrics:
            out.append(f"no metric in {self.expr!r}")
        return out


@pytest.mark.parametrize(
    "expr, metrics, labels, functions",
    [
        (
            'histogram_quantile(0.95, sum by (le) (rate(outboxd_encode_seconds_bucket{job=~"$job", '
            'instance=~"$instance"}[$__rate_interval])))',
            ["outboxd_encode_seconds_bucket"], {"le", "job", "instance"}, {"histogram_quantile", "sum", "rate"},
        ),
        (
            'max by (job) (outboxd_events_pending{job=~"outboxd.*"}) > 0 unless on (job) '
            'sum by (job) (rate(outboxd_events_applied_total{job=~"outboxd.*", result="ok"}[15m])) > 0',
            ["outboxd_events_pending", "outboxd_events_applied_total"], {"job", "result"}, {"max", "sum", "rate"},
        ),
        (
            "sum(rate(outboxd_batch_size_sum[5m] offset 1h)) / ignoring(le) group_left sum(rate(outboxd_batch_size_count[1h:5m]))"
            " and bool 1e3 > 0x1F",
            ["outboxd_batch_size_sum", "outboxd_batch_size_count"], {"le"}, {"sum", "rate"},
        ),
        (
            'count(outboxd_ready{instance=~"${instance}", x="a{b}c, rate(y)"} == 0) or vector(0)',
            ["outboxd_ready"], {"instance", "x"}, {"count", "vector"},
        ),
        ("absent(up{job=~'outboxd.*'})", ["up"], {"job"}, {"absent"}),
        ("sum without (partition) (outboxd_consumer_lag) @ end()", ["outboxd_consumer_lag"], {"partition"}, {"sum"}),
    ],
)
def test_promql_names(expr, metrics, labels, functions):
    q = PromQL(expr)
    assert q.metrics == metrics and q.labels == labels and q.functions == functions


# --- the dashboard -------------------------------------------------------------------------------
def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict]) -> list[dict]:
    """Every panel, those inside collapsed rows too."""
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(all_panels(panel.get("panels", [])))
    return out


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(.*)\s*,\s*)?([A-Za-z_]\w*)\s*\)\s*$", re.S)


def variable_queries(dashboard: dict) -> list[str]:
    """The PromQL of each query variable (label_values(EXPR, label) -> EXPR, the
    label checked too, by a `sum by (label) (EXPR)` wrapper)."""
    out = []
    for var in dashboard["templating"]["list"]:
        if var.get("type") != "query":
            continue
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        for text in {query, var.get("definition", "")} - {""}:
            m = _LABEL_VALUES.match(text)
            assert m and m.group(1), f"variable {var['name']}: expected label_values(EXPR, label), got {text!r}"
            out.append(f"sum by ({m.group(2)}) ({m.group(1)})")
    return out


def dashboard_problems(dashboard: dict) -> list[str]:
    """Every metric, label and function in the dashboard's PromQL that outboxd
    (or PromQL, or Prometheus) does not have."""
    problems = []
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            problems += [f"panel {panel.get('title')!r}: {p}" for p in PromQL(target.get("expr", "")).problems()]
    for query in variable_queries(dashboard):
        problems += [f"variable: {p}" for p in PromQL(query).problems()]
    return problems


def test_dashboard_is_an_importable_grafana_dashboard():
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36 and dashboard["title"] and dashboard["uid"]
    assert dashboard.get("id") is None  # assigned by the Grafana it is imported into
    (ds_input,) = [i for i in dashboard["__inputs"] if i["name"] == "DS_PROMETHEUS"]
    assert ds_input["type"] == "datasource" and ds_input["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == "${DS_PROMETHEUS}"  # the import's input is used
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"]["uid"] == "${datasource}"
        assert variables[name]["includeAll"] and variables[name]["multi"]


def test_dashboard_panels():
    dashboard = load_dashboard()
    panels = all_panels(dashboard["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    units = set()
    for panel in panels:
        gp = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= gp.keys() and gp["x"] + gp["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        title = panel["title"]
        assert panel.get("description", "").strip(), f"panel {title!r} has no description"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        unit = panel["fieldConfig"]["defaults"].get("unit")
        assert unit, f"panel {title!r} has no unit"
        units.add(unit)
        targets = panel.get("targets") or []
        assert targets, f"panel {title!r} has no targets"
        refs = [t.get("refId") for t in targets]
        assert all(refs) and len(refs) == len(set(refs)), f"panel {title!r}: refIds {refs}"
        for target in targets:
            assert isinstance(target.get("expr"), str) and target["expr"].strip(), f"panel {title!r}: no expr"
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], title
            if "$job" not in target["expr"]:
                pytest.fail(f"panel {title!r}: {target['expr']!r} ignores the $job variable")
    assert {"s", "short", "ops"} <= units
    # the panels the operators asked for
    titles = {p["title"] for p in panels}
    for wanted in ("Backlog", "Lag", "Events applied by op and result", "Embeddings by kind", "Encode seconds",
                   "Qdrant write seconds", "Batch size", "Batch seconds", "Retries by stage and dependency",
                   "Dead letters", "Readiness", "Dependencies", "Relay published", "Consumer applied",
                   "Consumer lag by partition"):
        assert wanted in titles, wanted


def test_dashboard_queries_name_only_exported_metrics():
    assert dashboard_problems(load_dashboard()) == []


def test_every_instrument_is_on_the_dashboard():
    used = set()
    for panel in all_panels(load_dashboard()["panels"]):
        for target in panel.get("targets", []):
            used.update(PromQL(target["expr"]).metrics)
    for name in INSTRUMENTS:
        assert any(u.startswith(PREFIX + name) for u in used), f"{PREFIX + name} is on no panel"


@pytest.mark.parametrize(
    "plant, expected",
    [
        (lambda e: e.replace("outboxd_lag_seconds", "outboxd_lag_secs"), "unknown metric 'outboxd_lag_secs'"),
        (lambda e: e.replace("outboxd_encode_seconds_bucket", "outboxd_encode_seconds"),
         "unknown metric 'outboxd_encode_seconds'"),
        (lambda e: e.replace("outboxd_retries_total", "outboxd_retries"), "unknown metric 'outboxd_retries'"),
        (lambda e: e.replace("by (op, result)", "by (op, outcome)"), "unknown label 'outcome'"),
        (lambda e: e.replace("rate(", "rat("), "unknown function 'rat'"),
    ],
)
def test_the_checker_rejects_what_is_not_exported(plant, expected):
    """A planted name in a copy of the dashboard is caught: the check cannot pass silently."""
    dashboard = copy.deepcopy(load_dashboard())
    planted = 0
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            new = plant(target["expr"])
            planted += new != target["expr"]
            target["expr"] = new
    assert planted, "nothing planted: the dashboard changed, update this test"
    problems = dashboard_problems(dashboard)
    assert any(expected in p for p in problems), problems


def test_the_checker_rejects_an_unknown_metric_in_a_variable():
    dashboard = copy.deepcopy(load_dashboard())
    (job,) = [v for v in dashboard["templating"]["list"] if v["name"] == "job"]
    job["definition"] = job["query"]["query"] = "label_values(outboxd_nonexistent_total, job)"
    assert any("outboxd_nonexistent_total" in p for p in dashboard_problems(dashboard))


# --- the alerting rules -------------------------------------------------------------------------
def load_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_alert_rules_name_only_exported_metrics_and_tell_what_to_do():
    rules = load_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), names
    assert REQUIRED_ALERTS <= set(names), REQUIRED_ALERTS - set(names)
    commands = ("outboxd status", "outboxd dead-letters", "outboxd reconcile --check")
    mentioned = set()
    for rule in rules:
        name = rule["alert"]
        q = PromQL(rule["expr"])
        assert q.problems() == [], name
        # the job convention of the file's header: every selector matches job=~"outboxd.*"
        assert rule["expr"].count(JOB_CONVENTION) == len(q.metrics), f"{name}: every selector needs {JOB_CONVENTION}"
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        annotations = rule["annotations"]
        for key in ("summary", "description", "runbook"):
            assert annotations.get(key, "").strip(), f"{name}: no {key}"
        assert "`outboxd " in annotations["runbook"] or "`curl " in annotations["runbook"], name
        mentioned.update(c for c in commands if c in annotations["runbook"])
    assert mentioned == set(commands)
    header = RULES.read_text().split("groups:", 1)[0]
    assert JOB_CONVENTION in header  # the convention is documented where it is used


def test_the_checker_rejects_an_unknown_metric_in_a_rule():
    rule = next(r for r in load_rules() if r["alert"] == "OutboxdDeadLetters")
    planted = rule["expr"].replace("outboxd_dead_letters_total", "outboxd_deadletters_total")
    assert any("outboxd_deadletters_total" in p for p in PromQL(planted).problems())


# --- promtool ------------------------------------------------------------------------------------
def promtool() -> str:
    path = shutil.which("promtool")
    if path:
        return path
    if os.environ.get("OUTBOXD_SKIP_PROMTOOL") == "1":
        pytest.skip("promtool is not installed and OUTBOXD_SKIP_PROMTOOL=1")
    pytest.fail(
        "promtool is not installed, so the alerting rules cannot be checked. Install it: "
        "`sudo apt-get install -y --no-install-recommends prometheus` (Debian/Ubuntu; CI does this in .ci/run), "
        "or put promtool from a release at https://prometheus.io/download/ on PATH. "
        "To skip these checks instead, set OUTBOXD_SKIP_PROMTOOL=1."
    )


def run_promtool(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_promtool_check_rules():
    done = run_promtool("check", "rules", RULES)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr
    count = int(re.search(r"SUCCESS: (\d+) rules found", done.stdout).group(1))
    assert count == len(load_rules())


def test_promtool_unit_tests_of_the_rules():
    done = run_promtool("test", "rules", RULE_TESTS)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def test_the_rule_unit_tests_cover_firing_and_healthy_cases():
    """The lag and dead-letter alerts are each shown firing on synthetic series and
    silent on healthy ones (exp_alerts: [])."""
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert tests["rule_files"] == [RULES.name]
    cases = [c for t in tests["tests"] for c in t.get("alert_rule_test", [])]
    for alert in ("OutboxdLagHigh", "OutboxdLagCritical", "OutboxdDeadLetters", "OutboxdBacklogStalled"):
        mine = [c for c in cases if c["alertname"] == alert]
        assert any(c.get("exp_alerts") for c in mine), f"{alert} is never shown firing"
        assert any(not c.get("exp_alerts") for c in mine), f"{alert} is never shown silent"


@pytest.mark.parametrize(
    "old, new",
    [
        ('outboxd_lag_seconds{job=~"outboxd.*"}) > 300', 'outboxd_lag_seconds{job=~"outboxd.*"}) > 3000'),
        ('outboxd_dead_letters_total{job=~"outboxd.*"}[15m])) > 0', 'outboxd_dead_letters_total{job=~"outboxd.*"}[15m])) > 5'),
    ],
)
def test_the_rule_unit_tests_catch_a_broken_rule(tmp_path, old, new):
    """The promtool tests would fail if the lag threshold or the dead-letter rule changed."""
    text = RULES.read_text()
    assert old in text
    (tmp_path / RULES.name).write_text(text.replace(old, new))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    done = run_promtool("test", "rules", tmp_path / RULE_TESTS.name)
    assert done.returncode != 0 and "FAILED" in done.stdout + done.stderr, done.stdout
