"""The metrics catalogue (assay_telemetry.metrics): the names Prometheus gives its series after the collector's
`prometheus` exporter, the dashboard that queries only those, and the configuration that carries them there."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from assay_telemetry import telemetry
from assay_telemetry.messaging import REPLY, destination_name
from assay_telemetry.metrics import (
    CATALOG,
    CONTAINER_RUNS,
    DEAD_LETTERS,
    JOBS,
    OUTBOX_LAG,
    OUTBOX_OLDEST,
    OUTBOX_PENDING,
    PROCESS_DURATION,
    QUEUE,
    RESULTS,
    Kind,
    Meters,
    Metric,
)

OBSERVABILITY = Path(__file__).resolve().parents[2] / "observability"


def test_prometheus_names_follow_the_collectors_exporter() -> None:
    """As pkg/translator/prometheus builds them: `.` to `_`, the unit's word appended (none for `{thing}`), a counter's
    `_total`; a histogram's series are `_bucket`, `_sum` and `_count`."""
    assert {m.name: m.prometheus for m in CATALOG} == {
        "assay.jobs": "assay_jobs",
        "assay.queue.depth": "assay_queue_depth",
        "assay.results": "assay_results_total",
        "assay.container.run.duration": "assay_container_run_duration_seconds",
        "assay.dead_letters": "assay_dead_letters_total",
        "assay.outbox.lag": "assay_outbox_lag_seconds",
        "assay.outbox.pending": "assay_outbox_pending",
        "assay.outbox.oldest_wait": "assay_outbox_oldest_wait_seconds",
        "messaging.process.duration": "messaging_process_duration_seconds",
        "messaging.publish.duration": "messaging_publish_duration_seconds",
    }
    assert OUTBOX_LAG.series == ("assay_outbox_lag_seconds_bucket", "assay_outbox_lag_seconds_sum",
                                 "assay_outbox_lag_seconds_count")
    assert JOBS.labels[:3] == ("assay_state", "assay_benchmark_id", "assay_site_id")
    assert "le" in CONTAINER_RUNS.labels and "le" not in QUEUE.labels


def test_a_metric_the_exporter_would_rename_unexpectedly_is_refused() -> None:
    with pytest.raises(ValueError, match="unit 'jobs'"):
        Metric("assay.x", Kind.GAUGE, "jobs", "a count without braces would become a suffix")
    with pytest.raises(ValueError, match="total and ratio"):
        Metric("assay.total.runs", Kind.COUNTER, "{run}", "the exporter moves total to the end")


def test_only_what_the_catalogue_declares_is_measured() -> None:
    reader = InMemoryMetricReader()
    meters = Meters(MeterProvider(metric_readers=[reader]))
    with pytest.raises(ValueError, match=r"declares no attribute \['assay.job_id'\]"):
        meters.add(RESULTS, attributes={"assay.outcome": "accepted", "assay.job_id": "job-1"})  # one series a job
    with pytest.raises(ValueError, match="is a counter, not a histogram"):
        meters.record(DEAD_LETTERS, 1.0)
    meters.add(DEAD_LETTERS, attributes={"assay.consumer": "leaderboard-results"})
    [metric] = [m for group in reader.get_metrics_data().resource_metrics for scope in group.scope_metrics
                for m in scope.metrics]
    assert (metric.name, metric.unit, metric.data.is_monotonic) == ("assay.dead_letters", "{message}", True)


def test_histograms_have_the_buckets_their_unit_needs() -> None:
    """The SDK's default buckets are for milliseconds; these are seconds, from a fraction to hours."""
    reader = InMemoryMetricReader()
    told = telemetry("site-worker-a", metric_reader=reader)
    told.meters.record(CONTAINER_RUNS, 1500.0, {"assay.task": "infer", "assay.outcome": "ok"})
    [point] = [p for group in reader.get_metrics_data().resource_metrics for scope in group.scope_metrics
               for m in scope.metrics for p in m.data.data_points]
    assert tuple(point.explicit_bounds) == CONTAINER_RUNS.buckets and point.explicit_bounds[-1] >= 3600 * 4


def test_nothing_is_exported_unless_an_endpoint_or_a_reader_is_given() -> None:
    """A site keeps its telemetry at home unless it is configured to send it."""
    quiet = telemetry("site-worker-hospital-a")
    assert not quiet.measured
    assert quiet.tracer_provider.resource.attributes["service.name"] == "site-worker-hospital-a"
    assert telemetry("scheduling", "http://127.0.0.1:4318").measured


def test_a_reply_and_a_key_value_put_are_named_by_their_kind_not_their_one_off_subject() -> None:
    assert destination_name("_INBOX.registry.Xy7Qk.9") == REPLY
    assert destination_name("assay.v1.cmd.registry.register_actor", reply=True) == REPLY
    assert destination_name("$KV.assay-cancelled.hospital-a.job-1") == "$KV.assay-cancelled"
    assert destination_name("assay.v1.jobs.hospital-a") == "assay.v1.jobs.hospital-a"


# --- the dashboard and the configuration that brings the metrics to it ----------------------------------------------

SERIES = {name: metric for metric in CATALOG for name in metric.series}
FUNCTIONS = {"sum", "max", "min", "avg", "count", "rate", "increase", "histogram_quantile", "by", "without",
             "label_values", "on", "ignoring"}


def queries(dashboard: dict) -> list[str]:  # type: ignore[type-arg]
    found = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    return found + [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]


def labels_in(query: str) -> set[str]:
    named = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", query))  # matchers
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", query):
        named |= {label.strip() for label in group.split(",") if label.strip()}
    named |= {label for label in re.findall(r"label_values\(\s*\w+\s*,\s*(\w+)\s*\)", query)}
    return named


def series_in(query: str) -> set[str]:
    """The series a query reads: its words once the label matchers, the ranges, the label lists and the strings are
    gone."""
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|without|on|ignoring)\s*\([^)]*\)|,\s*\w+\s*\)|\"[^\"]*\"", " ", query)
    return {word for word in re.findall(r"\b[a-z_][a-z0-9_]*\b", bare) if word not in FUNCTIONS}


def test_every_metric_and_label_the_dashboard_queries_is_one_the_code_exports() -> None:
    dashboard = json.loads((OBSERVABILITY / "grafana/dashboards/assay-metrics.json").read_text())
    used: set[str] = set()
    for query in queries(dashboard):
        names = series_in(query)
        assert names and names <= set(SERIES), (query, names - set(SERIES))
        allowed = {label for name in names for label in SERIES[name].labels}
        assert labels_in(query) <= allowed, (query, labels_in(query) - allowed)
        used |= {SERIES[name].name for name in names}
    assert used >= {m.name for m in (JOBS, QUEUE, RESULTS, CONTAINER_RUNS, DEAD_LETTERS, OUTBOX_LAG, OUTBOX_PENDING,
                                     OUTBOX_OLDEST, PROCESS_DURATION)}, "a panel for each of the operator's metrics"
    assert any("assay_check" in labels_in(q) for q in queries(dashboard)), "rejected results by check"


def test_the_metrics_travel_from_the_collector_through_prometheus_to_the_dashboard() -> None:
    collector = yaml.safe_load((OBSERVABILITY / "otel-collector.yaml").read_text())
    prometheus = yaml.safe_load((OBSERVABILITY / "prometheus.yaml").read_text())
    [source] = yaml.safe_load((OBSERVABILITY / "grafana/provisioning/datasources/prometheus.yaml").read_text())[
        "datasources"]
    dashboard = json.loads((OBSERVABILITY / "grafana/dashboards/assay-metrics.json").read_text())

    pipeline = collector["service"]["pipelines"]["metrics"]
    assert pipeline["receivers"] == ["otlp"] and pipeline["exporters"] == ["prometheus"]
    exporter = collector["exporters"]["prometheus"]
    assert exporter.get("add_metric_suffixes", True), "the names assay_telemetry.metrics expects carry suffixes"
    assert "namespace" not in exporter, "a namespace would prefix every name the dashboard queries"
    [scrape] = prometheus["scrape_configs"]
    assert scrape["honor_labels"], "job and instance stay as each process named itself"
    assert scrape["static_configs"][0]["targets"] == [f"otel-collector:{exporter['endpoint'].rsplit(':', 1)[1]}"]
    assert (source["type"], source["url"]) == ("prometheus", "http://prometheus:9090")
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {source["uid"]}
    assert all(t["datasource"]["uid"] == source["uid"] for p in dashboard["panels"] for t in p["targets"])
