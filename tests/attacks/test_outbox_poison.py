"""An event the server can never store must not stop a service's outbox: it is set aside, with a dead letter that
says why, and the events staged after it still leave. A real nats-server whose EVENTS stream takes small messages."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nats

from contracts import messages as m
from contracts import subjects
from contracts.streams import STREAMS
from tests.support.federation import PREPARATOR, Federation, next_events

SMALL = 1500  # bytes: what EVENTS takes here; a benchmark with a long description is announced in more


async def test_an_event_too_large_for_its_stream_is_set_aside_and_later_events_still_leave(nats_url: str,
                                                                                        tmp_path: Path) -> None:
    nc = await nats.connect(nats_url)
    [events] = [c for c in STREAMS if c.name == subjects.EVENTS_STREAM]
    await nc.jetstream().update_stream(config=dataclasses.replace(events, max_msg_size=SMALL))
    await nc.close()
    fed = Federation(nats_url, tmp_path, lambda name: f"sqlite+aiosqlite:///{tmp_path / name}.db")
    await fed.start_services()
    try:
        await fed.enrol("owner", m.Role.BENCHMARK_OWNER)
        image = m.ImageRef(digest=PREPARATOR, name="p")
        wordy = m.BenchmarkSpec(benchmark_id="wordy", name="w", description="x" * 2000, preparator=image,
                                reference_model=image, evaluator=image, metrics=(m.MetricSpec(name="auc"),),
                                primary_metric="auc")
        await fed.send(m.RegisterBenchmark(benchmark=wordy), "owner")  # the command fits; its event does not
        await fed.enrol("vendor", m.Role.MODEL_OWNER)
        await fed.send(m.RegisterModel(model_id="after", name="a", image=image), "vendor")

        [letter] = await next_events(nats_url, subjects.dead_letter("registry-outbox"), 1)
        [model] = await next_events(nats_url, subjects.evt("model", "registered"), 1)
    finally:
        await fed.stop()

    assert letter["data"]["subject"] == subjects.evt("benchmark", "registered")
    assert letter["data"]["error"].startswith("the server refused it for good (BadRequestError"), letter["data"]["error"]
    assert model["data"]["model_id"] == "after"  # staged after the one set aside, and it left
