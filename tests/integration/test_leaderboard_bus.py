"""The leaderboard against a real nats-server: what only a server does, redelivery and its duplicate window.

What the leaderboard decides about each result is tested under the test broker in tests/service/test_leaderboard.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import pytest
from faststream import TestApp
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from contracts import subjects
from contracts.catalog import EVENT_SUBJECTS, QUERY_SUBJECTS, event_subject
from contracts.envelope import Envelope, Payload
from contracts.messages import (
    ActorRegistered,
    BenchmarkRegistered,
    BenchmarkSpec,
    ImageRef,
    JobBinding,
    JobScheduled,
    JobSpec,
    Leaderboard,
    LeaderboardUpdated,
    MetricSpec,
    ResultAccepted,
    ResultRejected,
    Role,
    ShowLeaderboard,
    SiteResult,
)
from contracts.signing import KeyPair, metrics_hash
from contracts.streams import ensure_streams
from leaderboard.config import Settings
from leaderboard.main import create_app
from tests.support.service import Actors

LATER = datetime(2100, 1, 1, tzinfo=UTC)  # the jobs of these tests never expire

WAIT_S = 15.0  # an upper bound for an awaited event, never a pause


def digest(char: str) -> str:
    return "sha256:" + char * 64


# the nats-server (`nats_url`) comes from tests/conftest.py


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    client = await nats.connect(nats_url)
    js = client.jetstream()
    await ensure_streams(js)
    bus = Bus(client, js)
    await client.subscribe(subjects.EVENTS_ALL, cb=bus.events.put)
    await client.subscribe("$JS.ACK.>", cb=bus.acks.put)
    yield bus
    await client.close()


@pytest.fixture
async def leaderboard(bus: Bus, nats_url: str, tmp_path: Path) -> AsyncIterator[None]:
    settings = Settings(nats_url=nats_url, database_url=f"sqlite+aiosqlite:///{tmp_path / 'leaderboard.db'}",
                        **SERVICES.service_settings("leaderboard", tmp_path))
    async with TestApp(create_app(settings)):
        yield


# --- the bus as the other services and the sites see it ----------------------------------------------------------


@dataclass
class Bus:
    client: Client
    js: JetStreamContext
    events: asyncio.Queue[Msg] = field(default_factory=asyncio.Queue)
    acks: asyncio.Queue[Msg] = field(default_factory=asyncio.Queue)

    async def announce(self, payload: Payload) -> int:
        """Publish an event as its owning service does; returns its sequence in the EVENTS stream."""
        envelope = SERVICES.announce(payload)
        ack = await self.js.publish(event_subject(payload), envelope.model_dump_json().encode(),
                                    headers={"Nats-Msg-Id": envelope.id})
        return ack.seq

    async def learned(self, payload: Payload, consumer: str) -> None:
        """Publish an event and wait until the leaderboard's `consumer` has processed it."""
        await self.acked(await self.announce(payload), consumer=consumer)

    async def send_result(self, envelope: Envelope[SiteResult], *, site_id: str | None = None,
                          msg_id: str | None = None) -> int:
        """Publish as a site worker does; returns the result's sequence in the RESULTS stream."""
        ack = await self.js.publish(subjects.results(site_id or envelope.data.site_id),
                                    envelope.model_dump_json().encode(),
                                    headers={"Nats-Msg-Id": msg_id or envelope.id})
        assert not ack.duplicate
        return ack.seq

    async def next_event(self, kind: type[Payload], where: Callable[[Any], bool] = lambda _: True) -> Any:
        """The next event of `kind` (an Envelope) satisfying `where`; others are passed over."""

        async def find() -> Any:
            while True:
                msg = await self.events.get()
                envelope = json.loads(msg.data)
                if envelope["type"] == kind.TYPE:
                    typed = Envelope[kind].model_validate(envelope)  # type: ignore[valid-type]
                    if where(typed.data):
                        return typed

        return await asyncio.wait_for(find(), WAIT_S)

    async def acked(self, seq: int, *, consumer: str = "leaderboard-results", nak: bool = False) -> None:
        """Wait until `consumer` acknowledges message `seq` of its stream (done), or with `nak` refuses it for now."""

        def answered(msg: Msg) -> bool:
            delivery = Msg(_client=self.client, subject="", reply=msg.subject).metadata
            refused = msg.data.startswith(b"-NAK")
            done = msg.data in (b"", b"+ACK")
            return (delivery.consumer, delivery.sequence.stream) == (consumer, seq) and (refused if nak else done)

        async def find() -> None:
            while not answered(await self.acks.get()):
                pass

        await asyncio.wait_for(find(), WAIT_S)

    async def board(self, benchmark_id: str = "bm") -> Leaderboard:
        query = Envelope.wrap(ShowLeaderboard(benchmark_id=benchmark_id), source="user:reader")
        reply = await self.client.request(QUERY_SUBJECTS[ShowLeaderboard], query.model_dump_json().encode(),
                                          timeout=WAIT_S)
        return Leaderboard.model_validate_json(reply.data)


SITES = {"site-a": KeyPair.generate(), "site-b": KeyPair.generate()}
SERVICES = Actors()  # the services' keys: the leaderboard checks who published each event
IMAGE = ImageRef(digest=digest("1"), name="img")
BENCHMARK = BenchmarkSpec(benchmark_id="bm", name="Benchmark", preparator=IMAGE, reference_model=IMAGE,
                          evaluator=IMAGE, metrics=(MetricSpec(name="auc"), MetricSpec(name="brier")),
                          primary_metric="auc")


def job(job_id: str, model_id: str, site_id: str, cases: int) -> JobSpec:
    return JobSpec(expires_at=LATER, job_id=job_id, site_id=site_id, metrics=BENCHMARK.metrics, binding=JobBinding(
        benchmark_id="bm", model_id=model_id, dataset_id=f"data-{site_id}", model_image=digest("a"),
        evaluator_image=digest("b"), dataset_hash=digest("c"), case_count=cases))


JOBS = {j.job_id: j for j in (job("job-1", "model-1", "site-a", 300), job("job-2", "model-1", "site-b", 100),
                              job("job-3", "model-2", "site-a", 50))}


def site_result(job_id: str, auc: float, *, case_count: int | None = None, key: KeyPair | None = None) -> Envelope[SiteResult]:
    """A result of one of JOBS, signed by its site (or by `key`)."""
    j = JOBS[job_id]
    metrics = {"auc": auc, "brier": 0.1}
    binding = j.binding.model_copy(update={"case_count": case_count or j.binding.case_count})
    signed_job = SERVICES.key("scheduling").sign(Envelope.wrap(j, source="service:scheduling", id=j.job_id))
    result = SiteResult(job_id=j.job_id, site_id=j.site_id, binding=binding, metrics=metrics, job=signed_job,
                        metrics_hash=metrics_hash(metrics), worker_id="worker-1", finished_at=datetime.now(UTC))
    return (key or SITES[j.site_id]).sign(Envelope.wrap(result, source=f"site:{j.site_id}"))


def site_registered(site_id: str) -> ActorRegistered:
    key = SITES[site_id]
    return ActorRegistered(actor_id=site_id, role=Role.SITE, public_key=key.public_key, key_id=key.key_id,
                           display_name=site_id)


async def announce_world(bus: Bus) -> None:
    """The registry's events, each waited for until the leaderboard has learned it (jobs travel in the results)."""
    for site_id in SITES:
        await bus.learned(site_registered(site_id), "leaderboard-actor-registered")
    await bus.learned(BenchmarkRegistered(owner_id="owner", benchmark=BENCHMARK), "leaderboard-benchmark-registered")


async def accepted(bus: Bus, envelope: Envelope[SiteResult]) -> Leaderboard:
    """Send a valid result and return the board once it has been counted."""
    await bus.send_result(envelope)
    await bus.next_event(ResultAccepted, lambda e: e.job_id == envelope.data.job_id)
    await bus.next_event(LeaderboardUpdated, lambda e: e.model_id == envelope.data.binding.model_id)
    return await bus.board()


# --- behaviour ----------------------------------------------------------------------------------------------------


async def test_the_same_result_sent_twice_is_counted_once(bus: Bus, leaderboard: None):
    await announce_world(bus)
    first = site_result("job-1", 0.8)
    once = await accepted(bus, first)

    resent_seq = await bus.send_result(first, msg_id=f"{first.id}-resent")  # past the server's dedupe
    await bus.acked(resent_seq)
    signed_again = site_result("job-1", 0.8)  # the worker ran the job twice and signed anew
    await bus.send_result(signed_again)

    rejected = (await bus.next_event(ResultRejected)).data
    assert rejected.message_id == signed_again.id
    assert rejected.reason == "duplicate: job job-1 already has an accepted result; this one is not counted"
    assert await bus.board() == once
    assert once.rows[0].case_count == 300


async def test_a_result_that_arrives_before_its_site_is_known_is_acked_parked_and_accepted_once_it_is(
        bus: Bus, leaderboard: None):
    early = site_result("job-1", 0.75)

    seq = await bus.send_result(early)
    await bus.acked(seq)  # acknowledged at once: it waits in the leaderboard's store, not in the consumer
    await announce_world(bus)

    event = (await bus.next_event(ResultAccepted)).data
    assert (event.job_id, event.site_id) == ("job-1", "site-a")
    assert (await bus.board()).rows[0].pooled["auc"] == 0.75


def first_delivery_answer(msg: Msg, client: Client) -> tuple[str, int, int, bytes]:
    """(consumer, stream sequence, delivery count, answer) of an acknowledgement seen on $JS.ACK.>."""
    delivery = Msg(_client=client, subject="", reply=msg.subject).metadata
    return delivery.consumer, delivery.sequence.stream, delivery.num_delivered, msg.data


async def answer_to(bus: Bus, seq: int) -> tuple[int, str]:
    """How many times the leaderboard's results consumer had been given message `seq` when it answered it, and how
    ("ack", or the answer as the server got it: -NAK, +WPI, +TERM)."""

    async def find() -> tuple[int, str]:
        while True:
            consumer, stream_seq, delivered, said = first_delivery_answer(await bus.acks.get(), bus.client)
            if (consumer, stream_seq) == ("leaderboard-results", seq):
                return delivered, "ack" if said in (b"", b"+ACK") else said.decode()

    return await asyncio.wait_for(find(), WAIT_S)


async def test_a_genuine_result_is_accepted_on_its_first_delivery_without_its_job_scheduled_and_a_forged_one_refused(
        bus: Bus, leaderboard: None):
    """The result carries the job the scheduler signed: the leaderboard never waits for the JobScheduled it answers
    (published here only after the result), so nothing is delivered twice; a result whose job the scheduler did not
    sign is refused at once, however genuine its site's signature."""
    await announce_world(bus)
    genuine = site_result("job-1", 0.8)
    seq = await bus.send_result(genuine)
    assert await answer_to(bus, seq) == (1, "ack")  # taken the first time it was delivered
    accepted_event = (await bus.next_event(ResultAccepted, lambda e: e.job_id == "job-1")).data
    assert accepted_event.site_id == "site-a"
    await bus.announce(JobScheduled(job=JOBS["job-1"]))  # what the scheduler published: too late to matter

    forged_job = KeyPair.generate().sign(Envelope.wrap(JOBS["job-2"], source="service:scheduling", id="job-2"))
    honest = site_result("job-2", 0.9)
    forged = SITES["site-b"].sign(Envelope.wrap(honest.data.model_copy(update={"job": forged_job}),
                                                source="site:site-b"))
    seq = await bus.send_result(forged)
    assert await answer_to(bus, seq) == (1, "ack")  # refused at once: acknowledged, never delivered again
    rejected = (await bus.next_event(ResultRejected, lambda e: e.job_id == "job-2")).data
    assert rejected.reason.startswith("job_signature: the job the result carries is not the scheduler's")
    assert [(row.model_id, row.sites, row.case_count) for row in (await bus.board()).rows] == [("model-1", 1, 300)]


async def test_a_burst_waiting_in_the_stream_is_judged_in_one_batch_as_one_by_one_and_makes_one_board_update(
        bus: Bus, nats_url: str, tmp_path: Path):
    """Results that wait for the leaderboard are taken by one fetch and judged in one unit of work, with the outcome
    each would have alone, in turn: the genuine ones accepted, a job signed anew and a second round of a counted pair
    refused as duplicates, a forgery refused; and the board they change is announced once, with the last of them."""
    settings = Settings(nats_url=nats_url, database_url=f"sqlite+aiosqlite:///{tmp_path / 'leaderboard.db'}",
                        **SERVICES.service_settings("leaderboard", tmp_path))
    async with TestApp(create_app(settings)):
        await announce_world(bus)
    second_round = job("job-1-r2", "model-1", "site-a", 300)  # the pair of job-1 planned again
    JOBS[second_round.job_id] = second_round
    try:
        burst = [site_result("job-1", 0.8), site_result("job-2", 0.6), site_result("job-1", 0.8),
                 site_result("job-1-r2", 0.7), site_result("job-3", 0.9, key=SITES["site-b"])]
    finally:
        del JOBS[second_round.job_id]
    for result in burst:
        await bus.send_result(result)
    async with TestApp(create_app(settings)):
        accepted = {(await bus.next_event(ResultAccepted)).data.job_id for _ in range(2)}
        rejected = {e.data.message_id: e.data.reason for e in [await bus.next_event(ResultRejected) for _ in range(3)]}
        update = (await bus.next_event(LeaderboardUpdated)).data
        board = await bus.board()

    assert accepted == {"job-1", "job-2"}
    assert rejected == {
        burst[2].id: "duplicate: job job-1 already has an accepted result; this one is not counted",
        burst[3].id: "duplicate: model model-1 on dataset data-site-a already has an accepted result (job job-1); "
                     "this one is not counted",
        burst[4].id: "signer_site: the result names site site-a but is signed by site site-b"}
    assert (update.model_id, update.sites, update.case_count) == ("model-1", 2, 400)  # the burst's last result in it
    assert [(row.model_id, row.sites) for row in board.rows] == [("model-1", 2)]
    updates = (await bus.js.stream_info(subjects.EVENTS_STREAM, subjects_filter=EVENT_SUBJECTS[LeaderboardUpdated]))
    assert updates.state.subjects == {EVENT_SUBJECTS[LeaderboardUpdated]: 1}  # all it owed was announced at its stop
