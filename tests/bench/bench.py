"""`just bench`: jobs through the real platform against raw JetStream, the sandbox against bare `docker run`, and the
board at committee scale against the same board without replicates.

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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(HERE) not in sys.path:  # `python -m` or an import from elsewhere: the sibling modules live here
    sys.path.insert(0, str(HERE))

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
    p.add_argument("--out", type=Path, default=ROOT / "bench-results" / "bench.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    return p.parse_args(argv)


def run_flow(args: argparse.Namespace, console: Console) -> dict[str, object]:
    from bench_flow import flow

    home = Home(Path(tempfile.mkdtemp(prefix="assay-bench-")))
    for name in ("operator", "committee", "vendor"):
        KeyPair.generate().save(home.key_file(name))
    platform = Platform(home)
    ok = False
    try:
        platform.start()
        result = asyncio.run(flow(platform, args.sites, args.rounds, args.models_per_round, args.raw_messages,
                                  args.raw_reps, args.idle_s, lambda s: console.print(f"  [dim]·[/dim] {s}")))
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
    args.markdown.write_text(markdown(results))
    console.print(table(results))
    console.print(f"wrote {args.out} and {args.markdown} in {results['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
