"""BENCHMARKS.md is written again by every `just bench`; its hand-written history of changes (the before and after of
each) is kept, word for word, and nothing else of the old file is."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_report():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_report", BENCH / "bench_report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def a_run() -> dict[str, object]:
    machine = {"cores": 2, "cpu": "cpu", "memory_gib": 1.0, "kernel": "k", "python": "3.11", "docker": "d",
               "nats_server": "n", "faststream": "f", "nats_py": "p"}
    return {"machine": machine, "config": {}, "wall_s": 10.0, "finished_at": "now"}


def test_the_hand_written_history_is_kept_and_the_rest_of_the_old_file_is_not():
    report = bench_report()
    history = f"{report.HISTORY}\n## Before and after each change\n\n| change | jobs/s |\n| --- | ---: |\n" \
              f"| the relay pipelined | 32 |\n{report.HISTORY_END}"
    previous = f"# Benchmarks\n\nan old run: 3 jobs/s\n\n{history}\n\nsomething after it\n"

    written = report.markdown(a_run(), previous)

    assert history in written and "an old run" not in written and "something after it" not in written
    assert report.markdown(a_run(), written).count(report.HISTORY) == 1  # kept once, however often it is written


def test_a_file_without_a_history_gets_none():
    report = bench_report()

    assert report.HISTORY not in report.markdown(a_run(), "# Benchmarks\n\nno history here\n")
