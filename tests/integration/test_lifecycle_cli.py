"""An entity's life through the `assay` command against a real nats-server and the four real services: a benchmark
edited in DEVELOPMENT, a frozen field refused in OPERATION with the diff shown first, a new model version linked, and
an archived model whose queued job is cancelled and whose results stay on the board, marked, as `assay verify`
finds them too."""

from __future__ import annotations

import asyncio

from contracts import messages as m
from tests.integration.test_consent_cli import cli, registered_dataset
from tests.integration.test_verify import scoring
from tests.support.federation import Federation, in_state, next_events


async def counted(federation: Federation) -> None:
    """model-1's result from site-a on the board (site-a's worker scores its two cases), and an auditor."""
    await federation.start_site("site-a", scoring({"c1": (1, 0.9), "c2": (0, 0.2)}, {"auc": 1.0, "sensitivity": 1.0}))
    await federation.benchmark()
    await federation.enrol("auditor", m.Role.AUDITOR)
    await federation.model("model-1")
    await federation.dataset("site-a", "ds-a")
    await next_events(federation.nats_url, "assay.v1.evt.result.accepted", 1)


async def counted_and_queued(federation: Federation) -> None:
    """And model-1's job for site-b's dataset, waiting in the queue of a site that runs no worker."""
    await counted(federation)
    await registered_dataset(federation, "site-b", "ds-b")
    await federation.send(m.RequestAssociation(benchmark_id="bench", kind=m.EntityKind.DATASET, entity_id="ds-b"),
                          "site-b")
    await federation.send(m.ApproveAssociation(benchmark_id="bench", kind=m.EntityKind.DATASET, entity_id="ds-b"),
                          "owner")
    await next_events(federation.nats_url, "assay.v1.evt.job.scheduled.*", 2)


async def test_a_frozen_field_is_refused_in_operation_after_the_diff_and_a_name_may_change(federation: Federation):
    spec = await federation.benchmark()
    edited = spec.model_copy(update={"name": "Renamed", "primary_metric": "sensitivity"})
    (federation.root / "edited.json").write_text(edited.model_dump_json())

    code, said = await cli(federation, "benchmark", "edit", str(federation.root / "edited.json"), "--as", "owner")

    assert code == 1 and "benchmark bench: what changes" in said and "primary_metric" in said
    assert "primary_metric of benchmark bench cannot change in OPERATION: they define the results" in said
    (federation.root / "renamed.json").write_text(spec.model_copy(update={"name": "Renamed"}).model_dump_json())
    code, said = await cli(federation, "benchmark", "edit", str(federation.root / "renamed.json"), "--as", "owner")
    assert code == 0 and "benchmark bench edited: name" in said
    code, said = await cli(federation, "benchmark", "show", "bench")
    assert code == 0 and '"name": "Renamed"' in said


async def test_an_archived_model_is_never_scheduled_again_and_its_results_stay_marked(federation: Federation):
    await counted_and_queued(federation)

    code, said = await cli(federation, "model", "archive", "model-1", "--reason", "superseded by model-2",
                           "--as", "vendor")
    assert code == 0 and "model model-1 archived: never scheduled again" in said
    (cancelled,) = await next_events(federation.nats_url, "assay.v1.evt.job.state_changed.*", 1,
                                     where=in_state("CANCELLED"))
    assert cancelled["data"]["state"] == "CANCELLED" and "archived by vendor" in cancelled["data"]["reason"]

    version = await federation.send(m.RegisterModel(model_id="model-2", name="m2", image=m.ImageRef(
        digest="sha256:" + "3" * 64, name="m2"), previous="model-1"), "vendor")  # what --version-of sends
    assert "a new version of model-1" in version["message"]
    code, listed = await cli(federation, "model", "list", "--as", "owner")
    assert "ARCHIVED" in listed and "version of model-1" in listed
    code, said = await cli(federation, "association", "request", "bench", "--model", "model-1", "--as", "vendor")
    assert code == 1 and "model model-1 is archived: it joins nothing any more" in said

    row = next(r for r in (await federation.board()).rows if r.model_id == "model-1")
    assert row.sites == 1 and row.marks[0].startswith("model model-1 archived by vendor")
    code, said = await cli(federation, "verify", "bench", "--as", "auditor")
    assert code == 0, said


async def test_a_suspended_actor_is_refused_its_jobs_cancelled_and_its_results_marked(federation: Federation):
    await counted_and_queued(federation)

    code, said = await cli(federation, "actor", "suspend", "site-b", "--reason", "its key was leaked",
                           "--as", "operator")
    assert code == 0 and "actor site-b suspended" in said
    (cancelled,) = await next_events(federation.nats_url, "assay.v1.evt.job.state_changed.*", 1,
                                     where=in_state("CANCELLED"))
    assert cancelled["data"]["state"] == "CANCELLED" and "site site-b was suspended" in cancelled["data"]["reason"]
    code, said = await cli(federation, "association", "revoke", "bench", "--dataset", "ds-b", "--reason", "x",
                           "--as", "site-b")
    assert code == 1 and "actor site-b is suspended by the operator: its key was leaked" in said

    code, said = await cli(federation, "actor", "suspend", "vendor", "--reason", "terms broken", "--as", "operator")
    assert code == 0
    await next_events(federation.nats_url, "assay.v1.evt.actor.suspended", 2)
    row = None
    for _ in range(100):  # the leaderboard learns of it from the event history
        row = (await federation.board()).rows[0]
        if row.marks:
            break
        await asyncio.sleep(0.1)
    assert row is not None and row.marks[0].startswith("model model-1 suspended (its owner) by the operator")
    code, said = await cli(federation, "verify", "bench", "--as", "auditor")
    assert code == 0, said


async def test_a_rotated_key_keeps_what_it_signed_before_and_signs_nothing_after(federation: Federation):
    await counted(federation)

    code, said = await cli(federation, "keys", "rotate", "site-a")
    assert code == 0 and "signs with key" in said and "retired" in said
    old = next((federation.root / "keys").glob("site-a.key.retired-*"))
    (federation.root / "keys" / "old-site-a.key").write_bytes(old.read_bytes())
    code, said = await cli(federation, "dataset", "list", "--as", "old-site-a")
    assert code == 1 and "of actor site-a was retired at" in said
    code, said = await cli(federation, "dataset", "list", "--as", "site-a")  # the new key
    assert code == 0 and "ds-a" in said

    await federation.model("model-2")  # a new job: the running worker still signs with the key it started with
    (rejected,) = await next_events(federation.nats_url, "assay.v1.evt.result.rejected", 1)
    assert "which site-a retired at" in rejected["data"]["reason"]
    assert [row.model_id for row in (await federation.board()).rows] == ["model-1"]  # signed before: it stays
    code, said = await cli(federation, "verify", "bench", "--as", "auditor")
    assert code == 0, said
