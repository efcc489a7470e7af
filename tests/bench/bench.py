"""`just bench`: jobs through the real platform against raw JetStream, the sandbox against bare `docker run`, and the
board at committee scale against the same board without replicates; with `--scale 10,100,1000`, how cost grows with
the number of sites (bench_scale: minutes, so not in the default run).

Run as `.venv/bin/python tests/bench/bench.py`; writes bench-results/bench.json and BENCHMARKS.md at the
repository root. Speeds are ratios to a baseline measured in the same run; every figure is a median.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(HERE) not in sys.path:  # `python -m` or an import from elsewhere: the sibling modules live here
    sys.path.insert(0, str(HERE))
if str(ROOT) not in sys.path:  # tests.support (a private PostgreSQL for --cluster)
    sys.path.insert(1, str(ROOT))

from rich.console import Console  # noqa: E402

from assay.home import Home  # noqa: E402
from assay.platform import Platform, nats_server_binary  # noqa: E402
from bench_report import describe_machine, markdown, table  # noqa: E402
from contracts.signing import KeyPair  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, default=100, help="simulated site workers (default 100)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of model approvals (default 3)")
    p.add_argument("--models-per-round", type=int, default=1, help="models approved per round (default 1)")
    p.add_argument("--raw-messages", type=int, default=500, help="messages per raw JetStream rep (default 500)")
    p.add_argument("--raw-reps", type=int, default=5, help="raw JetStream repetitions (default 5)")
    p.add_argument("--idle-s", type=float, default=3.0, help="seconds to measure the idle services' CPU (default 3)")
    p.add_argument("--repetitions", type=int, default=7, help="container repetitions per variant (default 7)")
    p.add_argument("--skip-flow", action="store_true", help="skip (a), the platform flow")
    p.add_argument("--skip-containers", action="store_true", help="skip (b), the container overhead")
    p.add_argument("--skip-board", action="store_true", help="skip (c), the board at committee scale")
    p.add_argument("--keep", action="store_true", help="keep the platform's home folder (logs, databases)")
    p.add_argument("--load", type=lambda text: [float(x) for x in text.split(",") if x], default=[0.25, 0.5, 0.75],
                   help="offered loads for the latency sweep, as fractions of the rounds' maximum jobs/s "
                        "(default 0.25,0.5,0.75; empty: no sweep)")
    p.add_argument("--load-s", type=float, default=4.0, help="seconds offered at each load (default 4)")
    p.add_argument("--ingest", type=int, default=1000,
                   help="results waiting in the stream for the ingest measurement (default 1000; 0: none)")
    p.add_argument("--scale", type=lambda text: [int(x) for x in text.split(",") if x], default=[],
                   help="(d) how cost grows: the site counts, each on a fresh platform (e.g. 10,100,1000; default "
                        "none)")
    p.add_argument("--scale-rounds", type=int, default=3, help="(d) rounds of one model per size (default 3)")
    p.add_argument("--scale-load-s", type=float, default=20.0,
                   help="(d) seconds of steady load at half the rounds' jobs/s, backlog sampled (default 20)")
    p.add_argument("--scale-in-flight", type=int, default=8,
                   help="(d) setup commands awaiting their replies at once (default 8, as (a): 32 was no faster, the "
                        "services being the bound)")
    p.add_argument("--plot", type=Path, default=ROOT / "benchmarks-latency.png",
                   help="where the plot of latency against offered load goes")
    p.add_argument("--cluster", action="store_true",
                   help="run (a) again on a 3-node NATS cluster (streams R3) with two replicas of every service on "
                        "PostgreSQL, and compare its board with the single server's")
    p.add_argument("--out", type=Path, default=ROOT / "bench-results" / "bench.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.cluster and args.skip_flow:
        p.error("--cluster compares its board with that of (a) on one server in the same run: drop --skip-flow")
    return args


def run_flow(args: argparse.Namespace, console: Console, **scale: Any) -> dict[str, Any]:
    """(a) on a platform made with `scale` (Platform's cluster, replicas, database); with --cluster, the final board
    too (`final_board`, for the comparison of the two runs)."""
    from bench_cluster import final_board
    from bench_flow import flow

    home = Home(Path(tempfile.mkdtemp(prefix="assay-bench-")))
    for name in ("operator", "committee", "vendor"):
        KeyPair.generate().save(home.key_file(name))
    platform = Platform(home, **scale)
    ok = False
    try:
        platform.start()
        result = asyncio.run(flow(platform, args.sites, args.rounds, args.models_per_round, args.raw_messages,
                                  args.raw_reps, args.idle_s, lambda s: console.print(f"  [dim]·[/dim] {s}"),
                                  load_fractions=args.load, load_s=args.load_s, ingest_results=args.ingest))
        if args.cluster:
            result["final_board"] = asyncio.run(final_board(platform))
        ok = True
        return result
    finally:
        platform.stop()
        if args.keep or not ok:
            console.print(f"  [dim]·[/dim] platform home kept in {home.root} (logs in {home.logs})")
        else:
            shutil.rmtree(home.root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 140)  # a log or CI: keep the table's rows on one line each
    started = time.perf_counter()
    results: dict[str, object] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": describe_machine(nats_server_binary()),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    if not args.skip_flow:
        console.rule("[bold](a) jobs through the platform vs raw JetStream")
        results["flow"] = run_flow(args, console)
    if args.cluster:
        from bench_cluster import compare, scaled_out

        console.rule("[bold](a) again on a 3-node NATS cluster, R3, two replicas of every service on PostgreSQL")
        with scaled_out() as scale:
            results["cluster"] = run_flow(args, console, **scale) | scale
        results["cluster"]["database"] = "PostgreSQL (a private cluster of this run)"
        results["cluster"]["board"] = compare(results["flow"].pop("final_board"),
                                              results["cluster"].pop("final_board"))
    if args.scale:
        from bench_scale import measure as measure_scale

        console.rule(f"[bold](d) how cost grows: {', '.join(map(str, args.scale))} sites, each on a fresh platform")
        results["scale"] = measure_scale(args.scale, args.scale_rounds, args.idle_s, args.scale_load_s,
                                         args.scale_in_flight, args.keep,
                                         lambda s: console.print(f"  [dim]·[/dim] {s}"))
    if not args.skip_containers:
        from bench_containers import measure

        console.rule("[bold](b) sandboxed execution vs bare docker run")
        results["containers"] = measure(args.repetitions, lambda s: console.print(f"  [dim]·[/dim] {s}"))
    if not args.skip_board:
        from bench_board import measure as measure_board

        console.rule("[bold](c) the board: 50 models x 32 sites x 1000 replicates")
        results["board"] = measure_board(say=lambda s: console.print(f"  [dim]·[/dim] {s}"))
    results["wall_s"] = round(time.perf_counter() - started, 1)
    results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    if (load := (results.get("flow") or {}).get("load")) and args.plot:  # type: ignore[attr-defined]
        from bench_load import plot

        plot(load, args.plot)
        results["plot"] = args.plot.name
    args.markdown.write_text(markdown(results, args.markdown.read_text() if args.markdown.exists() else ""))
    console.print(table(results))
    console.print(f"wrote {args.out} and {args.markdown} in {results['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
