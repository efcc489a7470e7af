"""One job's trace at its site, against a real nats-server and the real services: the span of the job's delivery
carries the domain (job, benchmark, model, dataset, site, images) as attributes an operator searches by, and each
container run is a child span with its task, image, exit code and outcome; a refused job's span ends in error."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.support.federation import MODEL, Federation, fake_containers, next_events

METRICS = {"auc": 0.8, "sensitivity": 0.7}


async def finished(spans: InMemorySpanExporter, wanted: Callable[[ReadableSpan], bool],
                   count: int) -> list[ReadableSpan]:
    """The `count` spans `wanted` takes, once they ended: a delivery's span ends when its handler returns, after
    what it sent (its result, its dead letter) was stored, so the event that answers it may come first."""
    for _ in range(200):
        if len(found := [s for s in spans.get_finished_spans() if wanted(s)]) >= count:
            return found
        await asyncio.sleep(0.05)
    return [s for s in spans.get_finished_spans() if wanted(s)]


async def test_a_jobs_span_carries_its_domain_and_its_container_runs_are_its_children(federation: Federation):
    spans = InMemorySpanExporter()
    await federation.start_site("site-a", fake_containers(METRICS), spans=spans)
    await federation.benchmark()
    await federation.model("model-1")
    await federation.dataset("site-a", "ds-a")
    [accepted] = await next_events(federation.nats_url, "assay.v1.evt.result.accepted", 1)
    job_id = accepted["data"]["job_id"]

    [delivery] = await finished(spans, lambda s: s.kind is SpanKind.CONSUMER
                                and s.attributes.get("assay.job_id") == job_id, 1)
    recorded = spans.get_finished_spans()
    assert {key: delivery.attributes[f"assay.{key}"] for key in ("benchmark_id", "model_id", "dataset_id",
                                                                  "site_id", "model_image")} == {
        "benchmark_id": "bench", "model_id": "model-1", "dataset_id": "ds-a", "site_id": "site-a",
        "model_image": MODEL}
    runs = [s for s in recorded if s.name.startswith("container ") and s.attributes["assay.job_id"] == job_id]
    assert [s.name for s in runs] == ["container infer", "container evaluate"]
    for run in runs:
        assert run.parent is not None and run.parent.span_id == delivery.context.span_id  # its job's child
        assert run.context.trace_id == delivery.context.trace_id
        assert (run.attributes["assay.outcome"], run.attributes["assay.exit_code"]) == ("ok", 0)
        assert run.end_time > run.start_time  # its duration
    assert runs[0].attributes["assay.image"] == MODEL


async def test_a_refused_jobs_span_ends_in_error_with_the_reason(federation: Federation, tmp_path):
    spans = InMemorySpanExporter()
    (tmp_path / "sites" / "site-a").mkdir(parents=True)
    (tmp_path / "sites" / "site-a" / "policy.toml").write_text('benchmarks = ["another"]\n')
    await federation.start_site("site-a", fake_containers(METRICS), spans=spans)
    await federation.benchmark()
    await federation.model("model-1")
    await federation.dataset("site-a", "ds-a")
    await next_events(federation.nats_url, "assay.v1.dlq.site-site-a-jobs", 2)

    refused = await finished(spans, lambda s: s.kind is SpanKind.CONSUMER
                             and s.attributes.get("assay.outcome") == "dead-lettered", 2)
    assert len(refused) == 2 and all(s.status.status_code is StatusCode.ERROR for s in refused)
    assert all("the site's policy accepts benchmarks ['another']" in (s.status.description or "") for s in refused)
