"""`just bench --cluster`: the platform flow (a) again, scaled out on this machine, and its board against the single
server's of the same run.

The same `assay.platform.Platform`, with `cluster=3, replicas=2, database=...`: three nats-servers on loopback (each
stream and bucket kept on all three, R3), two processes of every service sharing its durable consumers, and each
service's database on a private PostgreSQL cluster that both of its processes write. The simulated sites, the
setup and the rounds are those of (a); so are the models and the metrics each site reports for each, so both runs
must end with the same board: every row compared, field by field (floats to 1e-9, as the pooled sums may be added
in another order).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from assay.client import request
from assay.platform import Platform
from bench_sites import BENCHMARK, OWNER
from contracts.messages import ShowLeaderboard
from tests.support.postgres import private_postgres, server_binaries

CLUSTER, REPLICAS = 3, 2


@contextmanager
def scaled_out() -> Iterator[dict[str, Any]]:
    """The Platform options of the cluster run, with the PostgreSQL server its services' replicas share."""
    bindir = server_binaries()
    if bindir is None:
        raise RuntimeError("--cluster needs the PostgreSQL server binaries (apt-get install postgresql): the replicas "
                           "of a service share its database there")
    with private_postgres(bindir) as database:
        yield {"cluster": CLUSTER, "replicas": REPLICAS, "database": database}


async def final_board(platform: Platform) -> dict[str, Any]:
    """The benchmark's whole board as its owner sees it, once every round's results are accepted."""
    return await request(platform.nats_url, ShowLeaderboard(benchmark_id=BENCHMARK), actor=OWNER,
                         key=platform.home.key(OWNER))


def differences(one: Any, other: Any, path: str = "") -> list[str]:
    """Where two boards differ (their paths), floats compared to a relative 1e-9."""
    if isinstance(one, dict) and isinstance(other, dict):
        out = [f"{path}.{key}: only in one" for key in sorted(set(one) ^ set(other), key=str)]
        for key in sorted(set(one) & set(other), key=str):
            out += differences(one[key], other[key], f"{path}.{key}")
        return out
    if isinstance(one, list | tuple) and isinstance(other, list | tuple):
        if len(one) != len(other):
            return [f"{path}: {len(one)} against {len(other)} items"]
        return [d for i, (a, b) in enumerate(zip(one, other, strict=True)) for d in differences(a, b, f"{path}[{i}]")]
    if isinstance(one, float) or isinstance(other, float):
        if isinstance(one, int | float) and isinstance(other, int | float) and math.isclose(
                one, other, rel_tol=1e-9, abs_tol=1e-12):
            return []
        return [f"{path}: {one!r} against {other!r}"]
    return [] if one == other else [f"{path}: {one!r} against {other!r}"]


def compare(single: dict[str, Any], scaled: dict[str, Any]) -> dict[str, Any]:
    """The boards' comparison, as bench.json keeps it: the rows, and every difference (the first 20)."""
    found = differences(single, scaled)
    rows = scaled.get("rows", [])
    return {"same": not found, "rows": len(rows), "results": sum(int(r["sites"]) for r in rows),
            "differences": found[:20], "different_fields": len(found)}
