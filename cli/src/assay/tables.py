"""Readable tables: the leaderboard (for a person, and as CSV), the jobs."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import datetime

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.cells import cell_len
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from contracts.messages import Interval, JobList, JobState, Leaderboard, LeaderboardRow, SiteValue

STATE_STYLES = {JobState.DONE: "green", JobState.HELD: "yellow", JobState.REFUSED: "red", JobState.FAILED: "red",
                JobState.DECLINED: "magenta", JobState.SCHEDULED: "cyan", JobState.CANCELLED: "magenta",
                JobState.RUNNING: "blue"}


def short_id(job_id: str) -> str:
    """Enough of a job id to name it: every command that takes a job id takes a unique start of one (and a round
    of it, `-r<n>`, after that start)."""
    base, _, round_ = job_id.partition("-r")
    return base[:13] + (f"-r{round_}" if round_ else "")


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
        if job.check is not None:  # a check before joining: never on the board
            model = f"{model} [dim](check of {job.check.kind.value} {job.check.entity_id})[/dim]"
        if job.attempts > 1:
            model = f"{model} [dim](attempt {job.attempts})[/dim]"
        table.add_row(short_id(job.job_id), model, job.site_id, f"[{style}]{job.state.value}[/{style}]",
                      when(job.updated_at), job.reason or "")
    return table


def leaderboard_table(board: Leaderboard) -> Group:
    """What `assay leaderboard show` prints: the pooled table with how each metric was pooled, the primary metric per
    site, and how to read the ranks."""
    parts: list[RenderableType] = [pooled_table(board)]
    parts += [Text(note, style="dim") for note in pooling_notes(board)]
    if any(row.site_values for row in board.rows):
        parts += [Text(""), per_site_table(board)]
    parts += [Text(line, style="dim") for line in reading_notes(board)]
    return Group(*parts)


def ordered_metrics(board: Leaderboard) -> tuple[str, ...]:
    return (board.primary_metric, *(metric for metric in board.metrics if metric != board.primary_metric))


def metric_header(board: Leaderboard, metric: str) -> Text:
    lower = "" if board.higher_is_better.get(metric, True) else " (lower is better)"
    return Text(f"{metric}{lower}", style="bold" if metric == board.primary_metric else "")


@dataclass(frozen=True)
class Estimate:
    """A value and what qualifies it (its interval, its site): on one line where the column is wide enough, else the
    second part under the value, whole, or left out where even it does not fit (the CSV has it): never split."""

    value: str
    detail: str = ""
    detail_style: str = "dim"

    def width(self) -> int:
        return cell_len(self.value) + (1 + cell_len(self.detail) if self.detail else 0)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(max(cell_len(self.value), cell_len(self.detail)), self.width())

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if not self.detail or cell_len(self.detail) > options.max_width:
            yield Text(self.value)
        else:
            between = " " if self.width() <= options.max_width else "\n"
            yield Text.assemble(self.value, between, (self.detail, self.detail_style))


def pooled_cell(row: LeaderboardRow, metric: str) -> Estimate:
    value, interval = row.pooled.get(metric), row.intervals.get(metric)
    if value is None:
        return Estimate("-")
    return Estimate(f"{value:.3f}", "" if interval is None else f"[{interval.low:.3f}, {interval.high:.3f}]")


def percent(probability: float) -> str:
    return "<1%" if 0 < probability < 0.005 else f"{probability:.0%}"


def pooled_table(board: Leaderboard) -> Table:
    table = Table(title=f"Leaderboard {board.benchmark_id}: pooled, ranked by {board.primary_metric}")
    with_probabilities = any(row.rank_probabilities for row in board.rows)
    table.add_column("Rank", justify="right", no_wrap=True)
    table.add_column("Model", no_wrap=True, overflow="fold")
    for metric in ordered_metrics(board):
        table.add_column(metric_header(board, metric), justify="right")
    if with_probabilities:
        table.add_column("P(rank 1)", justify="right", no_wrap=True)
    table.add_column("Cases", justify="right", no_wrap=True)
    table.add_column("Sites", justify="right", no_wrap=True)
    for row in board.rows:
        chance = [percent(row.rank_probabilities[0]) if row.rank_probabilities else "-"] if with_probabilities else []
        table.add_row(row.rank_label, Text(row.model_id), *(pooled_cell(row, m) for m in ordered_metrics(board)),
                      *chance, f"{row.case_count:,}", str(row.sites))
    if not board.rows:
        table.caption = "no accepted results yet"
    return table


def pooling_notes(board: Leaderboard) -> list[str]:
    """One line per metric: how its pooled values were computed, the phrases of all rows, each once."""
    notes = []
    for metric in ordered_metrics(board):
        phrases = list(dict.fromkeys(row.pooling[metric] for row in board.rows if metric in row.pooling))
        errors = [row.bin_error[metric] for row in board.rows if metric in row.bin_error]
        if phrases:
            bound = f" (bin error <= {max(errors):.2g})" if errors else ""
            notes.append(f"{metric} — {'; '.join(phrases)}{bound}")
    return notes


def site_cell(value: float | None, interval: Interval | None) -> Estimate:
    if value is None:
        return Estimate("-")
    if interval is None:
        return Estimate(f"{value:.2f}")
    between = "-" if interval.low >= 0 and interval.high >= 0 else ", "
    return Estimate(f"{value:.2f}", f"({interval.low:.2f}{between}{interval.high:.2f})")


def mean_of_sites(row: LeaderboardRow, metric: str) -> float | None:
    """The board's, or for an older board the unweighted mean of the site values it shows."""
    if metric in row.mean_of_sites:
        return row.mean_of_sites[metric]
    values = [metrics[metric] for metrics in row.site_values.values() if metric in metrics]
    return sum(values) / len(values) if values else None


def worst_site(row: LeaderboardRow, metric: str, higher_is_better: bool) -> SiteValue | None:
    """The board's, or for an older board the worst of the site values it shows."""
    if metric in row.worst_site:
        return row.worst_site[metric]
    values = [SiteValue(site=site, value=metrics[metric]) for site, metrics in row.site_values.items()
              if metric in metrics]
    if not values:
        return None
    return (min if higher_is_better else max)(values, key=lambda site_value: site_value.value)


def worst_cell(worst: SiteValue | None) -> Estimate:
    if worst is None:
        return Estimate("-")
    return Estimate(f"{worst.value:.2f}", f"at {worst.site}" if worst.site else "", detail_style="")


def per_site_table(board: Leaderboard) -> Table:
    metric = board.primary_metric
    sites = sorted({site for row in board.rows for site in row.site_values})
    with_intervals = any(metric in by_metric for row in board.rows for by_metric in row.site_intervals.values())
    table = Table(title=f"Per site, {metric}" + (" (95% interval)" if with_intervals else ""))
    table.add_column("Model", no_wrap=True, overflow="fold")  # with too many columns, the site columns wrap first
    for site in sites:
        table.add_column(Text(site), justify="right", overflow="fold")
    table.add_column("Mean of sites", justify="right")
    table.add_column("Worst site", justify="right")
    for row in board.rows:
        cells = [site_cell(row.site_values.get(site, {}).get(metric), row.site_intervals.get(site, {}).get(metric))
                 for site in sites]
        mean = mean_of_sites(row, metric)
        table.add_row(Text(row.model_id), *cells, "-" if mean is None else f"{mean:.2f}",
                      worst_cell(worst_site(row, metric, board.higher_is_better.get(metric, True))))
    return table


def reading_notes(board: Leaderboard) -> list[str]:
    """How to read the ranks (replicates, shared ranks, their stability), and whose view this is."""
    notes = []
    if board.rows and board.replicates:
        notes.append(f"B = {board.replicates} bootstrap replicates; models whose 95% intervals overlap share a rank "
                     "(1=)")
    elif board.rows:
        notes.append("no bootstrap replicates: no intervals; ranks by pooled value alone")
    if board.rows and board.rank_stability is not None:
        notes.append(f"rank stability: Kendall's tau {board.rank_stability:.2f} (median over replicates)")
    hidden = f"; {board.hidden} row{'s' if board.hidden != 1 else ''} hidden from this view" if board.hidden else ""
    notes.append(f"view: {board.view}{hidden}")
    return notes


CSV_HEADER = ("benchmark_id", "model_id", "rank", "site", "metric", "value", "low", "high", "cases", "pooling")


def csv_line(board: Leaderboard, row: LeaderboardRow, site: str, metric: str, value: float,
             interval: Interval | None, cases: str, pooling: str) -> tuple[str | float, ...]:
    low, high = ("", "") if interval is None else (interval.low, interval.high)
    return board.benchmark_id, row.model_id, row.rank_label, site, metric, value, low, high, cases, pooling


def leaderboard_csv(board: Leaderboard) -> str:
    """The board in long format: one line per model, site (or `pooled`) and metric; the rank as shown (`1=`)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for row in board.rows:
        for metric in board.metrics:
            if metric in row.pooled:
                writer.writerow(csv_line(board, row, "pooled", metric, row.pooled[metric], row.intervals.get(metric),
                                         str(row.case_count), row.pooling.get(metric, "")))
        for site in sorted(row.site_values):
            for metric in board.metrics:
                if metric in row.site_values[site]:
                    writer.writerow(csv_line(board, row, site, metric, row.site_values[site][metric],
                                             row.site_intervals.get(site, {}).get(metric), "", ""))
    return out.getvalue()
