"""`assay audit`: read and check a site's tamper-evident audit log (the data owner, a hospital's auditor)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

audit_app = typer.Typer(help="The site's hash-chained audit log: what it received, ran, held, released.",
                        no_args_is_help=True)
Site = Annotated[str, typer.Option("--site", help="the site whose log to read")]
SUMMARY = 80  # characters of details shown in the table


def _log_of(site_id: str) -> Path:
    """The site's log in the state folder of `assay --home`; fails the command when there is none."""
    from assay.cli import say_error, state
    from site_worker.audit import head_path

    try:
        path = state["home"].site_dir(site_id) / "audit.jsonl"
    except ValueError as exc:
        say_error(str(exc))
        raise typer.Exit(1) from exc
    if not path.exists() and not head_path(path).exists():  # a log deleted beside its head is for verify to name
        say_error(f"site {site_id!r} has no audit log at {path}")
        raise typer.Exit(1)
    return path


def _summary(details: dict[str, object]) -> str:
    text = ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in details.items())
    return text if len(text) <= SUMMARY else text[: SUMMARY - 1] + "…"


@audit_app.command("show")
def show(site: Site, job: Annotated[str | None, typer.Option("--job", help="only this job's entries")] = None,
         kind: Annotated[str | None, typer.Option("--kind", help="only entries of this kind")] = None,
         as_json: Annotated[bool, typer.Option("--json", help="one JSON entry per line")] = False) -> None:
    """The log's entries, oldest first (it does not check them: `assay audit verify` does)."""
    from rich.table import Table
    from rich.text import Text

    from assay.cli import console, say_error
    from site_worker.audit import AuditError, read_entries

    try:
        entries = read_entries(_log_of(site))
    except AuditError as exc:
        say_error(str(exc))
        raise typer.Exit(1) from exc
    chosen = [e for e in entries if (job is None or e.job_id == job) and (kind is None or e.kind == kind)]
    if as_json:
        for entry in chosen:
            print(entry.model_dump_json())
        return
    table = Table(title=f"audit log of site {site}: {len(chosen)} of {len(entries)} entries")
    for column in ("seq", "time (UTC)", "kind", "job", "details"):
        table.add_column(column, justify="right" if column == "seq" else "left")
    for e in chosen:
        table.add_row(str(e.seq), f"{e.time:%Y-%m-%d %H:%M:%S}", Text(e.kind), Text(e.job_id or "-"),
                      Text(_summary(e.details)))
    console.print(table)


@audit_app.command("verify")
def verify(site: Site) -> None:
    """Check every entry's hash and link and the head the site signed; exit 1 naming the first problem."""
    from assay.cli import console, say_error, state
    from contracts.signing import key_id_of
    from site_worker.audit import verify_log

    path = _log_of(site)
    try:
        public_key = state["home"].public_key(site)
    except FileNotFoundError as exc:
        say_error(str(exc))
        raise typer.Exit(1) from exc
    verdict = verify_log(path, public_key)
    if not verdict.ok:
        intact = "1 entry" if verdict.checked == 1 else f"{verdict.checked} entries"
        say_error(f"{verdict.problem} (the {intact} read before this are intact)")
        raise typer.Exit(1)
    console.print(f"[green]ok[/green]: {verdict.checked} entries, chain intact, head signed by {key_id_of(public_key)}")
