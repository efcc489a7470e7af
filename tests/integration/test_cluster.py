"""The platform scaled out on this machine, as `just bench --cluster` runs it: three nats-servers (every stream and
bucket on all three, R3), two processes of every service sharing their durable consumers and their PostgreSQL
databases, site workers that know every server. One nats-server is SIGKILLed while the jobs run, the one that leads
the event history: nothing is lost (every job's result is accepted) and nothing is counted twice (one acceptance
per job in the history, and a board that counts each job once)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from pathlib import Path

import nats
import pytest

from assay.home import Home
from assay.platform import Platform
from contracts.catalog import SERVICES
from service_kit.connection import servers
from tests.support.federation import Federation, fake_containers, next_events

pytestmark = pytest.mark.postgres

SITES, MODELS = 5, 3
JOBS = SITES * MODELS
CASES = 2  # each dataset of tests.support.federation has two cases
ACCEPTED = "assay.v1.evt.result.accepted"


async def leader_of(nats_url: str, stream: str) -> str:
    nc = await nats.connect(servers(nats_url))
    try:
        info = await nc.jetstream().stream_info(stream)
        assert info.cluster is not None and info.config.num_replicas == 3, "the stream is kept on three servers"
        assert len(info.cluster.replicas or []) == 2, "a leader and two followers"
        return str(info.cluster.leader)
    finally:
        await nc.close()


async def test_a_cluster_that_loses_a_server_mid_run_loses_no_result_and_counts_none_twice(
        postgres_server: str, tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    fed = Federation("", home.root, lambda _: "")  # the actors and the sites; the services are the platform's
    for name in ("operator", *SERVICES):  # the keys the platform's processes load: made here, known to both
        fed.key(name)
    platform = Platform(home, cluster=3, replicas=2, database=postgres_server)
    await asyncio.to_thread(platform.start)
    try:
        assert {"nats-1", "nats-2", "nats-3", *SERVICES, *(f"{s}-2" for s in SERVICES)} == set(platform.procs)
        fed.nats_url = platform.nats_url
        assert len(servers(fed.nats_url)) == 3, "every client is given the whole seed list"
        await fed.benchmark()
        for index in range(SITES):
            site = f"site-{index}"
            await fed.start_site(site, fake_containers({"auc": 0.6 + 0.05 * index, "sensitivity": 0.5 + 0.02 * index}))
            await fed.dataset(site, f"{site}-ds")
        models = [f"model-{i}" for i in range(MODELS)]
        await asyncio.gather(*(fed.model(model) for model in models))  # each approval plans a job per site

        await next_events(fed.nats_url, ACCEPTED, 1, timeout_s=60)  # the jobs are running
        victim = (await leader_of(fed.nats_url, "EVENTS")).removeprefix("assay-")  # assay-nats-2 -> nats-2
        os.kill(platform.procs[victim].pid, signal.SIGKILL)
        await asyncio.to_thread(platform.procs[victim].wait, 10)
        assert await leader_of_survivors(fed.nats_url, victim) != victim  # the two left elect a new one

        try:
            accepted = await next_events(fed.nats_url, ACCEPTED, JOBS, timeout_s=90)
        except TimeoutError:  # what a failure needs to be understood from CI's log alone
            raise AssertionError(f"not every job's result was accepted: {await what_became_of_them(fed)}") from None
        once = Counter(event["data"]["job_id"] for event in accepted)
        assert len(once) == JOBS and set(once.values()) == {1}, "each job's result accepted, once"

        board = await fed.board("bench")
        assert sorted(row.model_id for row in board.rows) == models
        for row in board.rows:  # every site's result counted for every model, and none twice
            assert (row.sites, row.case_count) == (SITES, SITES * CASES), row.model_id
            assert set(row.site_values) == {f"site-{i}" for i in range(SITES)}
        assert await accepted_in_history(fed.nats_url) == JOBS, "no acceptance published twice, even in a failover"
    finally:
        await fed.stop()
        await asyncio.to_thread(platform.stop)


async def leader_of_survivors(nats_url: str, gone: str) -> str:
    """The EVENTS stream's leader once it is elected among the two servers left (until then the stream does not
    answer, or names none), and once the cluster's own leader is too: only that one answers the requests that look a
    stream up or make a consumer (as reading the history does), and it may have been the server that went."""
    nc = await nats.connect(servers(nats_url))
    try:
        async with asyncio.timeout(60):
            while True:
                js = nc.jetstream(timeout=2)
                try:
                    info = await js.stream_info("EVENTS")
                    await js.find_stream_name_by_subject(ACCEPTED)
                except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.APIError):
                    info = None
                leader = info.cluster.leader if info is not None and info.cluster is not None else None
                if leader and not leader.endswith(gone):
                    return str(leader).removeprefix("assay-")
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


async def what_became_of_them(fed: Federation) -> dict[str, object]:
    """The messages the streams hold by subject, and what the sites kept and have not sent."""
    nc = await nats.connect(servers(fed.nats_url))
    try:
        js, held = nc.jetstream(timeout=10), {}
        for stream in ("RESULTS", "EVENTS", "DEAD_LETTERS"):
            info = await js.stream_info(stream, subjects_filter=">")
            held[stream] = dict(sorted((info.state.subjects or {}).items()))
    finally:
        await nc.close()
    sites = [app.context.get("site") for app in fed.apps if app.context.get("site") is not None]
    unsent = {site.settings.site_id: [kept.job_id for kept in site.review.unsent()] for site in sites}
    return {"streams": held, "unsent at the sites": unsent}


async def accepted_in_history(nats_url: str) -> int:
    """How many ResultAccepted the EVENTS stream holds (a copy published twice past the server's dedupe would show)."""
    nc = await nats.connect(servers(nats_url))
    try:
        info = await nc.jetstream().stream_info("EVENTS", subjects_filter=ACCEPTED)
        return int((info.state.subjects or {}).get(ACCEPTED, 0))
    finally:
        await nc.close()
