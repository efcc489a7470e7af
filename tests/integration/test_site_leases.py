"""Leases on a real nats-server: a crashed worker's job is delivered again; a long job keeps its lease."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from contracts import messages as m
from site_worker.containers import RunOutcome, RunSpec
from tests.support.federation import Federation, benchmark_tasks, fake_containers, next_events, tasks_by_job

METRICS = {"auc": 0.9, "sensitivity": 0.7}


async def start(nats_url: str, tmp_path: Path) -> Federation:
    fed = Federation(nats_url, tmp_path, lambda name: f"sqlite+aiosqlite:///{tmp_path / name}.db")
    await fed.start_services()
    return fed


async def test_a_job_held_by_a_worker_killed_mid_job_is_delivered_again_and_counted_once(
        nats_url: str, tmp_path: Path) -> None:
    fed = await start(nats_url, tmp_path)
    marker = tmp_path / "started"
    site_dir = tmp_path / "sites" / "site-a"
    site_dir.mkdir(parents=True)
    fed.key("site-a")
    env = {**os.environ, "HANGING_WORKER_MARKER": str(marker), "ASSAY_SITE_SITE_ID": "site-a",
           "ASSAY_SITE_KEY_FILE": str(tmp_path / "keys" / "site-a.key"), "ASSAY_SITE_NATS_URL": nats_url,
           "ASSAY_SITE_SCHEDULER_PUBLIC_KEY": fed.key("scheduling").public_key,
           "ASSAY_SITE_DATASETS_FILE": str(site_dir / "datasets.json"), "ASSAY_SITE_WORK_DIR": str(site_dir / "jobs"),
           "ASSAY_SITE_ACK_WAIT_S": "2", "ASSAY_SITE_HEARTBEAT_S": "60"}
    doomed = subprocess.Popen([sys.executable, "-m", "tests.support.hanging_worker"], env=env,
                              cwd=Path(__file__).parents[2])
    try:
        await fed.benchmark()
        await fed.model("model-1")
        await fed.dataset("site-a", "ds-a")
        while not marker.exists():  # the doomed worker has the job and is running its model
            assert doomed.poll() is None, "the worker process died early"
            await asyncio.sleep(0.05)
        doomed.send_signal(signal.SIGKILL)  # a real crash: no ack, no result, no heartbeat
        doomed.wait()
        second = fake_containers(METRICS)
        await fed.start_site("site-a", second, ack_wait_s=2.0, heartbeat_s=60.0, worker_id="worker-2")
        (accepted,) = await next_events(nats_url, "assay.v1.evt.result.accepted", 1)
        assert accepted["data"]["site_id"] == "site-a"
        assert benchmark_tasks(second.specs) == ["infer", "evaluate"]
        assert (await fed.board()).rows[0].case_count == 2
    finally:
        doomed.kill()
        await fed.stop()


async def test_a_job_longer_than_the_ack_wait_keeps_its_lease_with_heartbeats(nats_url: str, tmp_path: Path) -> None:
    fed = await start(nats_url, tmp_path)
    slow = fake_containers(METRICS)
    original = slow.run
    runs: list[RunSpec] = []

    def take_time(spec: RunSpec) -> RunOutcome:
        runs.append(spec)
        if spec.task == "infer":
            threading.Event().wait(3.5)  # longer than the 2 s ack wait
        return original(spec)

    slow.run = take_time  # type: ignore[method-assign]
    try:
        await fed.start_site("site-a", slow, ack_wait_s=2.0, heartbeat_s=0.5)
        await fed.benchmark()
        await fed.model("model-1")
        await fed.dataset("site-a", "ds-a")
        await next_events(nats_url, "assay.v1.evt.result.accepted", 1)
        await next_events(nats_url, "assay.v1.evt.check.completed", 1)
        # neither the dataset's check nor the benchmark's job was delivered a second time
        assert list(tasks_by_job(runs).values()) == [["infer", "evaluate"]] * 2
    finally:
        await fed.stop()


async def test_a_changed_dataset_is_dead_lettered_not_retried(nats_url: str, tmp_path: Path) -> None:
    fed = await start(nats_url, tmp_path)
    runner = fake_containers(METRICS)
    try:
        await fed.start_site("site-a", runner)
        await fed.benchmark()
        await fed.dataset("site-a", "ds-a")
        (tmp_path / "sites" / "site-a" / "datasets" / "ds-a" / "labels" / "labels.csv").write_text("tampered\n")
        await fed.model("model-1")
        (letter,) = await next_events(nats_url, "assay.v1.dlq.site-site-a-jobs", 1)
        assert "no longer matches its registered hash" in letter["data"]["error"]
        assert letter["data"]["deliveries"] == 1
        assert benchmark_tasks(runner.specs) == []  # (the dataset's check may have run before the change)
        assert (await fed.board()).rows == ()
    finally:
        await fed.stop()
    _ = m
