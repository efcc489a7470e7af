"""The data owner's commands at the site: its policy (`assay site policy`), and the review of what its results would
send before anything leaves (`assay results`). They read and write the site's own files; the worker sends what was
decided."""

from __future__ import annotations

import getpass
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from assay.home import Home

if TYPE_CHECKING:
    from contracts.messages import SiteResult

console = Console()
err = Console(stderr=True)
policy_app = typer.Typer(help="What may run on the site's data, and what leaves without review (data owner).",
                         no_args_is_help=True)
results_app = typer.Typer(help="Review a site's results before they leave (data owner).", no_args_is_help=True)
Site = Annotated[str, typer.Option("--site", help="the site whose files these are")]


def _home() -> Home:
    from assay.cli import state

    return state["home"]


def fail(message: str) -> typer.Exit:
    from rich.markup import escape

    err.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(1)


def _site_dir(site: str) -> Path:
    folder = _home().site_dir(site)
    if not (folder / "site.json").exists():
        raise fail(f"site {site} is not set up in {folder.parent}; add it with: assay site add {site}")
    return folder


# --- policy --------------------------------------------------------------------------------------------------------


@policy_app.command("show")
def policy_show(site: Site) -> None:
    """The policy the site's worker applies, and its digest."""
    from site_worker.policy import PolicyError, load_policy

    path = _home().policy_file(site)
    _site_dir(site)
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        raise fail(str(exc)) from None
    where = str(path) if path.exists() else f"no file ({path}): the default policy"
    table = Table(title=f"site {site}: policy {policy.digest[:19]}…", caption=where, show_header=False)
    table.add_row("benchmarks", ", ".join(policy.benchmarks))
    table.add_row("model owners", ", ".join(policy.model_owners))
    table.add_row("models allowed", ", ".join(policy.models.allow) or "any not denied")
    table.add_row("models denied", ", ".join(policy.models.deny) or "none")
    most = policy.limits
    table.add_row("per container at most", f"{most.timeout_s:g} s, {most.memory_mb} MB, {most.cpus:g} CPUs, "
                                           f"{most.gpus} GPUs, {most.output_mb} MB of output")
    table.add_row("images fetched up to", f"{most.image_mb} MB")
    listed = policy.release.benchmarks
    rule = policy.release.rule.value + (f" ({', '.join(listed)})" if listed else "")
    table.add_row("release", rule)
    console.print(table)


@policy_app.command("set")
def policy_set(site: Site, file: Path) -> None:
    """Check a policy file and make it the site's; the worker applies it from its next job on."""
    from site_worker.policy import PolicyError, load_policy

    folder = _site_dir(site)
    if not file.exists():
        raise fail(f"{file} does not exist")
    try:
        policy = load_policy(file)
    except PolicyError as exc:
        raise fail(f"{exc}; the site's policy is unchanged") from None
    target = _home().policy_file(site)
    staged = folder / ".policy.toml.new"
    shutil.copyfile(file, staged)
    os.replace(staged, target)
    _audit(site).append("policy_set", None, by=_who(), digest=policy.digest, file=str(file.resolve()))
    console.print(f"[green]ok[/green] site {site} now applies policy {policy.digest} (from its next job on; the "
                  "change is in its audit log)")


@policy_app.command("check")
def policy_check(job_id: str, site: Site) -> None:
    """What the site's policy would do with a job the scheduler planned (the job from `assay job list`)."""
    from assay.cli import _send
    from contracts import messages as m
    from site_worker.policy import PolicyError, judge, load_policy

    _site_dir(site)
    try:
        policy = load_policy(_home().policy_file(site))
    except PolicyError as exc:
        raise fail(str(exc)) from None
    details = m.JobDetails.model_validate(_send(m.GetJob(job_id=job_id), None))
    job = details.job
    if job.site_id != site:
        raise fail(f"job {job_id} is for site {job.site_id}, not {site}")
    verdict = judge(policy, job)
    colour = "green" if verdict.runs else "red"
    console.print(f"job {job_id}: benchmark {job.binding.benchmark_id}, model {job.binding.model_id} "
                  f"({job.model_owner or 'owner not named'}), image {job.binding.model_image}")
    console.print(f"[{colour}]{'runs' if verdict.runs else 'refused'}[/{colour}]: {verdict.reason}")
    if not verdict.runs:
        raise typer.Exit(1)


# --- review --------------------------------------------------------------------------------------------------------


def _review(site: str):  # type: ignore[no-untyped-def]
    from site_worker.review import Review

    return Review(_site_dir(site) / "review.sqlite")


def _audit(site: str):  # type: ignore[no-untyped-def]
    from site_worker.audit import AuditLog

    return AuditLog(_site_dir(site) / "audit.jsonl", _home().key(site))


def review_table(title: str, rows: list) -> Table:  # type: ignore[type-arg]
    from assay.tables import short_id, when

    table = Table(title=title, caption="job ids shortened: any unique start works")
    table.add_column("job", no_wrap=True)
    for column in ("model", "dataset"):
        table.add_column(column, overflow="fold")
    table.add_column("would leave", no_wrap=True)
    table.add_column("stays here", overflow="fold")
    table.add_column("held", no_wrap=True)
    for held in rows:
        kept = ", ".join(["per-case scores", *held.kept.get("undeclared_metrics", [])])
        metrics = "\n".join(f"{name} {value:.3f}" for name, value in sorted(held.result.metrics.items()))
        table.add_row(short_id(held.job_id), held.model_id, held.dataset_id,
                      "\n".join([metrics, f"{held.result.binding.case_count} cases", *evidence_lines(held.result)]),
                      kept, when(held.held_at))
    return table


def evidence_lines(result: SiteResult) -> list[str]:
    """What leaves besides the values: the replicates and aggregates the site computed, and what it withheld."""
    evidence = result.evidence
    if evidence is None:
        return []
    lines = []
    if evidence.replicates:
        lines.append(f"{len(next(iter(evidence.replicates.values())))} replicates of each of "
                     f"{len(evidence.replicates)} metrics")
    if (counts := evidence.confusion) is not None:
        lines.append(f"confusion counts tp {counts.tp} fp {counts.fp} tn {counts.tn} fn {counts.fn}")
    if evidence.histograms is not None:
        lines.append(f"score histograms, {len(evidence.histograms.positive)} bins per class")
    return lines + [f"withheld: {reason}" for reason in evidence.withheld]


@results_app.command("pending")
def results_pending(site: Site, benchmark: Annotated[str | None, typer.Option()] = None,
                    as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The results held for review: what exactly each would send."""
    held = _review(site).pending(benchmark)
    if as_json:
        print(json.dumps([{"job_id": h.job_id, "leaving": h.leaving, "binding": h.result.binding.model_dump()}
                          for h in held], indent=2))
        return
    console.print(review_table(f"site {site}: {len(held)} result(s) held for review", held))
    if held:
        console.print("approve with `assay results approve JOB... --site S` (or --all); reject with "
                      "`assay results reject JOB... --reason TEXT`")


def _resolve(site: str, job_ids: list[str]) -> list[str]:
    from site_worker.review import ReviewError

    try:
        return [_review(site).resolve(job_id) for job_id in job_ids]
    except ReviewError as exc:
        raise fail(str(exc)) from None


@results_app.command("show")
def results_show(job_id: str, site: Site) -> None:
    """One kept result: its state, who decided, and exactly what releasing it sends."""
    [job_id] = _resolve(site, [job_id])
    held = _review(site).get(job_id)
    if held is None:
        raise fail(f"no result of job {job_id} is kept at site {site}; `assay results pending --site {site}` "
                   "lists them")
    decided = f" by {held.decided_by} at {held.decided_at:%Y-%m-%d %H:%M:%S}" if held.decided_at else ""
    unsent = "" if held.state == "held" else "; not sent yet"
    sent = f"; sent at {held.sent_at:%Y-%m-%d %H:%M:%S}" if held.sent_at else unsent
    console.print(f"job {job_id}: [bold]{held.state.value}[/bold]{decided}{sent}")
    if held.reason:
        console.print(f"reason given: {held.reason}")
    console.print("releasing it sends the job as the scheduler signed it, this binding, these metrics and what the "
                  "site computed from the cases (replicates, aggregates):")
    console.print_json(json.dumps({"binding": held.result.binding.model_dump(), **held.leaving,
                                   "worker_id": held.result.worker_id}))
    console.print(f"kept at the site: the per-case scores and predictions in {held.kept.get('folder')}"
                  + (f"; undeclared metrics {held.kept['undeclared_metrics']}" if held.kept.get("undeclared_metrics")
                     else ""))


def _chosen(site: str, job_ids: list[str], everything: bool, benchmark: str | None) -> list[str]:
    if everything == bool(job_ids):
        raise fail("name the jobs, or give --all (optionally with --benchmark), not both")
    if job_ids:
        return _resolve(site, job_ids)
    return [held.job_id for held in _review(site).pending(benchmark)]


def _confirm(site: str, job_ids: list[str], verb: str, yes: bool) -> None:
    review = _review(site)
    rows = [held for job_id in job_ids if (held := review.get(job_id)) is not None]
    if len(job_ids) > 1 and not yes:
        console.print(review_table(f"site {site}: {verb} {len(job_ids)} result(s)", rows))
        if not typer.confirm(f"{verb} these {len(job_ids)} results?"):
            raise typer.Exit(1)


def _who() -> str:
    return f"{getpass.getuser()} (uid {os.getuid()})"


def _decide(site: str, job_ids: list[str], everything: bool, benchmark: str | None, yes: bool,
            verb: str, reason: str | None = None) -> list:  # type: ignore[type-arg]
    """Approve or reject the chosen held results at once, and log who did: all of them, or none."""
    from site_worker.review import Decision, ReviewError

    chosen = _chosen(site, job_ids, everything, benchmark)
    if not chosen:
        console.print("no result is held for review")
        return []
    _confirm(site, chosen, verb, yes)
    decision = Decision.APPROVED if verb == "approve" else Decision.REJECTED
    try:
        decided = _review(site).decide(chosen, decision, by=_who(), reason=reason)
    except ReviewError as exc:
        raise fail(f"{exc}; nothing was {decision.value}") from None
    audit = _audit(site)
    for held in decided:
        audit.append(f"result_{decision.value}", held.job_id, by=held.decided_by,
                     **({"reason": held.reason} if reason else {"metrics_hash": held.result.metrics_hash}))
    return decided


Jobs = Annotated[list[str] | None, typer.Argument(help="job ids, or unique starts of them")]
Everything = Annotated[bool, typer.Option("--all", help="every held result")]
OfBenchmark = Annotated[str | None, typer.Option(help="with --all: only this benchmark's")]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="no preview or question")]


@results_app.command("approve")
def results_approve(site: Site, job_ids: Jobs = None, everything: Everything = False, benchmark: OfBenchmark = None,
                    yes: Yes = False) -> None:
    """Release held results: the worker signs and sends each once."""
    if decided := _decide(site, job_ids or [], everything, benchmark, yes, "approve"):
        console.print(f"[green]ok[/green] approved {len(decided)} result(s); the worker of site {site} sends them")


@results_app.command("reject")
def results_reject(site: Site, reason: Annotated[str, typer.Option(help="sent to the scheduler; never the metrics")],
                   job_ids: Jobs = None, everything: Everything = False, benchmark: OfBenchmark = None,
                   yes: Yes = False) -> None:
    """Decline to release held results: only the fact and your reason leave, never the metrics."""
    if not reason.strip():
        raise fail("--reason must say why (it is what the benchmark's people see)")
    if decided := _decide(site, job_ids or [], everything, benchmark, yes, "reject", reason.strip()[:500]):
        console.print(f"[green]ok[/green] rejected {len(decided)} result(s); the worker of site {site} says so, "
                      "without their metrics")


# --- images --------------------------------------------------------------------------------------------------------


def prefetch(site: Site, benchmark: Annotated[str | None, typer.Option(help="only this benchmark's jobs")] = None
             ) -> None:
    """Fetch, check and load now the pushed images of the site's planned jobs, so they start without waiting."""
    import asyncio

    import docker

    from assay.cli import _send
    from contracts import messages as m
    from site_worker.containers import DockerRunner
    from site_worker.policy import load_policy

    _site_dir(site)
    listed = m.JobList.model_validate(_send(m.ListJobs(site_id=site, benchmark_id=benchmark,
                                                       state=m.JobState.SCHEDULED), None))
    jobs = [m.JobDetails.model_validate(_send(m.GetJob(job_id=j.job_id), None)).job for j in listed.jobs]
    limit = load_policy(_home().policy_file(site)).limits.image_mb << 20
    outcome = asyncio.run(_prefetch(jobs, DockerRunner(docker.from_env()), site, limit))
    table = Table(title=f"site {site}: images of {len(jobs)} planned job(s)")
    for column in ("image", "model", "now"):
        table.add_column(column, overflow="fold")
    for (image, model), said in outcome.items():
        table.add_row(image[:19] + "…", model, said)
    console.print(table if outcome else f"site {site} has no planned job" + (f" of {benchmark}" if benchmark else ""))
    if any(said.startswith("refused") for said in outcome.values()):
        raise typer.Exit(1)


async def _prefetch(jobs: list, runner, site: str, limit: int) -> dict[tuple[str, str], str]:  # type: ignore[no-untyped-def, type-arg]
    import tempfile

    from assay.client import connected
    from contracts.subjects import IMAGES_BUCKET
    from site_worker.execution import JobRefused
    from site_worker.images import NatsImageStore, ensure_images

    said: dict[tuple[str, str], str] = {}
    async with connected(_home().nats_url()) as (nc, _):
        store = NatsImageStore(await nc.jetstream(timeout=30).object_store(IMAGES_BUCKET))
        with tempfile.TemporaryDirectory(prefix="assay-prefetch-") as scratch:
            for job in jobs:
                image = job.binding.model_image
                if (image, job.binding.model_id) in said:
                    continue
                try:
                    fetched = await ensure_images(job, runner, store, Path(scratch), limit, _home().key(site))
                    said[(image, job.binding.model_id)] = "fetched, checked, loaded" if image in fetched else "present"
                except JobRefused as exc:
                    said[(image, job.binding.model_id)] = f"refused: {exc}"
    return said
