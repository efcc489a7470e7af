"""Every metric an Assay process exports, named once: its OpenTelemetry name, kind, unit and attributes, the names
Prometheus gives its series after the collector's `prometheus` exporter (what the Grafana dashboard queries), and
`Meters`, the instruments one process makes of them from its own MeterProvider (made there, never at import)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation


class Kind(StrEnum):
    COUNTER = "counter"      # only goes up (a Prometheus counter: `_total`)
    GAUGE = "gauge"          # an observable gauge: what the store says now
    HISTOGRAM = "histogram"  # each measurement counted in its bucket (`_bucket`, `_sum`, `_count`)


# the attributes, with the names the spans use (service_kit.spans), so one vocabulary serves traces and metrics
STATE = "assay.state"
SITE = "assay.site_id"
BENCHMARK = "assay.benchmark_id"
OUTCOME = "assay.outcome"
CHECK = "assay.check"
TASK = "assay.task"
CONSUMER = "assay.consumer"

# what the collector's prometheus exporter appends for a unit (pkg/translator/prometheus); a unit in braces ("{job}",
# a count of things) appends nothing
PROMETHEUS_UNITS = {"s": "seconds", "ms": "milliseconds", "By": "bytes"}
# labels every series has besides its attributes: the process (job = service.namespace/service.name, instance =
# service.instance.id) and the instrumentation scope; a histogram's buckets have `le`
PROMETHEUS_LABELS = ("job", "instance", "otel_scope_name", "otel_scope_version", "otel_scope_schema_url")


@dataclass(frozen=True)
class Metric:
    name: str
    kind: Kind
    unit: str
    description: str
    attributes: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # a histogram's bucket boundaries, in its unit
    source: str = "assay"            # who makes it: assay code, or faststream's telemetry middleware

    def __post_init__(self) -> None:
        if not (self.unit.startswith("{") or self.unit in PROMETHEUS_UNITS):
            raise ValueError(f"{self.name}: unit {self.unit!r} is neither a count in braces nor one of "
                             f"{sorted(PROMETHEUS_UNITS)}")
        if {"total", "ratio"} & set(_tokens(self.name)):
            raise ValueError(f"{self.name}: the prometheus exporter moves or adds the words total and ratio")

    @property
    def prometheus(self) -> str:
        """The metric's name in Prometheus, as the exporter builds it with its default (normalised names, suffixes
        added): runs of anything but letters and digits become one `_`, the unit's word is appended unless the name
        has it, and a counter ends in `_total`."""
        tokens = _tokens(self.name)
        unit = PROMETHEUS_UNITS.get(self.unit, "")
        if unit and unit not in tokens:
            tokens.append(unit)
        if self.kind is Kind.COUNTER:
            tokens.append("total")
        return "_".join(tokens)

    @property
    def series(self) -> tuple[str, ...]:
        """The series names a query may use."""
        if self.kind is Kind.HISTOGRAM:
            return tuple(f"{self.prometheus}_{part}" for part in ("bucket", "sum", "count"))
        return (self.prometheus,)

    @property
    def labels(self) -> tuple[str, ...]:
        """Its label names in Prometheus: each attribute's, with every character but letters, digits and `_` as
        `_`, then those of every series."""
        own = tuple(re.sub(r"[^A-Za-z0-9_]", "_", name) for name in self.attributes)
        return own + PROMETHEUS_LABELS + (("le",) if self.kind is Kind.HISTOGRAM else ())


def _tokens(name: str) -> list[str]:
    return [token for token in re.split(r"[^A-Za-z0-9]+", name) if token]


JOBS = Metric("assay.jobs", Kind.GAUGE, "{job}", "Jobs the scheduler knows, by state (a job retried as a new round "
              "counts as that round)", (STATE, BENCHMARK, SITE))
QUEUE = Metric("assay.queue.depth", Kind.GAUGE, "{job}", "Jobs sent to a site and not finished there: waiting in "
               "its queue (SCHEDULED) or taken by a worker (RUNNING)", (SITE,))
RESULTS = Metric("assay.results", Kind.COUNTER, "{result}", "Results the leaderboard judged: accepted (counted), "
                 "check (a check before joining, verified, never counted) or rejected by the check named",
                 (OUTCOME, CHECK))
CONTAINER_RUNS = Metric("assay.container.run.duration", Kind.HISTOGRAM, "s", "How long each model or evaluator "
                        "container ran at a site, by task and outcome", (TASK, OUTCOME, BENCHMARK, SITE),
                        buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200))
DEAD_LETTERS = Metric("assay.dead_letters", Kind.COUNTER, "{message}", "Messages a consumer gave up on "
                      "(assay.v1.dlq.<consumer>), by consumer", (CONSUMER,))
OUTBOX_LAG = Metric("assay.outbox.lag", Kind.HISTOGRAM, "s", "How long each staged message waited in its service's "
                    "outbox before it was published",
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800))
OUTBOX_PENDING = Metric("assay.outbox.pending", Kind.GAUGE, "{message}", "Messages staged in the outbox and not "
                        "published yet")
OUTBOX_OLDEST = Metric("assay.outbox.oldest_wait", Kind.GAUGE, "s", "How long the oldest message not published yet "
                       "has waited in the outbox (0 when none waits): it grows while the bus is away")

# faststream's telemetry middleware measures every message handled and published (attributes as it sets them)
MESSAGING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 30, 60, 300)
PROCESS_DURATION = Metric("messaging.process.duration", Kind.HISTOGRAM, "s", "How long a handler took, by subject",
                          ("messaging.system", "messaging.destination_publish.name", "error.type"),
                          buckets=MESSAGING_BUCKETS, source="faststream")
PUBLISH_DURATION = Metric("messaging.publish.duration", Kind.HISTOGRAM, "s", "How long a publish took, by subject",
                          ("messaging.system", "messaging.destination.name", "error.type"),
                          buckets=MESSAGING_BUCKETS, source="faststream")

CATALOG = (JOBS, QUEUE, RESULTS, CONTAINER_RUNS, DEAD_LETTERS, OUTBOX_LAG, OUTBOX_PENDING, OUTBOX_OLDEST,
           PROCESS_DURATION, PUBLISH_DURATION)

Reading = list[tuple[float, dict[str, str]]]  # a gauge's values now, each with its attributes


class Meters:
    """The instruments of one process, made on first use from its MeterProvider; only what `CATALOG` declares, with
    the attributes it declares, so the catalogue stays the one list of what is exported."""

    def __init__(self, provider: MeterProvider) -> None:
        self._meter = provider.get_meter("assay")
        self._made: dict[str, Any] = {}

    def add(self, metric: Metric, amount: int = 1, attributes: Mapping[str, str] | None = None) -> None:
        self._instrument(metric, Kind.COUNTER).add(amount, _checked(metric, attributes))

    def record(self, metric: Metric, value: float, attributes: Mapping[str, str] | None = None) -> None:
        self._instrument(metric, Kind.HISTOGRAM).record(value, _checked(metric, attributes))

    def observe(self, metric: Metric, read: Callable[[], Reading]) -> None:
        """A gauge whose values `read` gives whenever the exporter collects (from its own thread: `read` must only
        look at what is in memory)."""
        if metric.kind is not Kind.GAUGE or metric.name in self._made:
            raise ValueError(f"{metric.name} is not a gauge, or is observed already")

        def observations(_: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, _checked(metric, attributes)) for value, attributes in read()]

        self._made[metric.name] = self._meter.create_observable_gauge(
            metric.name, callbacks=[observations], unit=metric.unit, description=metric.description)

    def _instrument(self, metric: Metric, kind: Kind) -> Any:
        if metric.kind is not kind:
            raise ValueError(f"{metric.name} is a {metric.kind.value}, not a {kind.value}")
        if metric.name not in self._made:
            make = self._meter.create_counter if kind is Kind.COUNTER else self._meter.create_histogram
            self._made[metric.name] = make(metric.name, unit=metric.unit, description=metric.description)
        return self._made[metric.name]


def _checked(metric: Metric, attributes: Mapping[str, str] | None) -> dict[str, str]:
    given = dict(attributes or {})
    if undeclared := sorted(set(given) - set(metric.attributes)):
        raise ValueError(f"{metric.name} declares no attribute {undeclared} (assay_telemetry.metrics)")
    return given
