"""The leaderboard's pure core: every reason a site result is refused, and how accepted results are pooled and ranked."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from contracts import subjects
from contracts.envelope import Envelope
from contracts.messages import BenchmarkSpec, ImageRef, JobBinding, JobSpec, MetricSpec, Role, SiteResult
from contracts.signing import KeyPair, metrics_hash
from leaderboard.board import Score, aggregate, shared_ranks
from leaderboard.domain import Check, Signer, Verdict, check_binding, check_job, check_origin

LATER = datetime(2100, 1, 1, tzinfo=UTC)  # the jobs of these tests never expire

SITE_A, SITE_B, SCHEDULER = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
OTHER_DIGEST = "sha256:" + "f" * 64


def digest(char: str) -> str:
    return "sha256:" + char * 64


def benchmark(*, higher_is_better: bool = True) -> BenchmarkSpec:
    image = ImageRef(digest=digest("1"), name="img")
    return BenchmarkSpec(
        benchmark_id="bm", name="Benchmark", preparator=image, reference_model=image, evaluator=image,
        metrics=(MetricSpec(name="auc", higher_is_better=higher_is_better), MetricSpec(name="brier")),
        primary_metric="auc",
    )


JOB = JobSpec(expires_at=LATER, job_id="job-1", site_id="site-a", metrics=benchmark().metrics, binding=JobBinding(
    benchmark_id="bm", model_id="model-1", dataset_id="data-a", model_image=digest("a"), evaluator_image=digest("b"),
    dataset_hash=digest("c"), case_count=100))


def result(binding: dict[str, object] | None = None, **changes: object) -> SiteResult:
    metrics = changes.pop("metrics", {"auc": 0.8, "brier": 0.2})
    fields = dict(job_id=JOB.job_id, site_id=JOB.site_id, binding=JOB.binding.model_copy(update=binding or {}),
                  metrics=metrics, worker_id="worker-1", finished_at=datetime(2026, 1, 1, tzinfo=UTC),
                  job=SCHEDULER.sign(Envelope.wrap(JOB, source="service:scheduling", id=JOB.job_id)))
    fields["metrics_hash"] = metrics_hash(metrics) if all(map(math.isfinite, metrics.values())) else digest("0")
    fields.update(changes)
    return SiteResult(**fields)


def signed(payload: SiteResult, key: KeyPair = SITE_A) -> Envelope[SiteResult]:
    return key.sign(Envelope.wrap(payload, source=f"site:{payload.site_id}"))


def signer(actor_id: str = "site-a", key: KeyPair = SITE_A, role: str = Role.SITE) -> Signer:
    return Signer(actor_id=actor_id, role=role, public_key=key.public_key)


def check_result(envelope: Envelope[SiteResult], *, subject: str, signer: Signer | None,
                 accepted_before: str | None = None) -> Verdict:
    """Every check, in the leaderboard's order: who sent it, then what it claims."""
    for verdict in (check_origin(envelope, subject=subject, signer=signer),
                    check_job(envelope.data, scheduler_key=SCHEDULER.public_key)):
        if not verdict.ok:
            return verdict
    return check_binding(envelope.data, job=JOB, benchmark=benchmark(), accepted_before=accepted_before)


def check(envelope: Envelope[SiteResult], *, subject: str = subjects.results("site-a"),
          who: Signer | None = None, accepted_before: str | None = None) -> Verdict:
    return check_result(envelope, subject=subject, signer=who or signer(), accepted_before=accepted_before)


# --- the checks -----------------------------------------------------------------------------------------------


def test_a_result_signed_by_its_site_and_matching_its_job_is_accepted():
    verdict = check(signed(result()))

    assert verdict.ok and verdict.check is None


def test_the_metrics_hash_ignores_key_order_and_changes_with_any_value():
    assert metrics_hash({"auc": 0.8, "brier": 0.2}) == metrics_hash({"brier": 0.2, "auc": 0.8})
    assert metrics_hash({"auc": 0.8, "brier": 0.2}) != metrics_hash({"auc": 0.8000001, "brier": 0.2})
    assert metrics_hash({"auc": 0.8}).startswith("sha256:") and len(metrics_hash({"auc": 0.8})) == 71


def test_an_unsigned_result_is_rejected():
    verdict = check_result(Envelope.wrap(result(), source="site:site-a"), subject=subjects.results("site-a"),
                           signer=None)

    assert verdict.check is Check.SIGNATURE and "not signed" in verdict.reason


def test_a_result_signed_with_a_key_no_actor_holds_is_rejected():
    verdict = check_result(signed(result()), subject=subjects.results("site-a"), signer=None)

    assert verdict.check is Check.SIGNATURE and "no registered actor" in verdict.reason


def test_a_result_with_a_metric_changed_after_signing_is_rejected():
    original = signed(result())
    tampered = original.model_copy(update={"data": original.data.model_copy(
        update={"metrics": {"auc": 0.99, "brier": 0.2}})})

    verdict = check(tampered)

    assert not verdict.ok and verdict.check is Check.SIGNATURE
    assert verdict.reason.startswith("signature: the signature does not match the message content")


def test_a_result_whose_signature_is_not_made_by_the_signers_key_is_rejected():
    verdict = check(signed(result(), key=SITE_B), who=signer(key=SITE_A))

    assert verdict.check is Check.SIGNATURE and "signed with key" in verdict.reason


def test_a_result_signed_by_an_actor_that_is_not_a_site_is_rejected():
    verdict = check(signed(result()), who=signer(role=Role.MODEL_OWNER))

    assert verdict.check is Check.SIGNER_ROLE and "model_owner" in verdict.reason


def test_a_result_signed_by_another_site_is_rejected():
    verdict = check(signed(result(), key=SITE_B), who=signer(actor_id="site-b", key=SITE_B))

    assert verdict.check is Check.SIGNER_SITE
    assert verdict.reason == "signer_site: the result names site site-a but is signed by site site-b"


def test_a_result_published_on_another_sites_subject_is_rejected():
    verdict = check(signed(result()), subject=subjects.results("site-b"))

    assert verdict.check is Check.SUBJECT and "assay.v1.results.site-b" in verdict.reason


def test_a_result_carrying_a_job_not_signed_by_the_scheduler_is_rejected():
    made_up = SITE_A.sign(Envelope.wrap(JOB, source="site:site-a", id=JOB.job_id))

    verdict = check(signed(result(job=made_up)))

    assert verdict.check is Check.JOB_SIGNATURE and "not the scheduler's" in verdict.reason


def test_a_site_answering_a_job_sent_to_another_site_is_rejected():
    from_b = signed(result(site_id="site-b"), key=SITE_B)

    verdict = check(from_b, subject=subjects.results("site-b"), who=signer(actor_id="site-b", key=SITE_B))

    assert verdict.check is Check.JOB_SITE and "sent to site site-a, not to site site-b" in verdict.reason


@pytest.mark.parametrize("field", [f for f in JobBinding.model_fields if f != "benchmark_id"])
def test_a_result_that_differs_from_its_job_in_a_bound_field_is_rejected(field):
    value = OTHER_DIGEST if field.endswith(("image", "hash")) else 5000 if field == "case_count" else "someone-else"

    verdict = check(signed(result({field: value})))

    assert verdict.check is Check.BINDING
    assert f"{field} is {value}, the job has {getattr(JOB.binding, field)}" in verdict.reason


def test_a_result_claiming_another_benchmark_than_its_job_is_rejected():
    verdict = check_binding(result({"benchmark_id": "bm-2"}), job=JOB, benchmark=benchmark(), accepted_before=None)

    assert verdict.check is Check.BINDING and "benchmark_id is bm-2, the job has bm" in verdict.reason


def test_a_result_missing_a_declared_metric_is_rejected():
    verdict = check(signed(result(metrics={"auc": 0.8})))

    assert verdict.check is Check.METRIC_NAMES and "missing ['brier']" in verdict.reason


def test_a_result_with_an_undeclared_metric_is_rejected():
    verdict = check(signed(result(metrics={"auc": 0.8, "brier": 0.2, "secret_per_case": 0.1})))

    assert verdict.check is Check.METRIC_NAMES and "undeclared ['secret_per_case']" in verdict.reason


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_result_with_a_metric_that_is_not_a_finite_number_is_rejected(value):
    verdict = check_binding(result(metrics={"auc": value, "brier": 0.2}), job=JOB, benchmark=benchmark(),
                            accepted_before=None)

    assert verdict.check is Check.METRIC_VALUE and "not a finite number" in verdict.reason


@pytest.mark.parametrize("value", [-0.01, 1.01])
def test_a_result_with_a_metric_outside_its_declared_range_is_rejected(value):
    verdict = check(signed(result(metrics={"auc": value, "brier": 0.2})))

    assert verdict.check is Check.METRIC_VALUE
    assert verdict.reason == f"metric_value: auc = {value} is outside its declared range [0.0, 1.0]"


def test_the_ends_of_a_declared_range_are_accepted():
    assert check(signed(result(metrics={"auc": 1.0, "brier": 0.0}))).ok


def test_a_result_whose_metrics_hash_does_not_match_its_metrics_is_rejected():
    verdict = check(signed(result(metrics_hash=metrics_hash({"auc": 0.9, "brier": 0.2}))))

    assert verdict.check is Check.METRICS_HASH


def test_a_second_valid_result_for_a_job_is_not_counted():
    verdict = check(signed(result()), accepted_before="job-1")

    assert verdict.check is Check.DUPLICATE and "job-1 already has an accepted result" in verdict.reason


def test_a_result_of_another_round_of_a_pair_already_counted_is_not_counted():
    verdict = check(signed(result()), accepted_before="job-1-r1")

    assert verdict.check is Check.DUPLICATE
    assert "already has an accepted result (job job-1-r1); this one is not counted" in verdict.reason


def test_every_rejection_reason_starts_with_the_name_of_the_failed_check():
    verdict = check(signed(result(metrics={"auc": 0.8})))

    assert verdict.reason.startswith(f"{verdict.check.value}: ")


# --- pooling and ranking ------------------------------------------------------------------------------------


def score(model: str, site: str, auc: float, cases: int = 100, brier: float = 0.1) -> Score:
    return Score(model_id=model, site_id=site, metrics={"auc": auc, "brier": brier}, case_count=cases)


def test_the_model_with_the_higher_primary_metric_ranks_first_when_higher_is_better():
    board = aggregate(benchmark(), [score("weak", "site-a", 0.6), score("strong", "site-a", 0.9)])

    assert [(row.rank, row.model_id) for row in board.rows] == [(1, "strong"), (2, "weak")]


def test_the_model_with_the_lower_primary_metric_ranks_first_when_lower_is_better():
    board = aggregate(benchmark(higher_is_better=False),
                      [score("weak", "site-a", 0.6), score("strong", "site-a", 0.9)])

    assert [(row.rank, row.model_id) for row in board.rows] == [(1, "weak"), (2, "strong")]


def test_tied_models_share_a_rank_and_the_next_model_skips_one():
    board = aggregate(benchmark(), [score("b", "site-a", 0.8), score("a", "site-a", 0.8), score("c", "site-a", 0.7)])

    assert [(row.rank, row.model_id) for row in board.rows] == [(1, "a"), (1, "b"), (3, "c")]


def test_pooled_values_that_differ_only_by_rounding_are_a_tie():
    split = [score("split", "site-a", 0.1, cases=1), score("split", "site-b", 0.7, cases=1)]
    board = aggregate(benchmark(), [*split, score("whole", "site-a", 0.4)])

    assert board.rows[0].pooled["auc"] != board.rows[1].pooled["auc"]  # 0.39999999999999997 and 0.4
    assert [row.rank for row in board.rows] == [1, 1]


def test_shared_ranks_handle_no_values_and_one_value():
    assert shared_ranks([], [], higher_is_better=True) == []
    assert shared_ranks([0.3], [None], higher_is_better=False) == [1]


def test_pooled_values_are_the_case_weighted_mean_of_the_site_values():
    board = aggregate(benchmark(), [score("m", "site-a", 0.9, cases=300, brier=0.1),
                                    score("m", "site-b", 0.5, cases=100, brier=0.3)])

    (row,) = board.rows
    assert row.pooled["auc"] == pytest.approx((0.9 * 300 + 0.5 * 100) / 400)
    assert row.pooled["brier"] == pytest.approx((0.1 * 300 + 0.3 * 100) / 400)
    assert row.site_values == {"site-a": {"auc": 0.9, "brier": 0.1}, "site-b": {"auc": 0.5, "brier": 0.3}}
    assert (row.case_count, row.sites) == (400, 2)


def test_case_weighting_can_reverse_the_order_an_unweighted_mean_would_give():
    big_site_good = [score("a", "site-a", 0.9, cases=900), score("a", "site-b", 0.5, cases=100)]
    small_site_good = [score("b", "site-a", 0.8, cases=900), score("b", "site-b", 0.7, cases=100)]

    board = aggregate(benchmark(), [*big_site_good, *small_site_good])

    assert [row.model_id for row in board.rows] == ["a", "b"]  # unweighted: a 0.70 < b 0.75


def test_two_datasets_at_one_site_count_as_one_site_with_their_cases_weighted():
    board = aggregate(benchmark(), [score("m", "site-a", 0.6, cases=100), score("m", "site-a", 0.9, cases=200)])

    (row,) = board.rows
    assert row.sites == 1 and row.case_count == 300
    assert row.site_values["site-a"]["auc"] == pytest.approx(0.8)


def test_the_board_names_the_benchmark_its_primary_metric_and_all_its_metrics():
    board = aggregate(benchmark(), [])

    assert (board.benchmark_id, board.primary_metric, board.metrics, board.rows) == ("bm", "auc", ("auc", "brier"), ())
