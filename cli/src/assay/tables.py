"""Readable leaderboard tables."""

from __future__ import annotations

from rich.table import Table

from contracts.messages import Leaderboard


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
