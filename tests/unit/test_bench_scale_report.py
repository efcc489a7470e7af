"""BENCHMARKS.md's table of how cost grows (`just bench --scale`): one row per size, with that run's figures."""

from __future__ import annotations

from tests.unit.test_bench_history import bench_report


def a_size(sites: int, jobs_per_s: float, backlog_max: int, empty_after: float | None) -> dict[str, object]:
    rounds = {"jobs_per_s": jobs_per_s, "latency_p50_s": 0.25, "latency_p99_s": 0.5, "cpu_cores_busy": {},
              "rounds_detail": [{"planning_s": 0.07}]}
    steady = {"offered_jobs_per_s": jobs_per_s / 2, "latency_p50_s": 0.2, "latency_p99_s": 0.3,
              "backlog_max": backlog_max, "backlog_slope_per_s": 0.05, "backlog_at_end": 0,
              "empty_after_end_s": empty_after}
    return {"sites": sites, "processes": 1, "rounds": rounds, "steady": steady, "workers_start_s": 1.0,
            "checks_s": 1.0, "jobs_run_again": 0, "logs": {},
            "idle_cpu_cores": {"nats": 0.123, "registry": 0.001, "scheduling": 0.002, "sites-1": 0.25,
                               "observer": 0.5},
            "rss_mib": {"nats": 42.0, "sites-1": 95.0},
            "setup": {"commands": 40, "commands_s": 1.0, "group_commands": 10, "groups_s": 1.0}}


def a_run(sizes: list[dict[str, object]]) -> dict[str, object]:
    machine = {"cores": 2, "cpu": "cpu", "memory_gib": 1.0, "kernel": "k", "python": "3.11", "docker": "d",
               "nats_server": "n", "faststream": "f", "nats_py": "p"}
    scale = {"sizes": sizes, "rounds": 3, "idle_s": 3.0, "load_s": 20.0, "load_fraction": 0.5, "group_sites": 25,
             "sample_s": 0.5, "sites_per_process": 250}
    return {"machine": machine, "config": {"scale_in_flight": 32}, "wall_s": 10.0, "finished_at": "now",
            "scale": scale}


def test_each_size_is_a_row_with_its_own_figures_and_the_services_idle_cpu_without_the_bus_or_the_sites():
    written = bench_report().markdown(a_run([a_size(10, 39.1, 19, 0.1), a_size(1000, 40.5, 55, None)]))

    rows = [line for line in written.splitlines() if line.startswith(("| 10 |", "| 1000 |"))]
    assert len(rows) == 2
    assert "| 39.1 |" in rows[0] and "| 19 |" in rows[0] and "0, 0.1 s" in rows[0]
    assert "| 40.5 |" in rows[1] and "| 55 |" in rows[1] and "0, never" in rows[1]  # never found empty: said so
    assert "| 0.003 | 0.123 | 0.250 |" in rows[0]  # services, nats-server, the site processes: each apart
    assert "For each of 10, 1000 sites" in written


def test_a_run_without_the_scale_part_has_no_table():
    run = a_run([])
    del run["scale"]

    assert "How cost grows (d):" not in bench_report().markdown(run)
