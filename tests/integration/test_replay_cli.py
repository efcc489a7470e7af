"""Replaying dead letters through the `assay` command, on a real nats-server with `assay up`'s users and permissions
and the four real services: the approval service, deployed with a stale key of the registry, dead-letters the
registry's events; once it is redeployed with the right key, `assay dead-letters replay` has each processed by the
same consumer, once, and a second replay says it was processed already and changes nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from assay.access import ADMIN, CLI, Access
from assay.client import request
from contracts import messages as m
from contracts.catalog import SERVICES, replay_subject
from contracts.signing import KeyPair
from contracts.streams import ensure_streams
from tests.conftest import serving_nats
from tests.integration.test_checks_cli import until
from tests.integration.test_consent_cli import cli
from tests.support.federation import EVALUATOR, MODEL, PREPARATOR, Federation

SPEC = m.BenchmarkSpec(benchmark_id="bench", name="replayed", preparator=m.ImageRef(digest=PREPARATOR, name="prep"),
                       reference_model=m.ImageRef(digest=MODEL, name="ref"),
                       evaluator=m.ImageRef(digest=EVALUATOR, name="ev"), metrics=(m.MetricSpec(name="auc"),),
                       primary_metric="auc")
REFUSED = {"approval-actor-registered": "ActorRegistered", "approval-benchmark-registered": "BenchmarkRegistered"}


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[tuple[Access, str]]:
    """A JetStream server with the users and permissions `assay up` gives, and the streams declared."""
    access = Access.new([])
    with serving_nats(tmp_path / "nats", access.config()) as url:
        hostport = url.removeprefix("nats://")

        async def provision() -> None:
            nc = await nats.connect(access.url(ADMIN, hostport))
            await ensure_streams(nc.jetstream())
            await nc.close()

        asyncio.run(provision())
        yield access, hostport


@pytest.fixture
async def federation(bus: tuple[Access, str], tmp_path: Path) -> AsyncIterator[Federation]:
    """The services, each as its own NATS user, the approval service deployed with a key of the registry that is not
    the registry's (the registry's key was replaced, and nobody told it); the CLI's state folder points at the bus."""
    access, hostport = bus
    fed = Federation(access.url(CLI, hostport), tmp_path, lambda name: f"sqlite+aiosqlite:///{tmp_path / name}.db",
                     overrides={name: {"nats_url": access.url(name, hostport)} for name in SERVICES})
    keys = {name: fed.key(name).public_key for name in SERVICES}
    fed.overrides["approval"]["service_keys"] = {**keys, "registry": KeyPair.generate().public_key}
    (tmp_path / "platform.json").write_text(json.dumps({"nats_url": fed.nats_url}))
    await fed.start_services()
    try:
        yield fed
    finally:
        await fed.stop()


async def letters(fed: Federation) -> tuple[m.DeadLetterView, ...]:
    return m.DeadLetterList.model_validate(await fed.send(m.ListDeadLetters(), "operator")).letters


async def history(admin_url: str, after: int = 0) -> list[dict[str, Any]]:
    """The events after sequence `after`, read as the supervisor."""
    nc = await nats.connect(admin_url)
    try:
        js = nc.jetstream()
        last = (await js.stream_info("EVENTS")).state.last_seq
        return [json.loads((await js.get_msg("EVENTS", n)).data or b"{}") for n in range(after + 1, last + 1)]
    finally:
        await nc.close()


def of_approval(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["type"], e["data"].get("outcome", "")) for e in events if e["source"] == "service:approval"]


async def test_letters_of_a_stale_key_are_replayed_once_by_their_consumer_after_the_fix(federation, bus):
    fed, admin = federation, bus[0].url(ADMIN, bus[1])
    await fed.enrol("owner", m.Role.BENCHMARK_OWNER)
    await fed.send(m.RegisterBenchmark(benchmark=SPEC), "owner")
    for _ in range(150):  # the operator's registration, the owner's and the benchmark's, refused by approval
        if len(found := await letters(fed)) == 3:
            break
        await asyncio.sleep(0.2)
    assert sorted(x.consumer for x in found) == [*["approval-actor-registered"] * 2, "approval-benchmark-registered"]
    for letter in found:
        assert letter.error.startswith(f"a {REFUSED[letter.consumer]} must be signed by registry: signed with key")
        assert letter.stream == "EVENTS" and letter.sequence is not None
    listed = await until(fed, "approval-benchmark-registered", "dead-letters", "list", "--as", "operator")
    assert "replay ID --as ME" in listed
    [benchmark] = [x for x in found if x.consumer == "approval-benchmark-registered"]
    code, said = await cli(fed, "dead-letters", "replay", benchmark.letter_id[:8], "--as", "owner")
    assert code == 1 and "this command needs operator" in said, said
    code, said = await cli(fed, "dead-letters", "replay", "zz", "--as", "operator")
    assert code == 1 and "dead letter zz: none has it" in said, said

    fed.overrides["approval"].pop("service_keys")  # the right key, and the service redeployed
    await fed.redeploy("approval")
    code, said = await cli(fed, "dead-letters", "replay", benchmark.letter_id[:8], "--as", "operator")
    assert code == 1 and "has not learnt of the operator" in said and "replay that one first" in said, said
    code, said = await cli(fed, "dead-letters", "replay", "--all", "--as", "operator")  # oldest first: the operator's
    assert code == 0 and said.count("was processed; the letter is marked replayed") == 3, said  # own registration
    assert "3 letter(s) looked at, 0 not processed" in said
    assert (f"approval-benchmark-registered: message {benchmark.message_id} (EVENTS #{benchmark.sequence}) of letter "
            f"{benchmark.letter_id} was processed") in said

    code, said = await cli(fed, "benchmark", "approve", "bench", "--as", "operator")
    assert code == 0 and "benchmark bench approved: OPERATION" in said, said  # approval knows them all now

    await until(fed, "PROCESSED", "dead-letters", "list", "--consumer", "approval-benchmark-registered",
                "--as", "operator")  # the scheduler keeps each replay with its letter
    code, said = await cli(fed, "dead-letters", "replay", benchmark.letter_id[:8], "--as", "operator")
    assert code == 0 and "its message was processed already" in said and "nothing was done again" in said, said
    before = len(await history(admin))
    command = m.ReplayDeadLetter(letter_id=benchmark.letter_id, consumer=benchmark.consumer, stream="EVENTS",
                                 sequence=benchmark.sequence or 0, message_id=benchmark.message_id)
    again = await request(fed.nats_url, command, actor="operator", key=fed.key("operator"),
                          subject=replay_subject("approval"))  # past the CLI's look at the letter: the inbox answers
    assert again["message"].endswith("was processed already (its consumer's inbox has it); nothing was done again")
    for _ in range(100):  # the replay's word leaves through the outbox
        if since := of_approval(await history(admin, before)):
            break
        await asyncio.sleep(0.1)
    assert since == [("assay.v1.DeadLetterReplayed", "ALREADY_PROCESSED")]  # and the consumer did nothing again
    after = await letters(fed)
    assert len(after) == 3  # and no letter anew
    for letter in after:
        assert letter.replays[0].outcome is m.ReplayOutcome.PROCESSED, letter
