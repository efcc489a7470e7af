"""An intruder floods the results stream with 2,000 forged results ahead of a genuine one: half carry a job captured
off the wire under keys nobody registered, half a job the intruder made up. Each is rejected on its first delivery
with its reason, none waits in the consumer or in the leaderboard's park, and the genuine result behind them is
counted: the flood delays it by the time it takes to reject the forgeries, not by hours."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import nats
import pytest

from contracts import messages as m
from contracts import subjects
from contracts.envelope import Envelope
from contracts.signing import KeyPair, metrics_hash
from tests.support.federation import Federation, fake_containers, next_events

FORGED = 2_000
METRICS = {"auc": 0.7, "sensitivity": 0.6}
PERFECT = {"auc": 1.0, "sensitivity": 1.0}


def forgeries(genuine: Envelope[m.SiteResult]) -> list[Envelope[m.SiteResult]]:
    forgers = [KeyPair.generate() for _ in range(20)]
    made_up = genuine.data.job.data.model_copy(update={"job_id": "job-made-up"})
    out = []
    for n in range(FORGED):
        forger = forgers[n % len(forgers)]
        job = genuine.data.job if n % 2 else forger.sign(Envelope.wrap(made_up, source="service:scheduling"))
        result = genuine.data.model_copy(update={"job": job, "job_id": job.data.job_id, "metrics": PERFECT,
                                                 "metrics_hash": metrics_hash(PERFECT),
                                                 "finished_at": datetime.now(UTC)})
        out.append(forger.sign(Envelope.wrap(result, source="site:site-a")))
    return out


async def test_2000_forged_results_delay_a_genuine_one_only_by_the_time_to_reject_them(
        federation: Federation, record_property: pytest.RecordProperty) -> None:
    await federation.start_site("site-a", fake_containers(METRICS))
    await federation.benchmark()
    await federation.dataset("site-a", "ds-a")
    started = time.monotonic()
    await federation.model("model-1")
    await next_events(federation.nats_url, subjects.evt("result", "accepted"), 1)
    alone = time.monotonic() - started  # the same path with no flood: register, approve, plan, run, judge
    nc = await nats.connect(federation.nats_url)
    try:
        js = nc.jetstream()
        captured = await js.get_msg(subjects.RESULTS_STREAM, subject=subjects.results("site-a"))  # the intruder
        flood = forgeries(Envelope[m.SiteResult].model_validate_json(captured.data))  # read a genuine result
        started = time.monotonic()
        for forged in flood:
            await js.publish(subjects.results("site-a"), forged.model_dump_json().encode(),
                             headers={"Nats-Msg-Id": forged.id})
        await federation.model("model-2")  # a genuine job; its result lands behind the whole flood

        accepted = await next_events(federation.nats_url, subjects.evt("result", "accepted"), 2, timeout_s=600)
        delay = time.monotonic() - started
        rejected = await next_events(federation.nats_url, subjects.evt("result", "rejected"), FORGED, timeout_s=60)
        consumer = await js.consumer_info(subjects.RESULTS_STREAM, "leaderboard-results")
    finally:
        await nc.close()

    record_property("genuine_result_s", {"alone": round(alone, 1), "behind_the_flood": round(delay, 1)})
    print(f"\na genuine result took {alone:.1f} s alone and {delay:.1f} s behind {FORGED} forged results "
          f"({(delay - alone) / FORGED * 1000:.1f} ms to reject each)")
    assert [event["data"]["binding"]["model_id"] for event in accepted] == ["model-1", "model-2"]
    reasons = sorted({event["data"]["reason"].split(":")[0] for event in rejected})
    assert reasons == ["job_signature", "signature"] and len(rejected) == FORGED
    assert consumer.num_redelivered == 0 and consumer.num_ack_pending == 0  # each settled the first time
    board = await federation.board()
    assert {row.model_id: row.pooled["auc"] for row in board.rows} == {"model-1": 0.7, "model-2": 0.7}
