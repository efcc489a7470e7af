"""The board as one picture: a forest plot of the primary metric (pooled, its interval, each site) beside a heat map of
how likely each model is to hold each rank across the bootstrap replicates."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from contracts.messages import Leaderboard

if TYPE_CHECKING:
    from matplotlib.axes import Axes

SITE_MARKERS = ("o", "s", "^", "v", "P", "X", "*", "<", ">", "h", "p")  # no diamond: that is the pooled value


def model_labels(board: Leaderboard) -> list[str]:
    return [f"{row.rank_label} {row.model_id}" for row in board.rows]


def draw_sites(ax: Axes, board: Leaderboard) -> None:
    """Each site's value of the primary metric on its model's line: one marker and colour per site."""
    import matplotlib as mpl

    metric = board.primary_metric
    sites = sorted({site for row in board.rows for site in row.site_values if metric in row.site_values[site]})
    colours = mpl.colormaps["tab10" if len(sites) <= 10 else "tab20"]
    for i, site in enumerate(sites):
        points = [(row.site_values[site][metric], y) for y, row in enumerate(board.rows)
                  if metric in row.site_values.get(site, {})]
        ax.scatter(*zip(*points, strict=True), s=36, marker=SITE_MARKERS[i % len(SITE_MARKERS)], label=site,
                   color=colours(i % colours.N), edgecolors="white", linewidths=0.5, zorder=4)


def draw_pooled(ax: Axes, board: Leaderboard, label: str) -> None:
    """The pooled value of the primary metric, with its interval where it has one."""
    metric = board.primary_metric
    lines = [(y, row.pooled[metric], row.intervals.get(metric)) for y, row in enumerate(board.rows)
             if metric in row.pooled]
    if not lines:
        return
    values = [value for _, value, _ in lines]
    below = [0.0 if interval is None else value - interval.low for _, value, interval in lines]
    above = [0.0 if interval is None else interval.high - value for _, value, interval in lines]
    ax.errorbar(values, [y for y, _, _ in lines], xerr=[below, above], fmt="D", markersize=8, color="black",
                elinewidth=2, capsize=4, zorder=3, label=label)


def draw_forest(ax: Axes, board: Leaderboard) -> None:
    """One line per model, best at the top: the pooled value with its interval, and each site's value on that line."""
    from matplotlib.transforms import offset_copy

    metric = board.primary_metric
    with_intervals = any(metric in row.intervals for row in board.rows)
    pooled = "pooled, 95% interval" if with_intervals else "pooled"
    draw_sites(ax, board)
    draw_pooled(ax, board, pooled)
    ax.set_yticks(range(len(board.rows)), model_labels(board))
    ax.set_ylim(len(board.rows) - 0.5, -0.5)
    direction = "" if board.higher_is_better.get(metric, True) else ", lower is better"
    ax.set_xlabel(f"{metric} ({pooled}{direction})")
    ax.set_title(f"{metric}: pooled and per site")
    ax.grid(axis="x", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        below_the_axis_label = offset_copy(ax.transAxes, fig=ax.figure, y=-32, units="points")
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), bbox_transform=below_the_axis_label,
                  ncols=min(len(labels), 4), frameon=False, fontsize="small")


def rank_matrix(board: Leaderboard) -> list[list[float]]:
    """(models, ranks): P(rank = k); NaN (drawn grey) for a model without a distribution."""
    ranks = max(len(row.rank_probabilities) for row in board.rows)
    return [[*row.rank_probabilities, *[math.nan] * (ranks - len(row.rank_probabilities))] for row in board.rows]


def draw_rank_heat_map(ax: Axes, board: Leaderboard) -> None:
    """Rows the models (as in the forest plot), columns the ranks, each cell how often the model held that rank."""
    import matplotlib as mpl

    ax.set_title("P(rank = k) over the bootstrap replicates")
    if not any(row.rank_probabilities for row in board.rows):
        ax.text(0.5, 0.5, "no replicates: no rank distribution", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    matrix = rank_matrix(board)
    colours = mpl.colormaps["Blues"].with_extremes(bad="lightgrey")
    image = ax.imshow(matrix, cmap=colours, vmin=0.0, vmax=1.0, aspect="auto")
    for i, probabilities in enumerate(matrix):
        for k, probability in enumerate(probabilities):
            if probability >= 0.01:
                ax.text(k, i, f"{probability:.0%}", ha="center", va="center", fontsize="small",
                        color="white" if probability > 0.6 else "black")
    ranks = len(matrix[0])
    ax.set_xticks(range(ranks), [str(k + 1) for k in range(ranks)])
    ax.set_yticks(range(len(board.rows)), [row.model_id for row in board.rows])
    ax.set_xlabel("rank")
    ax.figure.colorbar(image, ax=ax, label="probability", fraction=0.05)


def plot_board(board: Leaderboard, path: Path) -> Path:
    """Write the board's picture to `path` (PNG) and return it."""
    if not board.rows:
        raise ValueError(f"the board of {board.benchmark_id} has no rows yet: nothing to plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height = 2.6 + 0.45 * len(board.rows)
    fig = Figure(figsize=(13, height), layout="constrained")
    FigureCanvasAgg(fig)
    forest, heat = fig.subplots(1, 2, width_ratios=(3, 2))
    draw_forest(forest, board)
    draw_rank_heat_map(heat, board)
    replicates = f"B = {board.replicates} bootstrap replicates" if board.replicates else "no bootstrap replicates"
    fig.suptitle(f"Leaderboard {board.benchmark_id}: ranked by pooled {board.primary_metric} ({replicates})")
    fig.savefig(path, format="png", dpi=120)
    return path
