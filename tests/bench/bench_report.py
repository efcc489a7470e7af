"""The machine a run happened on, and the run's numbers as a rich table and as BENCHMARKS.md."""

from __future__ import annotations

import os
import platform as py_platform
import subprocess
from pathlib import Path
from typing import Any

from rich.table import Table


def _first(path: str, prefix: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def _version(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def describe_machine(nats_server: str) -> dict[str, Any]:
    from importlib.metadata import version

    mem_kib = _first("/proc/meminfo", "MemTotal").split()[0]
    return {
        "cores": os.cpu_count(),
        "cpu": _first("/proc/cpuinfo", "model name"),
        "memory_gib": round(int(mem_kib) / 1024**2, 1) if mem_kib.isdigit() else None,
        "kernel": py_platform.release(),
        "python": py_platform.python_version(),
        "docker": _version(["docker", "version", "--format", "{{.Server.Version}}"]),
        "nats_server": _version([nats_server, "--version"]),
        "faststream": version("faststream"),
        "nats_py": version("nats-py"),
    }


def rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(measurement, value, baseline, ratio) rows, the same for the terminal and the markdown."""
    out: list[tuple[str, str, str, str]] = []
    f = r.get("flow")
    if f:
        raw, stage, setup = f["raw"], f["stage_p50_s"], f["setup"]
        per_round = f["jobs"] // max(f["rounds"], 1)
        commands_per_s = setup["commands"] / setup["commands_s"]
        services_idle = sum(v for k, v in f["idle_cpu_cores"].items() if k != "nats")
        out += [
            (f"(a) jobs/s, {f['sites']} sites, {f['rounds']} rounds of {per_round} jobs", f"{f['jobs_per_s']:.1f}",
             f"{raw['msgs_per_s']:.0f} raw JetStream msgs/s",
             f"{f['ratio_jobs_to_raw_msgs']:.4f} (1 job = {1 / f['ratio_jobs_to_raw_msgs']:.0f} msgs)"),
            ("(a) job latency p50, JobScheduled -> ResultAccepted", _ms(f["latency_p50_s"]),
             f"raw round trip p50 {_ms(raw['round_trip_p50_s'], 2)}", f"{f['ratio_latency_p50_to_raw_trip']:.0f}"),
            ("(a) job latency p99", _ms(f["latency_p99_s"]), f"raw round trip p99 {_ms(raw['round_trip_p99_s'], 2)}",
             f"{f['ratio_latency_p99_to_raw_trip']:.0f}"),
            ("      p50 stage: scheduled -> the site starts it", _ms(stage["scheduled_to_site_start"]), "", ""),
            ("      p50 stage: site start -> signed result on the bus", _ms(stage["site_start_to_result"]), "", ""),
            ("      p50 stage: result -> ResultAccepted (leaderboard)", _ms(stage["result_to_accepted"]), "", ""),
            ("(a) setup: signed commands/s through assay.client", f"{commands_per_s:.1f}",
             f"{raw['msgs_per_s']:.0f} raw JetStream msgs/s", f"{commands_per_s / raw['msgs_per_s']:.4f}"),
            ("(a) CPU cores the four services burn while idle", f"{services_idle:.2f}",
             f"nats-server {f['idle_cpu_cores'].get('nats', 0):.2f}", ""),
        ]
    out += target_rows(r)
    out += cluster_rows(r)
    out += scale_rows(r)
    c = r.get("containers")
    if c:
        med = c["median_s"]
        out += [
            ("(b) one job through execute(): 2 sandboxed containers", _ms(med["execute"]),
             f"2x bare `docker run` {_ms(med['docker_cli'])}", f"{c['ratio_execute_to_cli']:.2f}"),
            ("(b) the same against docker SDK containers.run", _ms(med["execute"]),
             f"2x containers.run {_ms(med['docker_sdk'])}", f"{c['ratio_execute_to_sdk']:.2f}"),
        ]
    b = r.get("board")
    if b:
        size = f"{b['models']} models x {b['sites']} sites x {b['replicates']} replicates"
        out += [
            (f"(c) the whole board from scratch, {size}", _ms(b["full_s"]),
             f"without replicates {_ms(b['bare_s'])}", f"{b['ratio_full_to_bare']:.1f}"),
            ("(c) the board again after one new result (in memory)", _ms(b["incremental_s"]),
             f"from scratch {_ms(b['full_s'])}", f"{b['incremental_s'] / b['full_s']:.2f}"),
            ("(c) one new result recorded and the board made again, SQLite", _ms(b["stored_new_result_s"]),
             f"first board from SQLite {_ms(b['stored_cold_s'])}",
             f"{b['stored_new_result_s'] / b['stored_cold_s']:.2f}"),
            ("(c) a signed result on the bus, with its evidence", f"{b['result_bytes'] / 1024:.1f} KiB",
             f"without {b['bare_result_bytes'] / 1024:.1f} KiB", f"{b['result_bytes'] / b['bare_result_bytes']:.1f}"),
        ]
    return out


def target_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """What a job costs the bus, the latency at half the maximum rate, and the ingest of waiting results, each against
    its target (issue 11)."""
    f = r.get("flow") or {}
    out: list[tuple[str, str, str, str]] = []
    if cost := f.get("per_job"):
        out.append(("(a) one job on the bus: JetStream writes, deliveries", f"{cost['writes']:g}, "
                    f"{cost['deliveries']:g}", "", ""))
    if load := f.get("load"):
        half = min(load["levels"], key=lambda x: abs(x["fraction_of_max"] - 0.5))
        out += [(f"(a) latency p50 at {half['fraction_of_max']:.2f} of the maximum rate "
                 f"({half['offered_jobs_per_s']:.1f} jobs/s offered)", _ms(half["latency_p50_s"]), "target 50 ms",
                 f"{half['latency_p50_s'] / 0.05:.1f}"),
                ("(a) latency p99 there", _ms(half["latency_p99_s"]), "target 250 ms",
                 f"{half['latency_p99_s'] / 0.25:.1f}")]
    if ingest := f.get("ingest"):
        out += [(f"(a) ingest: {ingest['results']} results waiting, verified, bound, stored",
                 f"{ingest['results_per_s']:.0f}/s", "target 1000/s", f"{ingest['results_per_s'] / 1000:.2f}"),
                ("(a) ingest: ... and ranked (the LeaderboardUpdated of the last)", f"{ingest['ranked_per_s']:.0f}/s",
                 "target 1000/s", f"{ingest['ranked_per_s'] / 1000:.2f}")]
    return out


def cluster_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """`--cluster`: (a) on three nats-servers and two replicas of every service, against (a) on one of each."""
    f, k = r.get("flow"), r.get("cluster")
    if not f or not k:
        return []
    board = k["board"]
    said = "the same" if board["same"] else f"{board['different_fields']} fields differ"
    return [
        (f"(a) cluster: jobs/s, {k['cluster']} nats-servers (R3), {k['replicas']} replicas of each service",
         f"{k['jobs_per_s']:.1f}", f"one server {f['jobs_per_s']:.1f}", f"{k['jobs_per_s'] / f['jobs_per_s']:.2f}"),
        ("(a) cluster: job latency p50", _ms(k["latency_p50_s"]), f"one server {_ms(f['latency_p50_s'])}",
         f"{k['latency_p50_s'] / f['latency_p50_s']:.2f}"),
        ("(a) cluster: job latency p99", _ms(k["latency_p99_s"]), f"one server {_ms(f['latency_p99_s'])}",
         f"{k['latency_p99_s'] / f['latency_p99_s']:.2f}"),
        ("(a) cluster: raw JetStream, a stream on 3 servers", f"{k['raw']['msgs_per_s']:.0f} msgs/s",
         f"one server {f['raw']['msgs_per_s']:.0f} msgs/s", f"{k['raw']['msgs_per_s'] / f['raw']['msgs_per_s']:.2f}"),
        ("(a) cluster: the final board", said, f"{board['rows']} rows, {board['results']} results, one server's", ""),
    ] + ([("(a) cluster: ingest, results/s (both leaderboard replicas, PostgreSQL)",
           f"{k['ingest']['results_per_s']:.0f}/s", f"one server {f['ingest']['results_per_s']:.0f}/s",
           f"{k['ingest']['results_per_s'] / f['ingest']['results_per_s']:.2f}")]
         if k.get("ingest") and f.get("ingest") else [])


def scale_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(d): jobs/s and p99 at each size, against the smallest."""
    sizes = (r.get("scale") or {}).get("sizes", [])
    if not sizes:
        return []
    first = sizes[0]["rounds"]
    out = []
    for x in sizes:
        k = x["rounds"]
        out.append((f"(d) {x['sites']} sites: jobs/s, latency p50 / p99", f"{k['jobs_per_s']:.1f}, "
                    f"{_ms(k['latency_p50_s'])} / {_ms(k['latency_p99_s'])}",
                    f"{sizes[0]['sites']} sites {first['jobs_per_s']:.1f}",
                    f"{k['jobs_per_s'] / first['jobs_per_s']:.2f}"))
    return out


def _services(cores: dict[str, float]) -> float:
    return sum(v for k, v in cores.items() if k != "observer" and not k.startswith(("nats", "sites-")))


def _sites(values: dict[str, float]) -> float:
    return sum(v for k, v in values.items() if k.startswith("sites-"))


def scale_lines(d: dict[str, Any]) -> list[str]:
    """(d) as a table: one row per size."""
    if not d.get("sizes"):
        return []
    took = f" ({d['wall_s']:.0f} s of this run; `just bench` runs it only when asked, with --scale)" \
        if "wall_s" in d else ""
    lines = ["", f"How cost grows (d){took}: {d['rounds']} rounds of one model per size; idle CPU over "
             f"{d['idle_s']:g} s with every worker connected (cores: the four services together, nats-server, the "
             f"site processes together); a steady load of {d['load_fraction']:g} of the rounds' jobs/s for "
             f"{d['load_s']:g} s, the backlog sampled every {d['sample_s']:g} s:", "",
             "| sites | site processes | jobs/s | p50 | p99 | idle CPU: services | idle CPU: nats-server | "
             "idle CPU: site processes | steady load, jobs/s (p50 / p99) | backlog max | backlog slope | "
             "backlog at the end, empty after | setup (commands/s) | RSS: site processes, nats-server |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for x in d["sizes"]:
        k, s, idle, rss, setup = x["rounds"], x["steady"], x["idle_cpu_cores"], x["rss_mib"], x["setup"]
        commands = setup["commands"] + setup["group_commands"]
        seconds = setup["commands_s"] + setup["groups_s"]
        empty = "never" if s["empty_after_end_s"] is None else f"{s['empty_after_end_s']:.1f} s"
        lines.append(
            f"| {x['sites']} | {x['processes']} | {k['jobs_per_s']:.1f} | {_ms(k['latency_p50_s'])} | "
            f"{_ms(k['latency_p99_s'])} | {_services(idle):.3f} | {idle.get('nats', 0):.3f} | {_sites(idle):.3f} | "
            f"{s['offered_jobs_per_s']:.1f} ({_ms(s['latency_p50_s'])} / {_ms(s['latency_p99_s'])}) | "
            f"{s['backlog_max']} | {s['backlog_slope_per_s']:+.2f}/s | {s['backlog_at_end']}, {empty} | "
            f"{seconds:.0f} s ({commands / seconds:.0f}/s) | {_sites(rss):.0f} MiB, {rss.get('nats', 0):.0f} MiB |")
    for x in d["sizes"]:
        planning = ", ".join(f"{y['planning_s'] * 1000:.0f}" for y in x["rounds"]["rounds_detail"])
        lines += ["", f"{x['sites']} sites: idle CPU by process {x['idle_cpu_cores']}; CPU cores busy during the "
                  f"rounds {x['rounds']['cpu_cores_busy']}; from the approval to the first JobScheduled in each round "
                  f"{planning} ms; RSS by process (MiB) {x['rss_mib']}; workers started in "
                  f"{x['workers_start_s']:.1f} s, their datasets' checks done {x['checks_s']:.1f} s later; jobs "
                  f"run more than once: {x['jobs_run_again']}; service log lines: {x['logs']}"]
    return lines


def _ms(seconds: float, digits: int = 0) -> str:
    return f"{seconds * 1000:.{digits}f} ms"


def table(r: dict[str, Any]) -> Table:
    t = Table(title=f"Assay benchmarks ({r['machine']['cores']} cores, Python {r['machine']['python']}, "
                    f"Docker {r['machine']['docker']}; medians)")
    for name, justify in (("measurement", "left"), ("value", "right"), ("baseline, same run", "right"),
                          ("ratio", "right")):
        t.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in rows(r):
        t.add_row(*row)
    return t


INTRO = """# Benchmarks

`just bench` (that is, `.venv/bin/python tests/bench/bench.py`) measures three things on this machine and writes
`bench-results/bench.json` and this file. It takes about {minutes} on 2 cores. Shared machines are noisy, so every
speed is reported as a ratio to a baseline measured in the same run, and as medians. No test asserts on a time.

## What is measured

**(a) Jobs through the platform.** `assay.platform.Platform` starts a real nats-server (JetStream, `sync_interval:
always`) and the four services, each its own process, exactly as `assay up` does. The benchmark process then
plays every actor with signed commands through `assay.client.request` (as `assay demo` does): it registers a
benchmark owner, a model owner and {sites} site actors, a benchmark with fake but well-formed image digests, has
the operator approve it, registers one tiny prepared dataset per site and associates it, and registers the models
and asks for their association. It hosts {sites} real site-worker apps (`site_worker.main.create_app`, one NATS
connection and one durable pull consumer each; a worker is a process of its own at its site, so these share a pool of
32 threads for their files, not the 6 of one process) whose container runner runs nothing: `evaluate` writes a
valid `metrics.json` and `cases.jsonl`. The datasets' checks before joining wait in the queues until the workers
start; they run, and every consumer catches up, before the first round. Then, in each of {rounds} rounds, the
benchmark owner approves {models_per_round} model(s) at once, which makes the scheduler plan a burst of
{models_per_round} x {sites} jobs, one per site and model. A separate observer process
(plain nats-py core subscriptions) stamps when each `JobScheduled` (`assay.v1.evt.job.scheduled.*`), each signed
site result (`assay.v1.results.*`) and each `ResultAccepted` (`assay.v1.evt.result.accepted`) appears.

- *jobs/s*: jobs of a round / (last `ResultAccepted` - first `JobScheduled`); the median over the rounds.
- *latency*: per job, `ResultAccepted` seen - `JobScheduled` seen; p50 and p99 (nearest rank) per round, median
  over the rounds. The stages split it: until the site's runner starts the job (relay, JOBS queue, site pull),
  the site (runner, signing, publishing), and the leaderboard (verify, store, relay; the board it changed is
  announced once for the burst, a quarter of a second later).
- *baseline*: raw nats-py JetStream on the same server: publish {raw_messages} messages of 1 KiB with
  `Nats-Msg-Id` (awaiting each ack), then consume them with a durable pull consumer (batch 16), acking each;
  msgs/s = messages / (publish + consume time), median of {raw_reps}. The ratio says how many such raw
  messages one job costs. A job is at least 4 JetStream publishes (JobScheduled, the job, the result,
  ResultAccepted; a LeaderboardUpdated is one per burst) and 3 durable deliveries (the job, the result, its
  ResultAccepted to the scheduler), so about 4 is the floor; what a job costs is counted below.
  The platform is not bound by the server, so this ratio carries the baseline's own noise (fsync-bound
  publishes on a shared disk); read it together with the absolute jobs/s of several runs.
- *idle CPU*: CPU cores each service process burns with no traffic, measured over {idle_s:.0f} s before anything
  is sent.
- *health*: what went wrong on the way, none of it timed: JetStream consumer advisories (`MSG_NAKED`: a
  handler failed and the message will come again), jobs a site ran more than once, messages in DEAD_LETTERS,
  `LeaderboardUpdated` events and their size, and error lines in the services' logs.
- *one job on the bus*: the messages the server stored in EVENTS, JOBS, RESULTS and DEAD_LETTERS during the rounds
  (its sequence numbers, and its count per subject) and the deliveries to every durable consumer (each consumer's
  delivered count, redeliveries included), divided by the rounds' jobs. The site heartbeats and other key-value
  writes are not per job and not counted.
- *latency against offered load* (`tests/bench/bench_load.py`): {sweep_sites} of the sites each have a dataset in a
  small benchmark of its own, so that one model approved for one of them makes one job, at that site; models are
  approved for each in turn. Each such job brings its own approval (a signed command, its event, and the planning
  it starts), which a round shares among all its jobs, so their maximum is measured first: a second's worth of the
  rounds' jobs (at least 20) approved at once, jobs / (last ResultAccepted - first JobScheduled). Then {fractions}
  of that maximum are offered at a steady rate (each approval sent at its time, without waiting for the one before)
  for {load_s:.0f} s each, and JobScheduled -> ResultAccepted is taken for every job (p50, p90, p99, nearest rank).
  The target is p50 <= 50 ms and p99 <= 250 ms at half the maximum rate; the plot is [{plot}]({plot}).
- *ingest* (`tests/bench/bench_ingest.py`): the leaderboard's processes are paused (SIGSTOP) while {ingest}
  signed results of new jobs (new models at every site, each job signed with the scheduler's key as the scheduler
  signs them, each result with its site's key) are published to RESULTS; then they go on (SIGCONT), three times
  with new models each time. Results/s is results / (the last ResultAccepted - the moment they went on): each
  verified (both signatures), bound to its job and benchmark, stored; *ranked* runs to the LeaderboardUpdated that
  announces every new model with all its sites. The figures are the median run's, with the leaderboard's CPU time
  per result over the same span (steadier than results/s on a shared machine). Target 1,000/s.

**(b) Container overhead.** One trivial job through `site_worker.execution.execute(job, dataset_dir,
DockerRunner(docker.from_env()), work_dir, Limits())`, which re-hashes the dataset, checks both image ids, and
runs the model (`infer`) and then the evaluator (`evaluate`) container in the sandbox (no network, read-only root,
non-root user, all capabilities dropped, limits, bind mounts), against the same two containers run bare with
`docker run --rm --network none IMAGE infer` and `... evaluate`, and with the docker SDK's
`containers.run(..., remove=True)`. The image is built FROM `assay/python-base:bookworm`; its entrypoint writes
minimal valid outputs. {repetitions} repetitions each after one warm-up, interleaved with a rotating order; the
ratio is of the medians.

**(c) The board at committee scale.** `tests/bench/bench_board.py` builds a benchmark of 50 models x 32 sites, each
result with 1000 replicates of three metrics, confusion counts and 100-bin score histograms (synthetic, seeded), and
times `leaderboard.board.aggregate` over all 1600 results (targets: 2 s or less), the board made again by
`leaderboard.current.Boards` after one new result (target: 0.2 s or less), and the service's own path on SQLite
(`Store` + `current`, as the leaderboard's announcer does it for a burst): the first board from the database, and one
new result recorded and the board made again. Baseline: the same 1600 results without replicates or aggregates. It
also reports the bytes of one signed `SiteResult` envelope with its evidence against one without. Medians of 5.

**(a) on a cluster** (`--cluster`). The same flow again, in the same run, on `Platform(home, cluster=3, replicas=2,
database=...)`: three nats-servers on loopback (each stream and bucket kept on all three, R3, every write fsynced on
each), two processes of every service sharing its durable consumers, and each service's database on a private
PostgreSQL cluster that both write. The raw baseline is then a stream on three servers. The sites report the same
metrics for the same model in both runs, so the final boards (`ShowLeaderboard`, as the benchmark's owner) must
be the same: every field of every row is compared (floats to a relative 1e-9).

**(d) How cost grows** (`--scale 10,100,1000`, `tests/bench/bench_scale.py`). For each of {scale_sizes} sites, a
fresh platform (as in (a)), the setup of (a) with {scale_in_flight} commands in flight, and as many real site-worker
apps (`site_worker.main.create_app`, each its own NATS connection and durable pull consumer, the no-op runner of (a))
hosted in processes of their own, up to {sites_per_process} per process (`tests/bench/bench_hosts.py`: one event loop
for 1,000 workers, each pulling its queue every second, would time the loop, not the platform; each process's
workers share 32 threads for their files). Every site also holds a second dataset in one of a few small benchmarks
of {group_sites} sites each, for the steady load. The datasets' checks run when the workers start; once every
consumer has caught up: the *idle CPU* of every service, of nats-server and of the site processes, all workers
connected and nothing to do, over {scale_idle_s:.0f} s; {scale_rounds} rounds as in (a), each approving one model
(one job per site): jobs/s and p50 / p99, median over the rounds; then a *steady load*: a model approved for each small
benchmark in turn ({group_sites} jobs each), at the interval that offers {load_fraction:g} of the rounds' jobs/s, for
{scale_load_s:.0f} s, while the *backlog* (num_pending + num_ack_pending of the sites' durable consumers on JOBS and
of the services' on EVENTS and RESULTS) is sampled every {sample_s:g} s: its maximum, its slope over the load (a
least-squares line: 0 when the platform keeps up), what is left when the load ends and how long until a look finds
it empty. *Setup* is the seconds its signed commands took (the actors, the benchmarks, the datasets and their
associations, the models); *RSS* is read from /proc at the end.

## Reproduce

```
.venv/bin/python tests/bench/bench.py            # the full run written below
.venv/bin/python tests/bench/bench.py --cluster  # and (a) again on a 3-node cluster, R3, two replicas per service
.venv/bin/python tests/bench/bench.py --skip-containers --skip-board  # (a) alone: rounds, latency sweep, ingest
.venv/bin/python tests/bench/bench.py --scale 10,100,1000  # and (d): 10, 100 and 1,000 sites, each on its platform
.venv/bin/python tests/bench/bench.py --help     # sizes (sites, rounds, models per round, loads, ingest, repetitions)
```

It needs the Docker engine and the `assay/python-base:bookworm` image (`assay demo` builds it), and leaves nothing
running; `--keep` keeps the platform's home folder (logs, databases) for a look.
"""


HISTORY = "<!-- history: written by hand; bench_report.py keeps it when it writes this file again -->"
HISTORY_END = "<!-- /history -->"


def kept_history(previous: str) -> list[str]:
    """The hand-written section of the file as it was (the before and after of each change), to write again."""
    start, end = previous.find(HISTORY), previous.find(HISTORY_END)
    return ["", previous[start:end + len(HISTORY_END)]] if 0 <= start < end else []


def load_lines(f: dict[str, Any], plot: str | None) -> list[str]:
    """The latency sweep, the ingest and what one job costs the bus, as the last run measured them."""
    lines: list[str] = []
    if cost := f.get("per_job"):
        lines += ["", f"One job on the bus, during the rounds: {cost['writes']:g} JetStream writes "
                  f"({cost['by_subject']}; by stream {cost['by_stream']}) and {cost['deliveries']:g} deliveries to "
                  f"durable consumers ({cost['by_consumer']})"]
    if load := f.get("load"):
        lines += ["", f"Latency against offered load (single jobs over {load['sites']} sites, {load['seconds']:.0f} s "
                  f"per load; their maximum {load['max_jobs_per_s']:.1f} jobs/s, all approved at once, where the "
                  f"rounds made {load['rounds_jobs_per_s']:.1f}):", "",
                  "| offered jobs/s | of the maximum | jobs | achieved jobs/s | p50 | p90 | p99 | max |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {x['offered_jobs_per_s']:.1f} | {x['fraction_of_max']:.2f} | {x['jobs']} | "
                  f"{x['achieved_jobs_per_s']:.1f} | {_ms(x['latency_p50_s'])} | {_ms(x['latency_p90_s'])} | "
                  f"{_ms(x['latency_p99_s'])} | {_ms(x['latency_max_s'])} |" for x in load["levels"]]
        if plot:
            lines += ["", f"![latency percentiles against offered load]({plot})"]
    if ingest := f.get("ingest"):
        lines += ["", f"Ingest: {ingest['results']} results ({ingest['waiting_when_resumed']} waiting for the "
                  f"leaderboard when it went on), all accepted after {ingest['accepted_s']:.2f} s and ranked after "
                  f"{ingest['ranked_s']:.2f} s, in {ingest['board_updates']} LeaderboardUpdated events"
                  + (f" (the median of {len(runs)} runs: "
                     + ", ".join(f"{run['results_per_s']:.0f}" for run in runs) + " results/s)"
                     if (runs := ingest.get("runs")) else "")
                  + (f"; the leaderboard's CPU per result: {cpu:.2f} ms"
                     if (cpu := ingest.get("leaderboard_cpu_ms_per_result")) else "")
                  + (" (every process's: " + ", ".join(f"{name} {ms:.2f}" for name, ms in every.items()) + " ms)"
                     if (every := ingest.get("cpu_ms_per_result")) else "")]
    return lines


def markdown(r: dict[str, Any], previous: str = "") -> str:
    """BENCHMARKS.md for the run `r`; `previous` is the file as it was, whose hand-written history is kept."""
    mach, f, c, d = r["machine"], r.get("flow") or {}, r.get("containers") or {}, r.get("scale") or {}
    load = f.get("load") or {}
    text = INTRO.format(minutes=f"{r['wall_s'] / 60:.0f} minutes" if r["wall_s"] >= 90 else f"{r['wall_s']:.0f} s",
                        sites=f.get("sites", "N"), rounds=f.get("rounds", "R"),
                        models_per_round=f.get("models_per_round", "M"),
                        raw_messages=f.get("raw", {}).get("messages", "N"), raw_reps=f.get("raw", {}).get("reps", "R"),
                        idle_s=r["config"].get("idle_s", 0), repetitions=c.get("repetitions", "K"),
                        sweep_sites=load.get("sites", "K"), load_s=r["config"].get("load_s", 0),
                        fractions=", ".join(f"{x:g}" for x in r["config"].get("load", [])) or "(none)",
                        plot=r.get("plot", "benchmarks-latency.png"), ingest=r["config"].get("ingest", "N"),
                        scale_sizes=", ".join(str(x["sites"]) for x in d.get("sizes", [])) or "N",
                        scale_in_flight=r["config"].get("scale_in_flight", "K"),
                        sites_per_process=d.get("sites_per_process", "K"), group_sites=d.get("group_sites", "K"),
                        scale_idle_s=d.get("idle_s", 0), scale_rounds=d.get("rounds", "R"),
                        load_fraction=d.get("load_fraction", 0), scale_load_s=d.get("load_s", 0),
                        sample_s=d.get("sample_s", 0))
    lines = [text, "## Last run", "",
             f"{r['finished_at']} on {mach['cores']} cores ({mach['cpu']}), {mach['memory_gib']} GiB, "
             f"Linux {mach['kernel']}, Python {mach['python']}, Docker {mach['docker']}, {mach['nats_server']}, "
             f"faststream {mach['faststream']}, nats-py {mach['nats_py']}; the whole run took {r['wall_s']:.0f} s.",
             "", "| measurement | value | baseline (same run) | ratio |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {' | '.join(cell.replace('|', '/') for cell in row)} |" for row in rows(r)]
    if f:
        lines += ["", "Per round (jobs/s, latency p50 / p99):", ""]
        lines += [f"- round {i + 1}: {x['jobs']} jobs, {x['jobs_per_s']:.1f} jobs/s, "
                  f"{x['latency_p50_s'] * 1000:.0f} / {x['latency_p99_s'] * 1000:.0f} ms, planning "
                  f"{x['planning_s'] * 1000:.0f} ms" for i, x in enumerate(f["rounds_detail"])]
        board = f["leaderboard_updated"]
        lines += ["", f"CPU seconds per job, by process: {f['cpu_s_per_job']}; CPU cores busy during the rounds: "
                  f"{f['cpu_cores_busy']}", "",
                  f"LeaderboardUpdated events: {board['events']} for {f['jobs']} jobs, the last "
                  f"{board['max_bytes'] / 1024:.0f} KiB, {board['total_bytes'] / 1024**2:.1f} MiB in all", "",
                  f"JetStream consumer advisories during the rounds (naks, terminations): "
                  f"{f['advisories'] or 'none'}; jobs the sites ran more than once: {f['jobs_run_again']}; "
                  f"messages in DEAD_LETTERS: {f['dead_letters']}; "
                  f"service log lines: {f['logs']}"]
        lines += load_lines(f, r.get("plot"))
    if k := r.get("cluster"):
        lines += ["", "The cluster run, per round (jobs/s, latency p50 / p99):", ""]
        lines += [f"- round {i + 1}: {x['jobs']} jobs, {x['jobs_per_s']:.1f} jobs/s, "
                  f"{x['latency_p50_s'] * 1000:.0f} / {x['latency_p99_s'] * 1000:.0f} ms"
                  for i, x in enumerate(k["rounds_detail"])]
        lines += ["", f"Its CPU cores busy during the rounds: {k['cpu_cores_busy']}; consumer advisories: "
                  f"{k['advisories'] or 'none'}; jobs run more than once: {k['jobs_run_again']}; messages in "
                  f"DEAD_LETTERS: {k['dead_letters']}; service log lines: {k['logs']}; board differences: "
                  f"{k['board']['differences'] or 'none'}"]
    lines += scale_lines(d)
    if c:
        lines += ["", f"Container runs, seconds, in the order of the repetitions: {c['all_s']}; the median of the "
                  f"per-repetition ratios: {c['paired_ratio_execute_to_cli']:.2f} against `docker run`, "
                  f"{c['paired_ratio_execute_to_sdk']:.2f} against the SDK"]
    lines += kept_history(previous)
    return "\n".join(lines) + "\n"
