"""The one rule for the metrics of a result, at the site before it leaves and at the leaderboard before it counts:
every declared metric, each a finite number within its declared range, and nothing else."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from contracts.messages import MetricSpec


class MetricsRefused(ValueError):
    """Metrics that break the rule; `check` names the rule. Each side words its refusal itself, the site without
    the values a container wrote (they never leave it), the leaderboard with them (they came signed)."""

    check: str


class MetricNamesRefused(MetricsRefused):
    check = "metric_names"

    def __init__(self, missing: list[str], undeclared: list[str], declared: list[str]) -> None:
        super().__init__(f"missing {missing}, undeclared {undeclared}; the benchmark declares {declared}")
        self.missing, self.undeclared, self.declared = missing, undeclared, declared


class MetricValueRefused(MetricsRefused):
    check = "metric_value"

    def __init__(self, spec: MetricSpec, value: object, *, finite: bool) -> None:
        rule = f"within its declared range [{spec.minimum}, {spec.maximum}]" if finite else "a finite number"
        super().__init__(f"metric {spec.name!r} must be {rule}")
        self.spec, self.value, self.finite = spec, value, finite


def checked_metrics(values: Mapping[str, object], declared: Sequence[MetricSpec]) -> dict[str, float]:
    """`values` as floats when they keep the rule, else the MetricsRefused that says which part they break."""
    names = [spec.name for spec in declared]
    missing, undeclared = sorted(set(names) - set(values)), sorted(set(values) - set(names))
    if missing or undeclared:
        raise MetricNamesRefused(missing, undeclared, sorted(names))
    checked: dict[str, float] = {}
    for spec in declared:
        value = values[spec.name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise MetricValueRefused(spec, value, finite=False)
        if not spec.minimum <= value <= spec.maximum:
            raise MetricValueRefused(spec, value, finite=True)
        checked[spec.name] = float(value)
    return checked
