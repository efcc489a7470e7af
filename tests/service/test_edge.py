"""The kit's one edge, on a probe service: what becomes of a message when its handler succeeds, fails, waits or is
handed something malformed; what a request's reply says; the attempt a delivery is.

The test broker delivers each message once; a later delivery is simulated with the attempt count JetStream puts in
its ack subject. Redelivery itself is tested against a real nats-server in tests/integration.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import pytest
from faststream import Context
from sqlmodel import Field, SQLModel, select

from contracts import messages as m
from contracts.catalog import EVENT_SUBJECTS
from contracts.envelope import Envelope
from service_kit.app import ServiceSettings, service_app
from service_kit.edge import Conflict, Delivery, DeliveryInfo, NotYetKnown, Refused, Retry
from service_kit.wiring import Consumer, Outlet, Request, Wiring
from service_kit.work import UnitOfWork
from tests.support.service import Actors, Harness, running

SUBJECT = EVENT_SUBJECTS[m.BenchmarkApproved]


class ProbeRow(SQLModel, table=True):
    __tablename__ = "probe_row"
    key: str = Field(primary_key=True)


@dataclass
class Probe:
    """What the probe's handlers saw, and what they are told to raise."""

    deliveries: list[DeliveryInfo] = field(default_factory=list)
    raise_: Exception | None = None
    handed: list[object] = field(default_factory=list)  # the envelopes the handlers were given


ProbeDep = Annotated[Probe, Context("probe")]


async def note(approved: Envelope[m.BenchmarkApproved], uow: UnitOfWork, probe: ProbeDep, delivery: Delivery) -> None:
    """Stores a row and stages an event, then raises what it is told to: both must vanish when it does."""
    probe.deliveries.append(delivery)
    probe.handed.append(approved)
    uow.session.add(ProbeRow(key=approved.data.benchmark_id))
    uow.emit(m.AssociationRequested(benchmark_id=approved.data.benchmark_id, kind=m.EntityKind.MODEL,
                                    entity_id="model-1", requested_by="probe"))
    if probe.raise_ is not None:
        raise probe.raise_


async def approve(command: Envelope[m.ApproveBenchmark], uow: UnitOfWork, probe: ProbeDep,
                  delivery: Delivery) -> m.CommandReply:
    probe.deliveries.append(delivery)
    probe.handed.append(command)
    uow.session.add(ProbeRow(key=command.data.benchmark_id))
    if probe.raise_ is not None:
        raise probe.raise_
    return m.CommandReply(ok=True, message=f"done {command.data.benchmark_id}")


async def count(query: Envelope[m.ShowLeaderboard], uow: UnitOfWork, probe: ProbeDep,
                delivery: Delivery) -> m.CommandReply:
    probe.deliveries.append(delivery)
    rows = (await uow.session.exec(select(ProbeRow))).all()
    return m.CommandReply(ok=True, message=f"{len(rows)} rows")


async def strays(approved: Envelope[m.ModelRegistered], uow: UnitOfWork) -> None:
    """Emits what the probe does not declare it publishes."""
    uow.emit(m.LeaderboardUpdated(benchmark_id="b", primary_metric="auc", models=1, model_id="m", rank=1,
                                   pooled={"auc": 0.5}, case_count=1, sites=1))


RETRY = Retry(failures=3, waits=5)
WIRING = Wiring(owner="probe", source="service:probe", retry=RETRY,
                consumers=(Consumer(note), Consumer(strays)), requests=(Request(approve), Request(count)),
                publishes=(Outlet.event(m.AssociationRequested),))


@pytest.fixture
def probe() -> Probe:
    return Probe()


ACTORS = Actors()  # the services' keys, the probe's included


@pytest.fixture
async def service(tmp_path: Path, probe: Probe) -> AsyncIterator[Harness]:
    settings = ServiceSettings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'probe.db'}",
                               **ACTORS.service_settings("probe", tmp_path))
    app = service_app(WIRING, settings, [ProbeRow.__table__], context={"probe": probe})
    async with running(app, ACTORS) as harness:
        yield harness


def approved(benchmark_id: str = "b1") -> Envelope[m.BenchmarkApproved]:
    """An approval as the approval service announces it."""
    return ACTORS.announce(m.BenchmarkApproved(benchmark_id=benchmark_id, approved_by="operator"))


async def rows(service: Harness) -> list[tuple[object, ...]]:
    return (await service.stored())["probe_row"]


# --- durable consumers ------------------------------------------------------------------------------------------


async def test_a_handled_message_commits_its_rows_and_its_events_together(service, probe):
    await service.deliver(SUBJECT, approved(), msg_id="m-1")

    assert await rows(service) == [("b1",)]
    assert [e.benchmark_id for e in service.events(m.AssociationRequested)] == ["b1"]
    [seen] = probe.deliveries
    assert (seen.attempt, seen.subject, seen.message_id) == (1, SUBJECT, "m-1")


async def test_a_body_is_validated_once_the_handler_gets_the_envelope_the_edge_checked(service, probe, monkeypatch):
    """The edge parses and validates a body before anything else; the handler's argument is that very envelope, not a
    second validation of the same bytes (faststream's own decoding would make one)."""
    from service_kit.edge import Route

    checked: list[object] = []
    expect = Route.expect
    monkeypatch.setattr(Route, "expect", lambda route, body: checked.append(expect(route, body)) or checked[-1])
    await service.deliver(SUBJECT, approved(), msg_id="m-1")
    assert (await service.ask(command("b2")))["ok"]

    assert len(checked) == 2 and len(probe.handed) == 2
    assert [handed is edge for handed, edge in zip(probe.handed, checked, strict=True)] == [True, True], (
        [type(h) for h in probe.handed], [type(c) for c in checked])


async def test_a_message_delivered_twice_is_handled_once(service, probe):
    message = approved()
    await service.deliver(SUBJECT, message)
    await service.deliver(SUBJECT, message, attempt=2)  # the ack was lost: the server delivers it again

    assert len(probe.deliveries) == 1
    assert len(service.events(m.AssociationRequested)) == 1


async def test_a_malformed_message_is_dead_lettered_at_once_naming_the_field_and_never_handled(service, probe):
    raw = approved().model_dump(mode="json")
    raw["data"]["benchmark_id"] = "Not An Id"

    await service.deliver(SUBJECT, json.dumps(raw).encode(), msg_id="bad-1")

    [letter] = service.dead_letters()
    assert (letter.consumer, letter.subject, letter.message_id, letter.deliveries) == (
        "probe-benchmark-approved", SUBJECT, "bad-1", 1)
    assert letter.error.startswith("invalid BenchmarkApproved: data.benchmark_id: String should match pattern")
    assert probe.deliveries == [] and await rows(service) == []


async def test_a_body_that_is_not_json_is_dead_lettered_at_once(service, probe):
    await service.deliver(SUBJECT, b"\xff not json")

    [letter] = service.dead_letters()
    assert letter.error.startswith("invalid BenchmarkApproved: (message): Invalid JSON")
    assert probe.deliveries == []


async def test_a_failure_rolls_back_and_is_retried_with_backoff_then_dead_lettered(service, probe, caplog):
    probe.raise_ = RuntimeError("the disk is full")
    message = approved()

    with caplog.at_level(logging.WARNING, logger="service_kit.edge"):
        for attempt in range(1, RETRY.failures):
            await service.deliver(SUBJECT, message, msg_id="m-1", attempt=attempt)
            assert service.dead_letters() == [] and f"attempt {attempt} of {RETRY.failures}" in caplog.text
        assert "delivered again in 0.50 s (attempt 2 of 3)" in caplog.text
        await service.deliver(SUBJECT, message, msg_id="m-1", attempt=RETRY.failures)

    [letter] = service.dead_letters()
    assert (letter.deliveries, letter.error) == (RETRY.failures, "RuntimeError: the disk is full")
    assert await rows(service) == [] and service.events(m.AssociationRequested) == []


async def test_a_message_about_something_not_known_yet_waits_longer_than_a_failure(service, probe, caplog):
    probe.raise_ = NotYetKnown("benchmark b1 is not registered here yet")
    message = approved()

    with caplog.at_level(logging.WARNING, logger="service_kit.edge"):
        await service.deliver(SUBJECT, message, attempt=RETRY.failures)
    assert service.dead_letters() == [] and "attempt 3 of 5" in caplog.text
    await service.deliver(SUBJECT, message, attempt=RETRY.waits)

    [letter] = service.dead_letters()
    assert letter.error == "still unknown after 5 tries: benchmark b1 is not registered here yet"
    assert await rows(service) == []


async def test_a_refusal_is_dead_lettered_at_once(service, probe):
    probe.raise_ = Refused("this can never be done")

    await service.deliver(SUBJECT, approved())

    [letter] = service.dead_letters()
    assert (letter.deliveries, letter.error) == (1, "this can never be done")


async def test_a_delivery_past_the_last_attempt_is_dead_lettered_without_running(service, probe):
    """The server allows one delivery more than the edge uses: a process died during the last attempt."""
    await service.deliver(SUBJECT, approved(), attempt=RETRY.attempts + 1)

    [letter] = service.dead_letters()
    assert letter.deliveries == RETRY.attempts + 1 and "a process stopped during the last" in letter.error
    assert probe.deliveries == []


async def test_staging_on_a_subject_the_service_does_not_declare_fails_and_changes_nothing(service):
    await service.deliver(EVENT_SUBJECTS[m.ModelRegistered], ACTORS.announce(m.ModelRegistered(
        model_id="m", owner_id="o", name="m", image=m.ImageRef(digest="sha256:" + "1" * 64, name="m"))),
        attempt=RETRY.failures)

    [letter] = service.dead_letters()
    assert letter.error == "LookupError: probe does not declare that it publishes on assay.v1.evt.leaderboard.updated"
    assert service.events(m.LeaderboardUpdated) == []


async def test_each_durable_the_server_makes_allows_one_delivery_more_than_the_edge_uses(service):
    durables = {sub.config.durable_name: sub.config for sub in service.broker.subscribers if sub.config.durable_name}

    assert set(durables) == set(WIRING.durables()) == {"probe-benchmark-approved", "probe-model-registered"}
    assert {config.max_deliver for config in durables.values()} == {max(RETRY.failures, RETRY.waits) + 1}


# --- requests ---------------------------------------------------------------------------------------------------


def command(benchmark_id: str = "b1") -> Envelope[m.ApproveBenchmark]:
    return Envelope.wrap(m.ApproveBenchmark(benchmark_id=benchmark_id), source="actor:x")


@pytest.mark.parametrize(("raised", "reply"), [
    (Refused("actor x has role site; this command needs operator"),
     {"ok": False, "retry": False, "message": "actor x has role site; this command needs operator"}),
    (NotYetKnown("key k belongs to no registered actor"),
     {"ok": False, "retry": True, "message": "key k belongs to no registered actor"}),
    (Conflict("a racing replica"), {"ok": False, "retry": True, "message": "a concurrent change conflicted; retrying"}),
    (KeyError("bug"), {"ok": False, "retry": False,
                       "message": "probe failed to handle it; nothing was changed; see the service log"}),
])
async def test_a_refused_or_failed_command_replies_why_and_changes_nothing(service, probe, raised, reply):
    probe.raise_ = raised

    assert await service.ask(command()) == reply
    assert await rows(service) == []


async def test_a_command_sent_again_is_done_once_and_says_so(service, probe):
    sent = command()
    first, again = await service.ask(sent), await service.ask(sent)

    assert first == {"ok": True, "retry": False, "message": "done b1"}
    assert again == {"ok": True, "retry": False, "message": "already done (the same command)"}
    assert len(probe.deliveries) == 1


async def test_a_refused_command_is_never_applied_later_but_a_new_one_is(service, probe):
    """An approval refused because its request did not exist yet must not go through when resent later."""
    probe.raise_ = NotYetKnown("the request does not exist yet")
    sent = command()
    assert (await service.ask(sent))["retry"] is True

    probe.raise_ = None
    replayed = await service.ask(sent)
    assert (replayed["ok"], replayed["message"]) == (False, (
        "this command was refused when it was first sent, and a command is never applied later than it was first "
        "seen; sign and send a new one"))
    assert await rows(service) == []
    assert await service.ask(command()) == {"ok": True, "retry": False, "message": "done b1"}  # a new envelope


@pytest.mark.parametrize("skew", [timedelta(minutes=-6), timedelta(minutes=6), timedelta(days=-365 * 27)])
async def test_a_command_signed_outside_the_window_is_refused_and_changes_nothing(service, probe, skew):
    sent = command().model_copy(update={"time": datetime.now(UTC) + skew})

    reply = await service.ask(sent)

    assert reply["ok"] is False and "more than 5 minutes from this service's time" in reply["message"]
    assert "a replay, or a wrong clock" in reply["message"] and probe.deliveries == []


async def test_a_command_signed_inside_the_window_is_done(service, probe):
    sent = command().model_copy(update={"time": datetime.now(UTC) - timedelta(minutes=4)})

    assert (await service.ask(sent))["ok"] is True


async def test_a_malformed_command_is_refused_naming_the_field(service, probe):
    raw = command().model_dump(mode="json")
    del raw["data"]["benchmark_id"]

    reply = await service.ask(json.dumps(raw).encode(), m.ApproveBenchmark)

    assert reply == {"ok": False, "retry": False,
                     "message": "invalid ApproveBenchmark: data.benchmark_id: Field required"}
    assert probe.deliveries == []


async def test_a_query_changes_nothing_and_is_answered_every_time(service, probe):
    query = Envelope.wrap(m.ShowLeaderboard(benchmark_id="b"), source="user:x")
    await service.ask(command())

    assert [(await service.ask(query))["message"] for _ in range(2)] == ["1 rows", "1 rows"]
    assert [d.attempt for d in probe.deliveries] == [1, 1, 1]
    assert len((await service.stored())["inbox"]) == 1  # the command's only
