"""`assay sites list`: every site worker's last heartbeat, checked against its site's key: who is online, busy, or
silent since when."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:  # the bus client loads only when the command runs: `assay --help` stays quick
    from site_worker.heartbeat import Reading, Standing

DIGEST_SHOWN = 19  # "sha256:" and 12 hex digits
STATE_STYLES = {"online": "green", "busy": "yellow", "silent": "red"}


def ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f} {unit}"
    return f"{seconds:.0f} s"


def state_text(s: Standing) -> str:
    from assay.tables import when

    if s.state == "silent":
        return f"silent since {when(s.last_seen)} ({ago(s.age_s)})"
    return f"busy ({s.heartbeat.running} running)" if s.state == "busy" else "online"


def sites_table(standings: list[Standing], problems: dict[str, str]) -> Table:
    """One row per worker; one whose heartbeat could not be checked here is marked unverified (`notes` says why)."""
    from assay.tables import when

    table = Table(title=f"{len(standings)} site worker(s)", caption="CPUs, memory (GiB), GPUs: free/total")
    widths = {"site": 10, "worker": 8, "state": 12, "policy": DIGEST_SHOWN}  # what a narrow terminal squeezes last
    for column in ("site", "worker", "state", "last seen", "running", "CPUs", "memory", "GPUs", "load", "version",
                   "policy"):
        table.add_column(column, justify="right" if column in ("running", "CPUs", "memory", "GPUs", "load") else "left",
                         overflow="fold", min_width=widths.get(column))
    for s in standings:
        hb, style = s.heartbeat, STATE_STYLES[s.state]
        state = f"[{style}]{escape(state_text(s))}[/{style}]"
        if f"{hb.site_id}.{hb.worker_id}" in problems:
            state += " [magenta](unverified)[/magenta]"
        table.add_row(escape(hb.site_id), escape(hb.worker_id), state, when(hb.at), str(hb.running),
                      f"{hb.free.cpus:g}/{hb.capacity.cpus:g}",
                      f"{hb.free.memory_mb / 1024:.1f}/{hb.capacity.memory_mb / 1024:.1f}",
                      f"{len(hb.free.gpus)}/{len(hb.capacity.gpus)}", f"{hb.load:.2f}", escape(hb.version),
                      hb.policy_digest[:DIGEST_SHOWN])
    return table


def notes(problems: dict[str, str], bad: list[Reading]) -> list[str]:
    """What could not be checked, and what failed its check (of which nothing it claims is shown)."""
    return ([f"[magenta]{escape(key)}: {escape(problem)}[/magenta]" for key, problem in sorted(problems.items())]
            + [f"[red]{escape(r.key)}: not trusted, {escape(r.problem)}[/red]" for r in bad])


def as_document(standings: list[Standing], problems: dict[str, str], bad: list[Reading]) -> dict[str, object]:
    return {"workers": [{"site_id": s.heartbeat.site_id, "worker_id": s.heartbeat.worker_id, "state": s.state.value,
                         "last_seen": s.last_seen.isoformat(), "silent_s": round(s.age_s, 1)
                         if s.state == "silent" else None,
                         "problem": problems.get(f"{s.heartbeat.site_id}.{s.heartbeat.worker_id}") or None,
                         "heartbeat": s.heartbeat.model_dump(mode="json")} for s in standings],
            "not_trusted": [{"key": r.key, "problem": r.problem} for r in bad]}


def known_public_keys() -> dict[str, str]:
    """The public keys of the sites set up in this state folder (`keys/<site>.pub`)."""
    from assay.cli import _home

    home, found = _home(), {}
    for site in home.sites():
        try:
            found[site] = home.public_key(site)
        except FileNotFoundError:
            continue  # its heartbeats are shown, marked unverified
    return found


async def fetch(nats_url: str, public_keys: dict[str, str]) -> list[Reading]:
    import nats.errors
    from nats.js.errors import BucketNotFoundError

    from assay.client import connected
    from service_kit.connection import where
    from site_worker.heartbeat import read_heartbeats

    async with connected(nats_url) as (nc, errors):
        try:
            return await read_heartbeats(nc.jetstream(), public_keys)
        except BucketNotFoundError:
            return []  # provisioned before heartbeats existed: nobody can have reported
        except nats.errors.Error as exc:  # a user without the right to read the bucket gets no answer, only this
            why = errors[-1] if errors else f"{type(exc).__name__}: {exc}"
            raise ConnectionError(f"cannot read the site workers' heartbeats at {where(nats_url)}: {why}") from None


def show(readings: list[Reading], now: datetime, as_json: bool) -> None:
    """Print the readings as they stand at `now`: a table, or one JSON document."""
    from assay.cli import console
    from site_worker.heartbeat import standing

    shown = [r for r in readings if r.heartbeat is not None]
    problems = {r.key: r.problem for r in shown if r.problem}
    bad = [r for r in readings if r.heartbeat is None]
    standings = standing([r.heartbeat for r in shown if r.heartbeat is not None], now)
    if as_json:
        print(json.dumps(as_document(standings, problems, bad), indent=2))
    elif not readings:
        console.print("no site worker has reported yet")
    else:
        if standings:
            console.print(sites_table(standings, problems))
        for line in notes(problems, bad):
            console.print(line)


def sites_list(as_json: Annotated[bool, typer.Option("--json", help="one JSON document")] = False) -> None:
    """Every site worker's last heartbeat: online, busy, or silent since when; its capacity, load and policy."""
    from assay.cli import _home, say_error
    from contracts.envelope import utcnow

    try:
        readings = asyncio.run(fetch(_home().nats_url(), known_public_keys()))
    except ConnectionError as exc:
        say_error(str(exc))
        raise typer.Exit(1) from exc
    show(readings, utcnow(), as_json)
