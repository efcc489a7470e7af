"""Readable tables: the leaderboard, the jobs."""

from __future__ import annotations

from datetime import datetime

from rich.table import Table

from contracts.messages import JobList, JobState, Leaderboard

STATE_STYLES = {JobState.DONE: "green", JobState.HELD: "yellow", JobState.REFUSED: "red", JobState.FAILED: "red",
                JobState.DECLINED: "magenta", JobState.SCHEDULED: "cyan"}


def short_id(job_id: str) -> str:
    """Enough of a job id to name it: every command that takes a job id takes a unique start of one."""
    return job_id[:13]


def when(moment: datetime) -> str:
    local = moment.astimezone()
    return local.strftime("%H:%M:%S" if local.date() == datetime.now().astimezone().date() else "%Y-%m-%d %H:%M")


def jobs_table(jobs: JobList) -> Table:
    table = Table(title=f"{len(jobs.jobs)} job(s), newest first", caption="job ids shortened: any unique start works")
    table.add_column("job", no_wrap=True)
    for column in ("model", "site"):
        table.add_column(column, overflow="fold")
    table.add_column("state", no_wrap=True)
    table.add_column("since", no_wrap=True)
    table.add_column("reason", overflow="fold", ratio=1)
    benchmarks = {job.benchmark_id for job in jobs.jobs}
    if len(benchmarks) == 1:
        table.title = f"{table.title}: benchmark {benchmarks.pop()}"
    for job in jobs.jobs:
        style = STATE_STYLES.get(job.state, "")
        model = job.model_id if table.title.endswith(job.benchmark_id) else f"{job.benchmark_id}/{job.model_id}"
        table.add_row(short_id(job.job_id), model, job.site_id, f"[{style}]{job.state.value}[/{style}]",
                      when(job.updated_at), job.reason or "")
    return table


def leaderboard_table(board: Leaderboard) -> Table:
    sites = sorted({s for row in board.rows for s in row.site_values})
    table = Table(title=f"Leaderboard {board.benchmark_id} (ranked by pooled {board.primary_metric})")
    table.add_column("rank", justify="right")
    table.add_column("model")
    table.add_column("metric")
    for site in sites:
        table.add_column(site, justify="right")
    table.add_column("pooled", justify="right", style="bold")
    table.add_column("cases", justify="right")
    for row in board.rows:
        for i, metric in enumerate(board.metrics):
            cells = [f"{row.site_values[s][metric]:.3f}" if s in row.site_values else "-" for s in sites]
            table.add_row(str(row.rank) if i == 0 else "", row.model_id if i == 0 else "", metric, *cells,
                          f"{row.pooled[metric]:.3f}", str(row.case_count) if i == 0 else "",
                          end_section=i == len(board.metrics) - 1)
    if not board.rows:
        table.caption = "no accepted results yet"
    return table
