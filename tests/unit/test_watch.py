"""`assay watch`'s rule: which events are the watcher's business, and the line each becomes."""

from __future__ import annotations

from contracts import messages as m
from assay.watch_cli import Mine, concerns

BINDING = m.JobBinding(benchmark_id="bm", model_id="model-1", dataset_id="ds", model_image="sha256:" + "1" * 64,
                       evaluator_image="sha256:" + "2" * 64, dataset_hash="sha256:" + "3" * 64, case_count=10)


def test_a_request_to_my_benchmark_waits_for_me_and_says_how_to_approve_it():
    line = concerns(m.AssociationRequested(benchmark_id="bm", kind=m.EntityKind.MODEL, entity_id="model-1",
                                           requested_by="vendor"), Mine("owner", benchmarks={"bm"}))
    assert line == ("waiting for you: vendor asks model model-1 into bm (assay association approve bm --model "
                    "model-1)")


def test_my_models_decisions_results_and_troubles_concern_me_and_others_do_not():
    mine = Mine("vendor", models={"model-1"})
    rejected = m.AssociationRejected(benchmark_id="bm", kind=m.EntityKind.MODEL, entity_id="model-1",
                                     rejected_by="owner", reason="image too large")
    assert concerns(rejected, mine) == "rejected: model model-1 in bm: image too large"
    accepted = m.ResultAccepted(job_id="job-1", site_id="site-a", binding=BINDING)
    assert concerns(accepted, mine).startswith("new result: model model-1 at site-a on bm")
    failed = m.JobStateChanged(job_id="job-1234567890abcdef", site_id="site-a", benchmark_id="bm", model_id="model-1",
                               state=m.JobState.FAILED, reason="the model timed out after 600 s")
    assert concerns(failed, mine) == "job job-123456789 failed: model model-1 at site-a: the model timed out after 600 s"
    held = failed.model_copy(update={"state": m.JobState.HELD})
    assert concerns(held, mine) is None
    assert concerns(accepted, Mine("rival", models={"model-2"})) is None


def test_what_i_register_while_watching_becomes_mine():
    mine = Mine("vendor")
    concerns(m.ModelRegistered(model_id="model-2", owner_id="vendor", name="m", image=m.ImageRef(
        digest="sha256:" + "1" * 64, name="m")), mine)
    invited = m.AssociationInvited(benchmark_id="bm", kind=m.EntityKind.MODEL, entity_id="model-2",
                                   invited_by="owner")
    assert concerns(invited, mine) == ("invited: owner invites model model-2 into bm (assay association accept bm "
                                       "--model model-2)")


def test_a_passed_check_concerns_both_sides_of_the_pair_and_says_where_its_metrics_are():
    checked = m.CheckCompleted(job_id="check-1", site_id="committee", benchmark_id="bm", kind=m.EntityKind.MODEL,
                               entity_id="model-1", sealed_metrics="sealed", case_count=20)
    line = ("check passed: model model-1 for bm, at committee (its metrics: assay association show bm --model "
            "model-1)")
    assert concerns(checked, Mine("vendor", models={"model-1"})) == line
    assert concerns(checked, Mine("owner", benchmarks={"bm"})) == line
    assert concerns(checked, Mine("rival", models={"model-2"})) is None
