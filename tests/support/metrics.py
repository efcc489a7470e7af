"""What an app measured, read from the test's InMemoryMetricReader: each series of a metric by its attributes, with
its value (a counter's or a gauge's) or its count (a histogram's)."""

from __future__ import annotations

from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

from assay_telemetry.metrics import Metric

Series = tuple[tuple[str, str], ...]  # a series' attributes, sorted


def measured(reader: InMemoryMetricReader, metric: Metric) -> dict[Series, float]:
    found: dict[Series, float] = {}
    data = reader.get_metrics_data()
    for group in data.resource_metrics if data else ():
        for scope in group.scope_metrics:
            for made in scope.metrics:
                if made.name != metric.name:
                    continue
                for point in made.data.data_points:
                    key = tuple(sorted((str(k), str(v)) for k, v in (point.attributes or {}).items()))
                    found[key] = float(point.count if isinstance(point, HistogramDataPoint) else point.value)
    return found


def series(**attributes: str) -> Series:
    """The series of these `assay.*` attributes (`series(outcome="accepted")`)."""
    return tuple(sorted((f"assay.{name}", value) for name, value in attributes.items()))
