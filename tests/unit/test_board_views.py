"""The board as a person sees it (the tables), as a spreadsheet reads it (CSV) and as a picture (PNG)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from rich.console import Console

from assay.board_plot import plot_board
from assay.tables import CSV_HEADER, leaderboard_csv, leaderboard_table
from contracts.messages import Interval, Leaderboard, LeaderboardRow, SiteValue

SITES = ("site-a", "site-b", "site-c")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def row(model_id: str, rank: int, shared: bool, auc: float, sites: dict[str, float], probabilities: tuple[float, ...],
        worst: str) -> LeaderboardRow:
    return LeaderboardRow(
        rank=rank, shared=shared, model_id=model_id, case_count=3000, sites=3,
        site_values={site: {"auc": value, "sensitivity": value - 0.1} for site, value in sites.items()},
        site_intervals={site: {"auc": Interval(low=value - 0.04, high=value + 0.03)} for site, value in sites.items()},
        pooled={"auc": auc, "sensitivity": auc - 0.1},
        intervals={"auc": Interval(low=auc - 0.025, high=auc + 0.022)},
        pooling={"auc": "exact: pooled score histograms", "sensitivity": "exact: pooled confusion counts"},
        bin_error={"auc": 0.004},
        mean_of_sites={"auc": sum(sites.values()) / len(sites)},
        worst_site={"auc": SiteValue(site=worst, value=sites[worst])},
        rank_probabilities=probabilities)


def full_board() -> Leaderboard:
    rows = (row("model-a", 1, True, 0.912, {"site-a": 0.93, "site-b": 0.88, "site-c": 0.92}, (0.55, 0.43, 0.02),
                "site-b"),
            row("model-b", 1, True, 0.905, {"site-a": 0.91, "site-b": 0.90, "site-c": 0.86}, (0.44, 0.53, 0.03),
                "site-c"),
            row("model-c", 3, False, 0.801, {"site-a": 0.79, "site-b": 0.83, "site-c": 0.78}, (0.001, 0.04, 0.959),
                "site-c"))
    return Leaderboard(benchmark_id="breast-cancer-dx", primary_metric="auc", metrics=("sensitivity", "auc"),
                       rows=rows, higher_is_better={"auc": True, "sensitivity": True}, replicates=1000,
                       rank_stability=0.93, view="full", hidden=2)


def old_board() -> Leaderboard:
    """What a leaderboard service before intervals sent: no interval, pooling phrase, rank distribution."""
    rows = tuple(LeaderboardRow(rank=rank, model_id=model, case_count=200, sites=2, pooled={"auc": auc},
                                site_values={"site-x": {"auc": auc + 0.02}, "site-y": {"auc": auc - 0.03}})
                 for rank, model, auc in ((1, "model-1", 0.8), (2, "model-2", 0.7)))
    return Leaderboard(benchmark_id="bench", primary_metric="auc", metrics=("auc",), rows=rows)


def empty_board() -> Leaderboard:
    return Leaderboard(benchmark_id="bench", primary_metric="auc", metrics=("auc",), rows=())


def rendered(board: Leaderboard, width: int = 200) -> str:
    console = Console(record=True, width=width)
    console.print(leaderboard_table(board))
    return console.export_text()


def test_the_full_board_shows_shared_ranks_intervals_pooling_and_the_worst_site() -> None:
    text = rendered(full_board())
    assert "1=" in text and "model-c" in text
    assert "0.912 [0.887, 0.934]" in text
    assert "P(rank 1)" in text and "55%" in text and "<1%" in text
    assert "auc — exact: pooled score histograms (bin error <= 0.004)" in text
    assert "sensitivity — exact: pooled confusion counts" in text
    assert "Per site, auc" in text and "0.88 (0.84-0.91)" in text
    assert "0.88 at site-b" in text and "0.86 at site-c" in text
    assert "B = 1000 bootstrap replicates" in text and "Kendall's tau 0.93" in text
    assert "2 rows hidden from this view" in text and "view: full" in text


def test_the_primary_metric_comes_first_whatever_the_declared_order() -> None:
    header = next(line for line in rendered(full_board()).splitlines() if "Rank" in line)
    assert header.index("auc") < header.index("sensitivity")


def test_an_old_board_without_the_optional_fields_still_reads() -> None:
    text = rendered(old_board())
    assert "model-1" in text and "0.800" in text and "0.800 [" not in text
    assert "P(rank 1)" not in text
    assert "site-x" in text and "0.77 at site-y" in text  # the worst site, worked out from the site values
    assert "no bootstrap replicates" in text and "hidden" not in text


def test_every_site_name_survives_a_narrow_terminal() -> None:
    text = rendered(full_board(), width=80)
    assert all(site in text for site in SITES) and "0.912" in text
    assert "[0.887, 0.934]" in text and "(0.84-0.91)" in text  # an interval moves under its value, whole


def test_a_board_whose_sites_are_hidden_has_no_per_site_table() -> None:
    board = full_board()
    rows = tuple(r.model_copy(update={"site_values": {}, "site_intervals": {}, "worst_site": {}}) for r in board.rows)
    text = rendered(board.model_copy(update={"rows": rows}))
    assert "Per site" not in text and "0.912" in text


def test_an_empty_board_says_there_is_nothing_yet() -> None:
    text = rendered(empty_board())
    assert "no accepted results yet" in text and "Per site" not in text


def parsed(board: Leaderboard) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(leaderboard_csv(board))))


def test_the_csv_has_one_line_per_model_site_and_metric() -> None:
    lines = parsed(full_board())
    assert tuple(lines[0]) == CSV_HEADER
    assert len(lines) == 3 * (1 + len(SITES)) * 2
    pooled = next(line for line in lines if line["model_id"] == "model-a" and line["site"] == "pooled"
                  and line["metric"] == "auc")
    assert pooled["rank"] == "1=" and float(pooled["value"]) == 0.912 and pooled["cases"] == "3000"
    assert float(pooled["low"]) == pytest.approx(0.887) and pooled["pooling"] == "exact: pooled score histograms"
    site = next(line for line in lines if line["model_id"] == "model-c" and line["site"] == "site-b"
                and line["metric"] == "sensitivity")
    assert float(site["value"]) == pytest.approx(0.73) and site["low"] == site["high"] == site["cases"] == ""


def test_the_csv_of_an_old_board_has_empty_intervals() -> None:
    lines = parsed(old_board())
    assert len(lines) == 2 * 3
    assert all(line["low"] == line["high"] == "" for line in lines)
    assert [line["rank"] for line in lines if line["site"] == "pooled"] == ["1", "2"]


def test_an_empty_board_is_a_csv_header_alone() -> None:
    assert parsed(empty_board()) == [] and leaderboard_csv(empty_board()).startswith(",".join(CSV_HEADER))


@pytest.mark.parametrize("board", [full_board(), old_board()], ids=["full", "old"])
def test_the_plot_is_one_png(board: Leaderboard, tmp_path: Path) -> None:
    path = plot_board(board, tmp_path / "board.png")
    data = path.read_bytes()
    assert path == tmp_path / "board.png"
    assert data.startswith(PNG_SIGNATURE) and len(data) > 20_000


def test_an_empty_board_cannot_be_plotted(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="the board of bench has no rows yet: nothing to plot"):
        plot_board(empty_board(), tmp_path / "board.png")
    assert not (tmp_path / "board.png").exists()
