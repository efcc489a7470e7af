"""The board's statistics against independent computation: pooled values by hand and by scikit-learn over the pooled
cases, intervals by numpy percentiles of hand-pooled replicates, ranks and ties on boards whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from contracts.messages import (
    BenchmarkSpec,
    Confusion,
    Evidence,
    Histograms,
    ImageRef,
    MetricKind,
    MetricSpec,
    Pooling,
    PublicView,
    Role,
    Sharing,
)
from contracts.statistics import bin_of, disagreement, histogram_auc
from leaderboard.board import Score, aggregate, kendall_tau, pool, rank_distribution, shared_ranks, with_intervals
from leaderboard.sharing import NOBODY, Asker, announcement, view

SENSITIVITY = MetricSpec(name="sensitivity", kind=MetricKind.SENSITIVITY)
SPECIFICITY = MetricSpec(name="specificity", kind=MetricKind.SPECIFICITY)
AUC = MetricSpec(name="auc", kind=MetricKind.AUC)
POOLING = Pooling(replicates=200, confusion=True, bins=20, min_count=1)


def benchmark(*metrics: MetricSpec, sharing: Sharing | None = None) -> BenchmarkSpec:
    image = ImageRef(digest="sha256:" + "1" * 64, name="img")
    return BenchmarkSpec(benchmark_id="bm", name="B", preparator=image, reference_model=image, evaluator=image,
                         metrics=metrics or (AUC, SENSITIVITY, SPECIFICITY), primary_metric=(metrics or (AUC,))[0].name,
                         pooling=POOLING, sharing=sharing or Sharing())


def counted(model: str, site: str, tp: int, fn: int, tn: int, fp: int) -> Score:
    sens, spec = tp / (tp + fn), tn / (tn + fp)
    return Score(model_id=model, site_id=site, metrics={"sensitivity": sens, "specificity": spec, "auc": 0.5},
                 case_count=tp + fn + tn + fp, confusion=Confusion(tp=tp, fp=fp, tn=tn, fn=fn))


def test_pooled_sensitivity_weighs_each_site_by_its_positives_not_its_cases():
    # a screening site (19 of 141 malignant) and a referral centre (85 of 124): the same counts a hand would add
    screening, referral = counted("m", "a", tp=10, fn=9, tn=110, fp=12), counted("m", "b", tp=80, fn=5, tn=30, fp=9)

    pooled = pool(SENSITIVITY, [screening, referral])

    assert pooled.value == (10 + 80) / (19 + 85)
    assert pooled.method == "exact: pooled confusion counts"
    case_weighted = (10 / 19 * 141 + 80 / 85 * 124) / 265
    assert abs(pooled.value - case_weighted) > 0.05  # what the board used to show, and why it was wrong
    assert pool(SPECIFICITY, [screening, referral]).value == (110 + 30) / (122 + 39)


def test_without_confusion_counts_from_every_site_the_pooled_value_is_the_named_case_weighted_mean():
    withheld = Score(model_id="m", site_id="c", metrics={"sensitivity": 0.5}, case_count=100)
    pooled = pool(SENSITIVITY, [counted("m", "a", tp=10, fn=10, tn=70, fp=10), withheld])

    assert pooled.value == pytest.approx((0.5 * 100 + 0.5 * 100) / 200)
    assert pooled.method == "case-weighted mean of site values (a site withheld its aggregates)"


def cases(rng: np.random.Generator, n: int, prevalence: float, separation: float) -> tuple[np.ndarray, np.ndarray]:
    labels = (rng.random(n) < prevalence).astype(int)
    scores = np.clip(rng.normal(0.5 + separation * (labels - 0.5), 0.2), 0, 1)
    return labels, scores


def histograms(labels: np.ndarray, scores: np.ndarray) -> Histograms:
    bins = [bin_of(float(s), POOLING) for s in scores]
    return Histograms(positive=tuple(sum(1 for b, y in zip(bins, labels) if y == 1 and b == k) for k in range(20)),
                      negative=tuple(sum(1 for b, y in zip(bins, labels) if y == 0 and b == k) for k in range(20)))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pooled_auc_from_histograms_is_scikit_learns_auc_over_the_pooled_cases_within_the_bin_error(seed):
    rng = np.random.default_rng(seed)
    sites = [cases(rng, 141, 0.19, 0.5), cases(rng, 133, 0.27, 0.3), cases(rng, 124, 0.69, 0.6)]
    scores = [Score(model_id="m", site_id=f"s{i}", metrics={"auc": roc_auc_score(y, s)}, case_count=len(y),
                    histograms=histograms(y, s)) for i, (y, s) in enumerate(sites)]

    pooled = pool(AUC, scores)

    truth = roc_auc_score(np.concatenate([y for y, _ in sites]), np.concatenate([s for _, s in sites]))
    assert pooled.method == "exact: pooled score histograms"
    assert 0 < pooled.bin_error < 0.05
    assert abs(pooled.value - truth) <= pooled.bin_error


def test_a_histogram_auc_with_one_case_per_bin_is_exact():
    assert histogram_auc(Histograms(positive=(0, 1, 0, 1), negative=(1, 0, 1, 0))) == (0.75, 0.0)


def test_the_pooled_interval_is_the_percentile_interval_of_the_replicates_pooled_by_positives():
    rng = np.random.default_rng(7)
    a, b = counted("m", "a", tp=10, fn=9, tn=110, fp=12), counted("m", "b", tp=80, fn=5, tn=30, fp=9)
    reps = {site: rng.binomial(p, s, 200) / p for site, p, s in (("a", 19, 10 / 19), ("b", 85, 80 / 85))}
    a = Score(**{**a.__dict__, "replicates": {"sensitivity": reps["a"]}})
    b = Score(**{**b.__dict__, "replicates": {"sensitivity": reps["b"]}})

    pooled = pool(SENSITIVITY, [a, b])

    by_hand = (reps["a"] * 19 + reps["b"] * 85) / 104  # replicate r: the resampled sites' true positives over positives
    assert np.allclose(pooled.replicates, by_hand)
    low, high = np.percentile(by_hand, [2.5, 97.5])
    interval = with_intervals({("", "sensitivity"): pooled})[("", "sensitivity")].interval
    assert (interval.low, interval.high) == pytest.approx((low, high))


def test_models_whose_intervals_overlap_share_a_rank_and_one_beaten_beyond_doubt_ranks_below_both():
    from contracts.messages import Interval

    ranks = shared_ranks([0.90, 0.88, 0.70], [Interval(low=0.85, high=0.94), Interval(low=0.84, high=0.91),
                                              Interval(low=0.60, high=0.80)], higher_is_better=True)
    assert ranks == [1, 1, 3]
    # lower is better: the same intervals, mirrored
    assert shared_ranks([0.1, 0.12, 0.3], [Interval(low=0.06, high=0.15), Interval(low=0.09, high=0.16),
                                           Interval(low=0.2, high=0.4)], higher_is_better=False) == [1, 1, 3]


def test_a_chain_of_overlaps_ranks_each_model_by_those_that_beat_it_beyond_doubt():
    from contracts.messages import Interval

    ranks = shared_ranks([0.9, 0.8, 0.7], [Interval(low=0.85, high=0.95), Interval(low=0.75, high=0.86),
                                           Interval(low=0.65, high=0.76)], higher_is_better=True)
    assert ranks == [1, 1, 2]  # the last overlaps the second, not the first


def test_rank_probabilities_count_each_replicates_ranking():
    replicates = np.array([[0.9, 0.8, 0.9, 0.9], [0.8, 0.9, 0.7, 0.8], [0.1, 0.2, 0.3, 0.4]])

    probabilities = rank_distribution(replicates, higher_is_better=True)

    assert probabilities.tolist() == [[0.75, 0.25, 0.0], [0.25, 0.75, 0.0], [0.0, 0.0, 1.0]]


def test_rank_stability_is_one_when_every_replicate_keeps_the_order_and_lower_when_they_swap():
    point = np.array([0.9, 0.8, 0.7])
    kept = np.array([[0.95, 0.91], [0.85, 0.81], [0.65, 0.71]])
    assert kendall_tau(point, kept) == pytest.approx(1.0)
    swapped = np.array([[0.8, 0.8, 0.8], [0.9, 0.9, 0.9], [0.7, 0.7, 0.7]])
    assert kendall_tau(point, swapped) == pytest.approx(1 / 3)  # 2 of 3 pairs concordant
    assert kendall_tau(point[:1], kept[:1]) is None


def replicated(model: str, site: str, center: float, spread: float, seed: int) -> Score:
    reps = np.clip(np.random.default_rng(seed).normal(center, spread, 200), 0, 1)
    return Score(model_id=model, site_id=site, metrics={"auc": center}, case_count=100, replicates={"auc": reps})


def test_the_board_ranks_shares_and_reports_rank_probabilities_and_the_worst_site():
    scores = [replicated("close-1", "a", 0.90, 0.02, 1), replicated("close-1", "b", 0.80, 0.02, 2),
              replicated("close-2", "a", 0.89, 0.02, 3), replicated("close-2", "b", 0.80, 0.02, 4),
              replicated("far", "a", 0.60, 0.02, 5), replicated("far", "b", 0.55, 0.02, 6)]

    board = aggregate(benchmark(AUC), scores)

    assert [(row.model_id, row.rank_label) for row in board.rows] == [("close-1", "1="), ("close-2", "1="),
                                                                      ("far", "3")]
    first = board.rows[0]
    assert first.worst_site["auc"].site == "b" and first.mean_of_sites["auc"] == pytest.approx(0.85)
    assert sum(first.rank_probabilities) == pytest.approx(1.0)
    assert board.rows[2].rank_probabilities[2] == 1.0
    assert 0.3 < board.rank_stability <= 1.0 and board.replicates == 200
    assert set(first.site_intervals) == {"a", "b"} and first.intervals["auc"].low < first.pooled["auc"]


def shared_board(sharing: Sharing):
    bench = benchmark(AUC, sharing=sharing)
    scores = [replicated("m1", "hosp-a", 0.9, 0.01, 1), replicated("m1", "hosp-b", 0.8, 0.01, 2),
              replicated("m2", "hosp-a", 0.7, 0.01, 3)]
    board = aggregate(bench, scores)
    return bench, board, {"m1": "vendor-1", "m2": "vendor-2"}


def seen(sharing: Sharing, asker: Asker):
    bench, board, owners = shared_board(sharing)
    return view(board, bench, owner_id="committee", asker=asker, model_owners=owners,
                site_order=["hosp-b", "hosp-a"])


def test_the_benchmark_owner_and_an_auditor_see_everything():
    for asker in (Asker("committee", Role.BENCHMARK_OWNER), Asker("anyone", Role.AUDITOR)):
        board = seen(Sharing(public=PublicView.NONE, pseudonyms=True), asker)
        assert board.view == "full" and {r.model_id: set(r.site_values) for r in board.rows} == {
            "m1": {"hosp-a", "hosp-b"}, "m2": {"hosp-a"}}


def test_a_model_owner_sees_its_own_rows_sites_and_only_the_public_part_of_others():
    board = seen(Sharing(), Asker("vendor-2", Role.MODEL_OWNER))

    rows = {row.model_id: row for row in board.rows}
    assert rows["m2"].site_values == {"hosp-a": {"auc": 0.7}}
    assert rows["m1"].site_values == {} and rows["m1"].pooled["auc"] == pytest.approx(0.85)
    assert rows["m1"].worst_site["auc"].site == ""  # its value is public, which site it is not


def test_with_nothing_public_a_model_owner_sees_only_its_own_rows_and_a_stranger_nothing():
    mine = seen(Sharing(public=PublicView.NONE), Asker("vendor-2", Role.MODEL_OWNER))
    assert [row.model_id for row in mine.rows] == ["m2"] and mine.hidden == 1
    nobody = seen(Sharing(public=PublicView.NONE), NOBODY)
    assert nobody.rows == () and nobody.hidden == 2


def test_a_site_sees_its_own_column_under_its_own_name_and_others_under_pseudonyms():
    site = seen(Sharing(pseudonyms=True), Asker("hosp-a", Role.SITE))
    assert {row.model_id: row.site_values for row in site.rows} == {"m1": {"hosp-a": {"auc": 0.9}},
                                                                     "m2": {"hosp-a": {"auc": 0.7}}}
    owner = seen(Sharing(pseudonyms=True), Asker("vendor-1", Role.MODEL_OWNER))
    assert set(owner.rows[0].site_values) == {"site-1", "site-2"}  # hosp-b was accepted first


def test_a_site_below_the_minimum_cases_has_no_column_for_a_model_owner():
    board = seen(Sharing(min_cases=101), Asker("vendor-1", Role.MODEL_OWNER))
    assert board.rows[0].site_values == {}


def test_the_announcement_carries_only_what_is_public():
    bench, board, _ = shared_board(Sharing(public=PublicView.NONE))
    quiet = announcement(board, bench, "m1")
    assert (quiet.model_id, quiet.rank, quiet.pooled, quiet.models) == (None, None, {}, 2)
    bench, board, _ = shared_board(Sharing())
    loud = announcement(board, bench, "m1")
    assert (loud.model_id, loud.rank) == ("m1", 1) and "auc" in loud.intervals


def test_evidence_that_disagrees_with_its_metrics_is_named():
    specs = (SENSITIVITY, AUC)
    counts = Confusion(tp=8, fn=2, tn=85, fp=5)
    fine = Evidence(replicates={"sensitivity": (0.8,) * 200, "auc": (0.9,) * 200}, confusion=counts)
    assert disagreement(fine, {"sensitivity": 0.8, "auc": 0.9}, specs, POOLING, 100) is None
    assert "the confusion counts give 0.8" in disagreement(fine, {"sensitivity": 0.9, "auc": 0.9}, specs, POOLING, 100)
    assert "add up to 100, not 120" in disagreement(fine, {"sensitivity": 0.8, "auc": 0.9}, specs, POOLING, 120)
    short = fine.model_copy(update={"replicates": {"sensitivity": (0.8,) * 3, "auc": (0.9,) * 200}})
    assert "has 3 replicates" in disagreement(short, {"sensitivity": 0.8, "auc": 0.9}, specs, POOLING, 100)
    small = fine.model_copy(update={"confusion": Confusion(tp=8, fn=2, tn=89, fp=1)})
    strict = POOLING.model_copy(update={"min_count": 2})
    assert "fewer than 2" in disagreement(small, {"sensitivity": 0.8, "auc": 0.9}, specs, strict, 100)
    assert "asks for ['auc', 'sensitivity']" in disagreement(Evidence(), {"sensitivity": 0.8, "auc": 0.9}, specs,
                                                              POOLING, 100)


async def test_a_board_made_again_pools_only_the_models_whose_results_changed():
    from leaderboard.current import Boards

    bench = benchmark(AUC)
    scores = [replicated("m1", "a", 0.9, 0.01, 1), replicated("m2", "a", 0.7, 0.01, 2)]
    loaded: list[list[str]] = []

    async def load(models):
        loaded.append(sorted(models))
        return [s for s in scores if s.model_id in models]

    boards = Boards()
    listing = [("m1", "job-1", "0.9"), ("m2", "job-2", "0.7")]
    first = await boards.board(bench, listing, load)
    again = await boards.board(bench, listing, load)
    assert first == again == aggregate(bench, scores)
    scores.append(replicated("m2", "b", 0.5, 0.01, 3))
    third = await boards.board(bench, [*listing, ("m2", "job-3", "0.5")], load)
    scores[0] = Score(**{**scores[0].__dict__, "metrics": {"auc": 0.1}})  # a row changed in the database
    fourth = await boards.board(bench, [("m1", "job-1", "0.1"), *listing[1:], ("m2", "job-3", "0.5")], load)

    assert loaded == [["m1", "m2"], ["m2"], ["m1"]]
    assert third.rows[1].sites == 2
    assert fourth == aggregate(bench, scores) and fourth.rows[0].pooled == {"auc": 0.1}
