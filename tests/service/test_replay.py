"""The operator's replay of a dead letter, under the test broker: a message a consumer gave up on is run again through
that consumer once the cause is fixed, processed once however often it is replayed, with the same signature checks;
only the operator may, every service answers it for its own consumers, bad input is refused and changes nothing, and
the scheduler keeps each replay's outcome with the letter."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from contracts import messages as m
from contracts.catalog import EVENT_SUBJECTS, SERVICES, replay_subject
from contracts.envelope import Envelope
from contracts.signing import verify
from tests.support.service import Actors, Harness

IMAGE = m.ImageRef(digest="sha256:" + "1" * 64, name="prep")
SPEC = m.BenchmarkSpec(benchmark_id="bm", name="Benchmark", preparator=IMAGE, reference_model=IMAGE, evaluator=IMAGE,
                       metrics=(m.MetricSpec(name="auc"),), primary_metric="auc")
APPROVED = m.BenchmarkApproved(benchmark_id="bm", approved_by="operator")
CONSUMER = "scheduling-benchmark-approved"
GIVES_UP = 1000  # the delivery a consumer gives up on a message about what it has not heard of (Retry.waits)


async def given_up(service: Harness) -> m.DeadLetterView:
    """The benchmark's approval delivered for the last time while the benchmark is unknown, so dead-lettered: its
    letter, as the scheduler keeps it."""
    await service.deliver(EVENT_SUBJECTS[m.BenchmarkApproved], service.actors.announce(APPROVED), attempt=GIVES_UP)
    return await only_letter(service)


async def only_letter(service: Harness) -> m.DeadLetterView:
    listed = await service.ask(service.actors.sign("operator", m.ListDeadLetters()))
    [letter] = m.DeadLetterList.model_validate(listed).letters
    return letter


def replay_of(letter: m.DeadLetterView, **changes: Any) -> m.ReplayDeadLetter:
    assert letter.stream is not None and letter.sequence is not None
    fields = {"letter_id": letter.letter_id, "consumer": letter.consumer, "stream": letter.stream,
              "sequence": letter.sequence, "message_id": letter.message_id, **changes}
    return m.ReplayDeadLetter(**fields)


async def replay(service: Harness, command: m.ReplayDeadLetter, by: str = "operator",
                 owner: str = "scheduling") -> dict[str, Any]:
    return await service.ask(service.actors.sign(by, command), subject=replay_subject(owner))


async def unchanged(service: Harness, ask: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """The reply to `ask()`, after checking it changed no row (the inbox's record of a refusal aside) and published
    nothing."""
    before = (await service.state(), service.sent())
    reply = await ask()
    assert (await service.state(), service.sent()) == before, "a refused replay must change nothing"
    return reply


async def approved_here(service: Harness) -> bool:
    """Whether the scheduler holds benchmark bm approved (what its consumer of BenchmarkApproved does)."""
    [(benchmark_id, _, _, approved, _)] = (await service.stored())["sched_benchmark"]
    return benchmark_id == "bm" and bool(approved)


async def besides_replays(service: Harness) -> dict[str, Any]:
    """What the consumers changed: every row but the inbox's, the letters' and their replays', and the outbox's (what
    it published is counted apart)."""
    return {table: rows for table, rows in (await service.state()).items()
            if table not in ("sched_letter_replay", "outbox")}


@pytest.fixture
async def operator_at(scheduling: Harness, actors: Actors) -> Harness:
    """The scheduler, knowing the operator and a benchmark owner."""
    await scheduling.learn(actors.registered("operator", m.Role.OPERATOR))
    await scheduling.learn(actors.registered("owner", m.Role.BENCHMARK_OWNER))
    return scheduling


async def test_a_letter_whose_cause_is_fixed_is_processed_once_by_its_consumer_however_often_it_is_replayed(
        operator_at):
    service = operator_at
    letter = await given_up(service)
    assert (letter.consumer, letter.stream, letter.deliveries) == (CONSUMER, "EVENTS", GIVES_UP)
    assert "still unknown after 1000 tries: benchmark bm approved before its registration arrived" in letter.error

    await service.learn(m.BenchmarkRegistered(owner_id="owner", benchmark=SPEC))  # the cause, fixed
    assert not await approved_here(service)  # registered, not approved: the approval is the letter's
    reply = await replay(service, replay_of(letter))

    assert reply["ok"] is True, reply
    assert reply["message"] == (f"{CONSUMER}: message {letter.message_id} (EVENTS #{letter.sequence}) of letter "
                                f"{letter.letter_id} was processed; the letter is marked replayed")
    assert await approved_here(service)  # what the consumer's handler does with it, done now
    [said] = service.events(m.DeadLetterReplayed)
    assert said == m.DeadLetterReplayed(
        service="scheduling", letter_id=letter.letter_id, consumer=CONSUMER, stream="EVENTS",
        sequence=letter.sequence, message_id=letter.message_id, outcome=m.ReplayOutcome.PROCESSED,
        replayed_by="operator")
    [announced] = service.published(EVENT_SUBJECTS[m.DeadLetterReplayed])
    verify(Envelope[m.DeadLetterReplayed].model_validate(announced), service.actors.key("scheduling").public_key)

    before, sent = await besides_replays(service), service.sent()
    again = await replay(service, replay_of(letter))  # a new command, signed anew: the inbox says it was processed

    assert again == {"ok": True, "retry": False, "message": (
        f"{CONSUMER}: message {letter.message_id} (EVENTS #{letter.sequence}) of letter {letter.letter_id} was "
        "processed already (its consumer's inbox has it); nothing was done again")}
    assert await besides_replays(service) == before and service.sent() == sent + 1  # the word of it, only
    assert [e.outcome for e in service.events(m.DeadLetterReplayed)] == [m.ReplayOutcome.PROCESSED,
                                                                         m.ReplayOutcome.ALREADY_PROCESSED]
    assert [r.outcome for r in (await only_letter(service)).replays] == [m.ReplayOutcome.PROCESSED,
                                                                        m.ReplayOutcome.ALREADY_PROCESSED]


async def test_a_letter_replayed_before_its_cause_is_fixed_fails_again_changes_nothing_and_is_replayed_later(
        operator_at):
    service = operator_at
    letter = await given_up(service)
    before, sent = await besides_replays(service), service.sent()

    reply = await replay(service, replay_of(letter))

    assert reply["ok"] is False and reply["retry"] is False
    assert reply["message"].endswith("failed again: still unknown: benchmark bm approved before its registration "
                                     "arrived; nothing was changed; fix that, then replay it again")
    assert await besides_replays(service) == before and service.sent() == sent + 1
    [failed] = (await only_letter(service)).replays
    assert (failed.outcome, failed.replayed_by) == (m.ReplayOutcome.FAILED, "operator")
    assert failed.reason == "still unknown: benchmark bm approved before its registration arrived"
    assert len(service.dead_letters()) == 1  # it is not dead-lettered anew

    await service.learn(m.BenchmarkRegistered(owner_id="owner", benchmark=SPEC))
    assert (await replay(service, replay_of(letter)))["ok"] is True
    assert await approved_here(service)
    assert [r.outcome for r in (await only_letter(service)).replays] == [m.ReplayOutcome.FAILED,
                                                                        m.ReplayOutcome.PROCESSED]


async def test_a_forged_event_replayed_is_refused_again_by_the_same_signature_check(operator_at):
    service = operator_at
    await service.learn(m.BenchmarkRegistered(owner_id="owner", benchmark=SPEC))
    await service.deliver(EVENT_SUBJECTS[m.BenchmarkApproved], Envelope.wrap(APPROVED, source="service:approval"))
    letter = await only_letter(service)
    assert letter.error.startswith("a BenchmarkApproved must be signed by approval")

    reply = await replay(service, replay_of(letter))

    assert reply["ok"] is False and "failed again: a BenchmarkApproved must be signed by approval" in reply["message"]
    assert not await approved_here(service)  # never applied


@pytest.mark.parametrize("role", [r for r in m.Role if r is not m.Role.OPERATOR])
async def test_only_the_operator_replays_a_letter(operator_at, actors, role):
    service = operator_at
    letter = await given_up(service)
    await service.learn(m.BenchmarkRegistered(owner_id="owner", benchmark=SPEC))
    if role is not m.Role.BENCHMARK_OWNER:
        await service.learn(actors.registered("someone", role))
    asker = "owner" if role is m.Role.BENCHMARK_OWNER else "someone"

    reply = await unchanged(service, lambda: replay(service, replay_of(letter), by=asker))

    assert reply == {"ok": False, "retry": False,
                     "message": f"actor {asker} has role {role.value}; this command needs operator"}


async def test_an_unsigned_or_unknown_signers_replay_is_refused(operator_at):
    service = operator_at
    letter = await given_up(service)

    unsigned = await unchanged(service, lambda: service.ask(Envelope.wrap(replay_of(letter), source="actor:x"),
                                                            subject=replay_subject("scheduling")))
    stranger = await unchanged(service, lambda: replay(service, replay_of(letter), by="stranger"))

    assert unsigned["ok"] is False and unsigned["message"].startswith("the command is not signed")
    assert stranger == {"ok": False, "retry": False, "message": (
        f"key {service.actors.key('stranger').key_id} belongs to no actor scheduling knows; if it is the operator's, "
        "scheduling has not learnt of the operator (its registration may be a letter of "
        "scheduling-actor-registered: replay that one first)")}


async def test_the_operators_own_registration_refused_for_a_stale_key_vouches_for_the_operators_replay_of_it(
        tmp_path, actors):
    """A service given a stale key of the registry refuses the operator's registration: it knows no operator to ask.
    Redeployed with the right key, it takes that registration, checked to be the registry's, as the operator's."""
    from approval.config import Settings
    from approval.main import create_app

    from tests.support.service import running

    def approval(registry_key: str) -> Any:
        settings = actors.service_settings("approval", tmp_path)
        return create_app(Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'approval.db'}", **{
            **settings, "service_keys": {**settings["service_keys"], "registry": registry_key}}))

    async with running(approval(actors.key("stale").public_key), actors) as stale:
        await stale.learn(actors.registered("operator", m.Role.OPERATOR))
        [letter] = stale.dead_letters()
        kept = dict(stale.streams.messages)
    assert letter.error.startswith("a ActorRegistered must be signed by registry")
    command = m.ReplayDeadLetter(letter_id="l-1", consumer=letter.consumer, stream="EVENTS",
                                 sequence=letter.sequence, message_id=letter.message_id)  # type: ignore[arg-type]
    async with running(approval(actors.key("registry").public_key), actors) as service:
        service.streams.messages.update(kept)  # the stream keeps what it kept while the service was away
        stranger = await unchanged(service, lambda: replay(service, command, by="mallory", owner="approval"))
        assert stranger["ok"] is False and "replay that one first" in stranger["message"]

        reply = await replay(service, command, owner="approval")

        assert reply["ok"] is True and reply["message"].endswith("was processed; the letter is marked replayed")
        [said] = service.events(m.DeadLetterReplayed)
        assert (said.replayed_by, said.outcome) == ("operator", m.ReplayOutcome.PROCESSED)
        listed = await service.ask(actors.sign("operator", m.ListAssociations()))
        assert listed.get("ok", True) is not False, listed  # the operator is known now


BAD: dict[str, tuple[dict[str, Any], str]] = {
    "sequence-gone": ({"sequence": 999}, "message 999 of stream EVENTS is no longer there (the stream's limits "
                                         "dropped it, or it never was): letter {letter} cannot be replayed; nothing "
                                         "was changed"),
    "another-message": ({"message_id": "not-it"}, "message {sequence} of stream EVENTS is message {message}, not the "
                                                  "letter's not-it; nothing was changed"),
    "another-stream": ({"stream": "RESULTS"}, f"{CONSUMER} reads stream EVENTS, not RESULTS: the letter does not say "
                                              "where its message is"),
    "another-services-consumer": ({"consumer": "approval-benchmark-registered"}, "approval-benchmark-registered is "
                                  "not a consumer of scheduling (its consumers: "),
    "a-sites-job": ({"consumer": "site-site-a-jobs", "message_id": "job-1"}, "site-site-a-jobs is a site's job queue, "
                    "whose letters are not replayed: run the job again with `assay job retry job-1 --as operator`"),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_a_replay_that_names_no_message_of_the_letter_is_refused_saying_why_and_changes_nothing(
        operator_at, case):
    service = operator_at
    letter = await given_up(service)
    await service.learn(m.BenchmarkRegistered(owner_id="owner", benchmark=SPEC))
    changes, expected = BAD[case]

    reply = await unchanged(service, lambda: replay(service, replay_of(letter, **changes)))

    assert reply["ok"] is False and reply["retry"] is False
    assert reply["message"].startswith(expected.format(letter=letter.letter_id, sequence=letter.sequence,
                                                       message=letter.message_id)), reply["message"]
    assert not await approved_here(service)


async def test_a_replay_naming_a_message_its_consumer_does_not_read_is_refused(operator_at):
    service = operator_at
    letter = await given_up(service)
    await service.learn(m.BenchmarkRegistered(owner_id="owner", benchmark=SPEC))  # the next message of EVENTS
    registered = letter.sequence + 1  # type: ignore[operator]

    reply = await unchanged(service, lambda: replay(service, replay_of(letter, sequence=registered)))

    assert reply["message"] == (f"message {registered} of stream EVENTS is on assay.v1.evt.benchmark.registered, "
                                f"which {CONSUMER} does not read: it is not the letter's message; nothing was changed")


async def test_a_replay_with_an_invalid_field_is_refused_naming_it(operator_at):
    service = operator_at
    raw = service.actors.sign("operator", m.ReplayDeadLetter(
        letter_id="l-1", consumer=CONSUMER, stream="EVENTS", sequence=1, message_id="m-1")).model_dump(mode="json")
    raw["data"]["sequence"] = 0

    reply = await unchanged(service, lambda: service.ask(json.dumps(raw).encode(),
                                                         subject=replay_subject("scheduling")))

    assert reply["ok"] is False and reply["message"].startswith("invalid ReplayDeadLetter: data.sequence: ")


@pytest.mark.parametrize("app", SERVICES, indirect=True)
async def test_every_service_answers_the_replay_of_its_own_consumers_letters(app, actors):
    service, owner = app, app.app.wiring.owner
    if owner != "registry":  # the registry knows the operator from its configuration
        await service.learn(actors.registered("operator", m.Role.OPERATOR))
    command = m.ReplayDeadLetter(letter_id="l-1", consumer="nobodys-consumer", stream="EVENTS", sequence=1,
                                 message_id="m-1")

    reply = await unchanged(service, lambda: replay(service, command, owner=owner))

    mine = sorted(app.app.wiring.durables())
    assert reply["message"] == (f"nobodys-consumer is not a consumer of {owner} (its consumers: {', '.join(mine)}); "
                                "the service that owns a consumer replays its letters")


async def test_another_service_replays_its_own_letter_and_announces_it_signed_with_its_key(approval, actors):
    service = approval
    await service.learn(actors.registered("operator", m.Role.OPERATOR))
    edited = m.BenchmarkEdited(benchmark=SPEC.model_copy(update={"name": "Renamed"}), changed=("name",),
                               edited_by="owner")
    await service.deliver(EVENT_SUBJECTS[m.BenchmarkEdited], actors.announce(edited), attempt=GIVES_UP)
    [letter] = service.dead_letters()
    assert (letter.consumer, letter.stream) == ("approval-benchmark-edited", "EVENTS")
    await service.learn(m.BenchmarkRegistered(owner_id="owner", benchmark=SPEC))

    reply = await replay(service, m.ReplayDeadLetter(letter_id="l-1", consumer=letter.consumer, stream="EVENTS",
                                                     sequence=letter.sequence, message_id=letter.message_id),
                         owner="approval")

    assert reply["ok"] is True and reply["message"].endswith("was processed; the letter is marked replayed")
    [announced] = service.published(EVENT_SUBJECTS[m.DeadLetterReplayed])
    said = Envelope[m.DeadLetterReplayed].model_validate(announced)
    verify(said, actors.key("approval").public_key)
    assert (said.data.service, said.data.outcome) == ("approval", m.ReplayOutcome.PROCESSED)


async def test_the_scheduler_refuses_a_services_word_on_a_replay_of_a_consumer_not_its_own(operator_at, actors):
    service = operator_at
    told = m.DeadLetterReplayed(service="registry", letter_id="l-1", consumer="approval-benchmark-registered",
                                stream="EVENTS", sequence=1, message_id="m-1", outcome=m.ReplayOutcome.PROCESSED,
                                replayed_by="operator")

    await service.deliver(EVENT_SUBJECTS[m.DeadLetterReplayed], actors.announce(told), msg_id="told-1")

    [letter] = [x for x in service.dead_letters() if x.message_id == "told-1"]
    assert letter.error == ("registry told of a replay of approval-benchmark-registered, which is not one of its "
                            "consumers")
    assert (await service.stored())["sched_letter_replay"] == []

