"""The leaderboard under the test broker: signed results are verified, counted once and ranked; what fails a check
is rejected with its reason and changes nothing; a result about something not known yet waits."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from assay_telemetry.metrics import DEAD_LETTERS, RESULTS
from contracts import subjects
from contracts.envelope import Envelope
from contracts.messages import (
    BenchmarkRegistered,
    BenchmarkSpec,
    CommandReply,
    ImageRef,
    JobBinding,
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
from tests.support.metrics import measured, series
from tests.support.service import Actors, Harness

LATER = datetime(2100, 1, 1, tzinfo=UTC)  # the jobs of these tests never expire

SITES = ("site-a", "site-b")
IMAGE = ImageRef(digest="sha256:" + "1" * 64, name="img")
BENCHMARK = BenchmarkSpec(benchmark_id="bm", name="Benchmark", preparator=IMAGE, reference_model=IMAGE,
                          evaluator=IMAGE, metrics=(MetricSpec(name="auc"), MetricSpec(name="brier")),
                          primary_metric="auc")


def job(job_id: str, model_id: str, site_id: str, cases: int) -> JobSpec:
    return JobSpec(expires_at=LATER, job_id=job_id, site_id=site_id, metrics=BENCHMARK.metrics, binding=JobBinding(
        benchmark_id="bm", model_id=model_id, dataset_id=f"data-{site_id}", model_image="sha256:" + "a" * 64,
        evaluator_image="sha256:" + "b" * 64, dataset_hash="sha256:" + "c" * 64, case_count=cases))


JOBS = {j.job_id: j for j in (job("job-1", "model-1", "site-a", 300), job("job-2", "model-1", "site-b", 100),
                              job("job-3", "model-2", "site-a", 50))}


def site_result(actors: Actors, job_id: str, auc: float, *, key: KeyPair | None = None,
                job_signer: str = "scheduling") -> Envelope[SiteResult]:
    """A result of one of JOBS, carrying the job as the scheduler signed it, signed by its site (or by `key`)."""
    planned = JOBS[job_id]
    metrics = {"auc": auc, "brier": 0.1}
    signed_job = actors.key(job_signer).sign(Envelope.wrap(planned, source="service:scheduling", id=job_id))
    result = SiteResult(job_id=job_id, site_id=planned.site_id, binding=planned.binding, metrics=metrics,
                        metrics_hash=metrics_hash(metrics), worker_id="worker-1", finished_at=datetime.now(UTC),
                        job=signed_job)
    return (key or actors.key(planned.site_id)).sign(Envelope.wrap(result, source=f"site:{planned.site_id}"))


async def learn_world(leaderboard: Harness, actors: Actors, *, sites: bool = True, benchmark: bool = True) -> None:
    """What the registry announces: the sites and the benchmark (the jobs travel inside the results)."""
    for site_id in SITES if sites else ():
        await leaderboard.learn(actors.registered(site_id, Role.SITE))
    if benchmark:
        await leaderboard.learn(actors.registered("owner", Role.BENCHMARK_OWNER))
        await leaderboard.learn(BenchmarkRegistered(owner_id="owner", benchmark=BENCHMARK))


async def send(leaderboard: Harness, result: Envelope[SiteResult], *, site_id: str | None = None) -> None:
    await leaderboard.deliver(subjects.results(site_id or result.data.site_id), result)


async def board(leaderboard: Harness, benchmark_id: str = "bm", *, actors: Actors | None = None,
                asker: str = "owner") -> Leaderboard:
    """The board as anyone sees it (unsigned), or as `asker` signs for it (the benchmark's owner sees everything)."""
    query = ShowLeaderboard(benchmark_id=benchmark_id)
    envelope = Envelope.wrap(query, source="user:reader") if actors is None else actors.sign(asker, query)
    return Leaderboard.model_validate(await leaderboard.ask(envelope))


async def test_an_accepted_result_announces_its_acceptance_and_the_board_it_makes(leaderboard, actors):
    await learn_world(leaderboard, actors)

    await send(leaderboard, site_result(actors, "job-1", 0.83))

    [accepted] = leaderboard.events(ResultAccepted)
    assert (accepted.job_id, accepted.site_id, accepted.metrics) == ("job-1", "site-a", {})  # a site's values: asked for
    assert accepted.binding == JOBS["job-1"].binding
    [updated] = leaderboard.events(LeaderboardUpdated)
    shown = await board(leaderboard, actors=actors)
    (row,) = shown.rows
    assert (row.rank, row.model_id, row.case_count, row.sites) == (1, "model-1", 300, 1)
    assert row.site_values == {"site-a": {"auc": 0.83, "brier": 0.1}}
    assert (updated.model_id, updated.rank, updated.pooled, updated.case_count, updated.sites, updated.models) == (
        "model-1", 1, row.pooled, 300, 1, 1)


async def test_the_event_that_announces_a_new_board_does_not_grow_with_the_board(leaderboard, actors):
    """A board of many models and sites is a query; what is announced is one model's standing."""
    await learn_world(leaderboard, actors)
    for job_id, auc in (("job-1", 0.9), ("job-2", 0.5), ("job-3", 0.85)):
        await send(leaderboard, site_result(actors, job_id, auc))

    sizes = [len(sent["data"].__repr__()) for sent in leaderboard.published("assay.v1.evt.leaderboard.updated")]
    last = leaderboard.events(LeaderboardUpdated)[-1]
    assert (last.model_id, last.rank, last.models, set(last.pooled)) == ("model-2", 1, 2, {"auc", "brier"})
    assert max(sizes) - min(sizes) < 40  # the same few fields each time, while the board grew


async def test_results_from_two_sites_are_pooled_by_cases_and_models_ranked(leaderboard, actors):
    await learn_world(leaderboard, actors)
    for job_id, auc in (("job-1", 0.9), ("job-2", 0.5), ("job-3", 0.85)):
        await send(leaderboard, site_result(actors, job_id, auc))

    shown = await board(leaderboard)

    assert [(row.rank, row.model_id) for row in shown.rows] == [(1, "model-2"), (2, "model-1")]
    assert shown.rows[1].pooled["auc"] == pytest.approx(0.8)  # (0.9 * 300 + 0.5 * 100) / 400
    assert (shown.rows[1].sites, shown.rows[1].case_count) == (2, 400)


async def test_a_result_with_a_metric_changed_after_signing_is_rejected_and_changes_nothing(leaderboard, actors):
    await learn_world(leaderboard, actors)
    honest = site_result(actors, "job-3", 0.6)
    tampered = honest.model_copy(update={"data": honest.data.model_copy(update={"metrics": {"auc": 0.99, "brier": 0.1}})})
    before = await leaderboard.stored()

    await send(leaderboard, tampered)

    [rejected] = leaderboard.events(ResultRejected)
    assert (rejected.message_id, rejected.site_id, rejected.job_id) == (tampered.id, "site-a", "job-3")
    assert rejected.reason.startswith("signature: the signature does not match the message content")
    assert leaderboard.events(ResultAccepted) == []
    assert {k: v for k, v in (await leaderboard.stored()).items() if k not in ("inbox", "outbox")} == \
        {k: v for k, v in before.items() if k not in ("inbox", "outbox")}


async def test_a_result_signed_by_another_sites_key_is_rejected(leaderboard, actors):
    await learn_world(leaderboard, actors)

    await send(leaderboard, site_result(actors, "job-3", 0.99, key=actors.key("site-b")))

    [rejected] = leaderboard.events(ResultRejected)
    assert rejected.reason == "signer_site: the result names site site-a but is signed by site site-b"
    assert (await board(leaderboard)).rows == ()


async def test_a_forged_result_is_rejected_at_once_even_when_its_benchmark_is_not_known_yet(leaderboard, actors):
    await learn_world(leaderboard, actors, benchmark=False)

    await send(leaderboard, site_result(actors, "job-1", 0.99, key=actors.key("site-b")))

    [rejected] = leaderboard.events(ResultRejected)
    assert rejected.reason.startswith("signer_site: ")


async def test_a_result_answering_a_job_the_scheduler_did_not_sign_is_rejected(leaderboard, actors):
    """A site cannot make up the job it answers: the binding it claims is checked against the scheduler's word."""
    await learn_world(leaderboard, actors)

    await send(leaderboard, site_result(actors, "job-1", 0.99, job_signer="site-a"))

    [rejected] = leaderboard.events(ResultRejected)
    assert rejected.reason.startswith("job_signature: the job the result carries is not the scheduler's: ")
    assert (await board(leaderboard)).rows == ()


async def test_a_result_published_on_another_sites_subject_is_rejected(leaderboard, actors):
    await learn_world(leaderboard, actors)
    misrouted = site_result(actors, "job-1", 0.8)  # signed by site-a, its own result, but sent on site-b's subject

    await send(leaderboard, misrouted, site_id="site-b")

    [rejected] = leaderboard.events(ResultRejected)
    assert rejected.reason == ("subject: published on assay.v1.results.site-b, "
                               "but a result of site site-a travels on assay.v1.results.site-a")


async def test_a_result_outside_a_declared_range_is_rejected_with_the_value(leaderboard, actors):
    await learn_world(leaderboard, actors)

    await send(leaderboard, site_result(actors, "job-1", 1.5))

    [rejected] = leaderboard.events(ResultRejected)
    assert rejected.reason == "metric_value: auc = 1.5 is outside its declared range [0.0, 1.0]"


async def test_the_same_result_delivered_twice_is_handled_once(leaderboard, actors):
    await learn_world(leaderboard, actors)
    result = site_result(actors, "job-1", 0.8)
    await send(leaderboard, result)
    once = (await leaderboard.stored(), leaderboard.sent())

    await send(leaderboard, result)  # a redelivery: the same bytes

    assert (await leaderboard.stored(), leaderboard.sent()) == once
    assert leaderboard.events(ResultRejected) == []


async def test_a_job_run_twice_and_signed_anew_is_counted_once(leaderboard, actors):
    await learn_world(leaderboard, actors)
    await send(leaderboard, site_result(actors, "job-1", 0.8))

    again = site_result(actors, "job-1", 0.8)
    await send(leaderboard, again)

    [rejected] = leaderboard.events(ResultRejected)
    assert (rejected.message_id, rejected.reason) == (
        again.id, "duplicate: job job-1 already has an accepted result; this one is not counted")
    assert (await board(leaderboard)).rows[0].case_count == 300


async def test_a_second_round_of_a_pair_already_counted_is_not_counted(leaderboard, actors):
    await learn_world(leaderboard, actors)
    await send(leaderboard, site_result(actors, "job-1", 0.8))
    JOBS["job-1-r1"] = JOBS["job-1"].model_copy(update={"job_id": "job-1-r1"})  # retried, or planned again
    try:
        again = site_result(actors, "job-1-r1", 0.95)
        await send(leaderboard, again)
    finally:
        del JOBS["job-1-r1"]

    [rejected] = leaderboard.events(ResultRejected)
    assert (rejected.message_id, rejected.reason) == (again.id, (
        "duplicate: model model-1 on dataset data-site-a already has an accepted result (job job-1); this one is not "
        "counted"))
    [row] = (await board(leaderboard, actors=actors)).rows
    assert (row.case_count, row.site_values["site-a"]["auc"]) == (300, 0.8)


@pytest.mark.parametrize("known", [{"sites": False}, {"benchmark": False}])
async def test_a_result_about_what_is_not_known_yet_is_parked_acked_and_judged_when_it_arrives(
        leaderboard, actors, known):
    await learn_world(leaderboard, actors, **known)
    result = site_result(actors, "job-1", 0.8)

    await send(leaderboard, result)  # acknowledged: it holds no consumer capacity while it waits

    assert len((await leaderboard.stored())["lb_parked"]) == 1
    assert leaderboard.events(ResultAccepted) == [] and leaderboard.events(ResultRejected) == []
    assert leaderboard.dead_letters() == []
    await learn_world(leaderboard, actors)  # the site's key, or the benchmark, arrives
    assert [e.job_id for e in leaderboard.events(ResultAccepted)] == ["job-1"]
    assert (await leaderboard.stored())["lb_parked"] == []


async def test_a_flood_of_results_from_keys_nobody_registered_is_rejected_at_once_and_the_genuine_one_counted(
        leaderboard, actors):
    await learn_world(leaderboard, actors)
    forgers = [actors.key(f"forger-{n}") for n in range(50)]
    for forger in forgers:  # each settled on its first delivery, none waiting in the consumer or in the park
        await send(leaderboard, site_result(actors, "job-1", 1.0, key=forger))

    await send(leaderboard, site_result(actors, "job-1", 0.8))

    assert [e.job_id for e in leaderboard.events(ResultAccepted)] == ["job-1"]
    assert (await board(leaderboard)).rows[0].pooled["auc"] == 0.8
    assert [e.reason for e in leaderboard.events(ResultRejected)] == [
        f"signature: key {forger.key_id} belongs to no registered actor, so not to site site-a" for forger in forgers]
    assert (await leaderboard.stored())["lb_parked"] == []


async def test_a_result_whose_job_the_scheduler_did_not_sign_is_rejected_at_once_even_from_an_unknown_site(
        leaderboard, actors):
    """Nothing a forger makes up can wait in the park: only a job the scheduler signed may wait for its site."""
    await learn_world(leaderboard, actors, sites=False)

    await send(leaderboard, site_result(actors, "job-1", 0.99, key=actors.key("stranger"), job_signer="stranger"))

    [rejected] = leaderboard.events(ResultRejected)
    assert rejected.reason.startswith("job_signature: ")
    assert (await leaderboard.stored())["lb_parked"] == []


async def test_a_parked_result_that_waited_too_long_is_rejected_with_the_reason(leaderboard, actors):
    await learn_world(leaderboard, actors, sites=False)
    stranger = actors.key("stranger")
    await send(leaderboard, site_result(actors, "job-1", 0.9, key=stranger))
    async with leaderboard.app.db.transaction() as session:  # the result waited past the leaderboard's patience
        await session.execute(text("UPDATE lb_parked SET parked_at = '2000-01-01 00:00:00'"))

    await send(leaderboard, site_result(actors, "job-3", 0.7, key=stranger))  # the next result sweeps the park

    [rejected] = leaderboard.events(ResultRejected)
    assert rejected.job_id == "job-1"
    assert rejected.reason.startswith(f"key {stranger.key_id}: not known here after 0:10:00; not counted")
    assert len((await leaderboard.stored())["lb_parked"]) == 1  # the second one still waits


async def test_a_malformed_result_is_dead_lettered_at_once_naming_the_field(leaderboard, actors):
    await learn_world(leaderboard, actors)
    raw = site_result(actors, "job-1", 0.8).model_dump(mode="json")
    raw["data"]["binding"]["case_count"] = "many"
    before = await leaderboard.stored()

    await leaderboard.deliver(subjects.results("site-a"), json.dumps(raw).encode(), msg_id="bad-result")

    [letter] = leaderboard.dead_letters()
    assert (letter.consumer, letter.message_id, letter.deliveries) == ("leaderboard-results", "bad-result", 1)
    assert letter.error.startswith("invalid SiteResult: data.binding.case_count: ")
    assert await leaderboard.stored() == before


async def test_the_board_of_a_benchmark_without_results_is_empty(leaderboard, actors):
    await leaderboard.learn(BenchmarkRegistered(owner_id="owner", benchmark=BENCHMARK))

    shown = await board(leaderboard)

    assert (shown.benchmark_id, shown.primary_metric, shown.metrics, shown.rows) == ("bm", "auc", ("auc", "brier"), ())


async def test_the_board_of_an_unknown_benchmark_is_refused_with_a_retry(leaderboard):
    reply = CommandReply.model_validate(await leaderboard.ask(
        Envelope.wrap(ShowLeaderboard(benchmark_id="nothing-here"), source="user:reader")))

    assert (reply.ok, reply.retry) == (False, True)
    assert "benchmark nothing-here is not known to the leaderboard" in reply.message


async def test_a_malformed_query_is_refused_naming_the_field(leaderboard):
    reply = await leaderboard.ask(b'{"type": "assay.v1.ShowLeaderboard"}', ShowLeaderboard)

    assert reply["ok"] is False and reply["message"].startswith("invalid ShowLeaderboard: source: Field required")


async def test_a_revoked_pair_keeps_its_earlier_results_marked_and_counts_none_finished_later(leaderboard, actors):
    from contracts.messages import AssociationApproved, AssociationRevoked, EntityKind

    await learn_world(leaderboard, actors)
    await send(leaderboard, site_result(actors, "job-1", 0.9))
    await leaderboard.learn(AssociationRevoked(benchmark_id="bm", kind=EntityKind.MODEL, entity_id="model-1",
                                               revoked_by="vendor", reason="a bug found in the model"))

    await send(leaderboard, site_result(actors, "job-2", 0.5))  # finished after the revocation

    [rejected] = leaderboard.events(ResultRejected)
    assert rejected.job_id == "job-2" and rejected.reason.startswith("withdrawn: model model-1 revoked by vendor")
    (row,) = (await board(leaderboard, actors=actors)).rows
    assert (row.sites, row.pooled["auc"]) == (1, 0.9)
    assert row.marks[0].startswith("model model-1 revoked by vendor on ")
    assert row.marks[0].endswith(": a bug found in the model; results finished before stay, marked, later ones do "
                                 "not count")

    await leaderboard.learn(AssociationApproved(benchmark_id="bm", kind=EntityKind.MODEL, entity_id="model-1",
                                                approved_by="owner"))
    await send(leaderboard, site_result(actors, "job-2", 0.5))  # approved again: it counts
    (row,) = (await board(leaderboard, actors=actors)).rows
    assert row.sites == 2 and row.marks == ()


async def test_results_are_counted_by_outcome_and_a_rejection_by_the_check_it_failed(leaderboard, actors, metrics):
    await learn_world(leaderboard, actors)
    await send(leaderboard, site_result(actors, "job-1", 0.83))
    await send(leaderboard, site_result(actors, "job-3", 0.99, key=actors.key("site-b")))
    await send(leaderboard, site_result(actors, "job-2", 1.5))
    await send(leaderboard, site_result(actors, "job-2", 1.7))
    raw = site_result(actors, "job-2", 0.8).model_dump(mode="json")
    raw["data"]["binding"]["case_count"] = "many"
    await leaderboard.deliver(subjects.results("site-b"), json.dumps(raw).encode(), msg_id="bad-result")

    assert measured(metrics, RESULTS) == {series(outcome="accepted"): 1,
                                          series(outcome="rejected", check="signer_site"): 1,
                                          series(outcome="rejected", check="metric_value"): 2}
    assert measured(metrics, DEAD_LETTERS) == {series(consumer="leaderboard-results"): 1}  # not a result at all


@pytest.fixture
async def patient(tmp_path, actors):
    """The leaderboard with a window no test outlives: what it owes is announced only when the test settles it."""
    from leaderboard.config import Settings
    from leaderboard.main import create_app
    from tests.support.service import running

    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'leaderboard.db'}", board_window_s=3600,
                        **actors.service_settings("leaderboard", tmp_path))
    async with running(create_app(settings), actors) as harness:
        yield harness


async def test_a_burst_of_results_makes_one_board_update_and_the_last_result_is_in_it(patient, actors):
    await learn_world(patient, actors)
    [announcer] = patient.app.deferred
    for job_id, auc in (("job-1", 0.9), ("job-2", 0.5), ("job-3", 0.85)):
        await patient.deliver(subjects.results(JOBS[job_id].site_id), site_result(actors, job_id, auc), owed=True)

    assert len(patient.events(ResultAccepted)) == 3 and patient.events(LeaderboardUpdated) == []
    owed = (await patient.stored())["lb_board_due"]  # written with the results: a crash now leaves it owed
    assert [(row[0], json.loads(row[1])) for row in owed] == [("bm", ["model-1", "model-2"])]

    await patient.settle()

    updates = patient.events(LeaderboardUpdated)
    assert [(u.model_id, u.sites, u.case_count) for u in updates] == [("model-1", 2, 400), ("model-2", 1, 50)]
    assert announcer.recomputed == 1  # one recompute for the three results, one update per model they changed
    assert (await patient.stored())["lb_board_due"] == []
    await patient.settle()
    assert len(patient.events(LeaderboardUpdated)) == 2  # nothing owed: nothing announced again


async def test_a_query_never_ranks_again_a_board_that_is_current(patient, actors):
    await learn_world(patient, actors)
    await patient.deliver(subjects.results("site-a"), site_result(actors, "job-1", 0.9))
    boards = patient.app.broker.context.get("boards")
    ranked = boards.rankings

    first, again = await board(patient), await board(patient, actors=actors)

    assert boards.rankings == ranked  # the announcement ranked it; both queries reuse it
    assert first.rows[0].model_id == again.rows[0].model_id == "model-1"
    await patient.deliver(subjects.results("site-b"), site_result(actors, "job-2", 0.5), owed=True)
    assert (await board(patient)).rows[0].sites == 2  # a result accepted meanwhile is on it: ranked again, once
    assert boards.rankings == ranked + 1
    await board(patient)
    assert boards.rankings == ranked + 1
