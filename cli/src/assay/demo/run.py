"""`assay demo`: a whole federated benchmark on one machine, every role's step shown as the command a user types."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

import docker
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from assay.client import request
from assay.home import Home
from assay.platform import Platform
from contracts.messages import (
    AssociationList,
    AssociationView,
    JobList,
    JobState,
    Leaderboard,
    ListAssociations,
    ListJobs,
    ShowLeaderboard,
)

BENCHMARK = "breast-cancer-dx"
OPERATOR, OWNER, AUDITOR = "operator", "committee", "auditor"
MODEL_OWNERS = {"reference": "vendor-a", "compact": "vendor-a", "texture": "vendor-b"}
SITES = ("hospital-a", "hospital-b", "hospital-c")
REVIEWING = "hospital-a"  # its data owner reviews every result before it leaves; the others release by policy
POLICIES = {
    "hospital-a": f"""# hospital-a: only this benchmark, and every result waits for the data owner's review
benchmarks = ["{BENCHMARK}"]

[limits]
timeout_s = 600
memory_mb = 2048
cpus = 2

[release]
rule = "hold"
""",
    "hospital-b": """# hospital-b: any benchmark it joined; results that pass the checks leave at once
[release]
rule = "auto"
""",
    "hospital-c": f"""# hospital-c: released without review for this benchmark only
[release]
rule = "benchmarks"
benchmarks = ["{BENCHMARK}"]
""",
    OWNER: f"""# the committee's own site: it runs each model on the benchmark's demo data before it joins
benchmarks = ["{BENCHMARK}"]

[release]
rule = "auto"
""",
}


class StepFailed(Exception):
    pass


def assay(console: Console, home: Home, *args: str) -> str:
    """Run one `assay` command exactly as a user would, showing it first."""
    console.print(f"[bold cyan]$ assay {shlex.join(args)}[/bold cyan]")
    proc = subprocess.run([sys.executable, "-m", "assay", "--home", str(home.root), *args],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": str(console.width)})
    output = (proc.stdout + proc.stderr).rstrip()
    if output:
        console.print(output, markup=False, highlight=False)
    if proc.returncode != 0:
        raise StepFailed(f"`assay {shlex.join(args)}` failed")
    return proc.stdout


def benchmark_spec(images_models_reference: str) -> dict:  # type: ignore[type-arg]
    return {
        "benchmark_id": BENCHMARK,
        "name": "Breast cancer diagnosis from fine-needle aspirates (Wisconsin diagnostic data)",
        "description": "Malignant vs benign from 30 nuclear features; metrics at the 0.5 score threshold.",
        "preparator": {"name": "assay-demo/preparator:1"},
        "reference_model": {"name": images_models_reference},
        "evaluator": {"name": "assay-demo/evaluator:1"},
        "metrics": [{"name": "auc", "kind": "auc"}, {"name": "sensitivity", "kind": "sensitivity"},
                    {"name": "specificity", "kind": "specificity"}],
        "primary_metric": "auc",
        "predictions": {"file": "predictions.csv", "columns": ["case_id", "score"]},
        # each site sends 1000 paired bootstrap replicates of every metric, its confusion counts at 0.5 and its
        # score histograms on 100 bins. A cell may hold 0 or at least `min_count` cases, else the site withholds that
        # aggregate and the board falls back to a named weighted mean: 1 here, as the demo's hospitals hold about
        # 130 cases each (a benchmark over thousands of cases would ask for 5 or 10)
        "pooling": {"replicates": 1000, "threshold": 0.5, "confusion": True, "bins": 100, "min_count": 1},
        # model owners see their own rows with the sites' values under pseudonyms; anyone the pooled values
        "sharing": {"min_cases": 100, "pseudonyms": True, "public": "pooled"},
        # a model that asks to join is first run on the demo data (20 cases no hospital holds) at the committee's site
        "check_site": OWNER,
    }


async def wait_for_pairs(home: Home, console: Console, what: str, expected: int,
                         done: Callable[[AssociationView], bool], timeout_s: float = 600) -> None:
    """Until `expected` of the benchmark's pairs are `done`, as the committee sees them."""
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(what, total=expected)
        deadline = time.monotonic() + timeout_s
        while True:
            listed = AssociationList.model_validate(await request(
                home.nats_url(), ListAssociations(benchmark_id=BENCHMARK), actor=OWNER, key=home.key(OWNER)))
            count = sum(1 for pair in listed.associations if done(pair))
            progress.update(task, completed=count)
            for pair in listed.associations:
                if pair.check is not None and pair.check.state in ("FAILED", "REFUSED", "DECLINED", "CANCELLED"):
                    raise StepFailed(f"the check of {pair.kind.value} {pair.entity_id} is {pair.check.state}: "
                                     f"{pair.check.reason}")
            if count >= expected:
                return
            if time.monotonic() > deadline:
                raise StepFailed(f"only {count} of {expected} {what} after {timeout_s:.0f} s; `assay association "
                                 f"list --benchmark {BENCHMARK} --as {OWNER}` says where each stands")
            await asyncio.sleep(0.5)


def checked(kind: str, state: str = "PASSED") -> Callable[[AssociationView], bool]:
    return lambda pair: pair.kind.value == kind and pair.check is not None and pair.check.state == state


async def wait_for_results(home: Home, expected: int, console: Console, *, held: int = 0,
                           timeout_s: float = 900) -> Leaderboard:
    """Until `expected` jobs have their result on the board or, `held` of them, waiting for review at a site."""
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    what = "results on the leaderboard" + (" or held for review" if held else "")
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"site jobs: {what}", total=expected)
        deadline = time.monotonic() + timeout_s
        while True:
            nats_url = home.nats_url()
            board = Leaderboard.model_validate(await request(  # as the committee: its view has every site
                nats_url, ShowLeaderboard(benchmark_id=BENCHMARK), actor=OWNER, key=home.key(OWNER)))
            done = sum(len(row.site_values) for row in board.rows)
            if held:
                jobs = JobList.model_validate(await request(nats_url, ListJobs(benchmark_id=BENCHMARK,
                                                                               state=JobState.HELD), actor="demo"))
                done += min(len(jobs.jobs), held)
            progress.update(task, completed=done)
            if done >= expected:
                return board
            if time.monotonic() > deadline:
                raise StepFailed(f"only {done} of {expected} {what} after {timeout_s:.0f} s; "
                                 "`assay job list` says where the others stand")
            await asyncio.sleep(0.5)


def run_demo(base: Home, console: Console, *, keep: bool = False,
             on_board: Callable[[Leaderboard], None] | None = None) -> int:
    from assay.demo.build import build_demo_images

    home = Home(base.root / "demo")
    if home.platform_file.exists():
        console.print(f"[red]error:[/red] a demo platform seems to run ({home.platform_file}); stop it first")
        return 1
    shutil.rmtree(home.root, ignore_errors=True)
    home.root.mkdir(parents=True)
    platform = Platform(home, on_step=lambda s: console.print(f"  [dim]·[/dim] {s}"))
    try:
        console.rule("[bold]1. Images: preparator, three models, evaluator (built locally)")
        images = build_demo_images(docker.from_env(), home.root / "build",
                                   on_step=lambda s: console.print(f"  [dim]·[/dim] {s}"))
        console.rule("[bold]2. Keys for every actor")
        make_keys(console, home)
        console.rule("[bold]3. The platform: nats-server, four services, a site worker per hospital and the committee's")
        platform.start()
        for title, step in STEPS:
            console.rule(f"[bold]{title}")
            step(console, home)
        console.rule("[bold]8. Jobs run at the sites; signed results leave by each site's policy")
        total = len(MODEL_OWNERS) * len(SITES)
        asyncio.run(wait_for_results(home, total, console, held=len(MODEL_OWNERS)))
        assay(console, home, "job", "list", "--benchmark", BENCHMARK)
        console.rule(f"[bold]9. {REVIEWING}'s data owner reviews what would leave, and releases it")
        review(console, home)
        board = asyncio.run(wait_for_results(home, total, console))
        console.rule("[bold]10. The board: pooled values with 95% intervals, shared ranks, what each role sees")
        assay(console, home, "leaderboard", "show", BENCHMARK, "--as", OWNER)
        assay(console, home, "leaderboard", "show", BENCHMARK, "--as", MODEL_OWNERS["texture"])
        plot = home.root / "board.png"
        assay(console, home, "leaderboard", "plot", BENCHMARK, "--as", OWNER, "-o", str(plot))
        console.rule("[bold]11. Anyone with read access checks it: the board rebuilt from the signed streams")
        assay(console, home, "verify", BENCHMARK, "--as", AUDITOR)
        assay(console, home, "audit", "verify", "--site", REVIEWING)
        if on_board is not None:
            on_board(board)
        console.print(f"Models: {', '.join(f'{k} {v[:19]}' for k, v in images.models.items())}")
        console.print(f"The forest plot and the rank heat map: [bold]{plot}[/bold]")
        if keep:
            console.print(f"[green]The platform keeps running[/green] (ASSAY_HOME={home.root}). Ctrl-C stops it.")
            platform.wait()
        return 0
    except StepFailed as exc:
        console.print(f"[red]demo failed:[/red] {exc}; logs in {home.logs}")
        return 1
    finally:
        platform.stop()


def make_keys(console: Console, home: Home) -> None:
    for name in (OPERATOR, OWNER, AUDITOR, *sorted(set(MODEL_OWNERS.values())), *SITES):
        assay(console, home, "keys", "new", name)
    for site in (OWNER, *SITES):
        policy = home.root / "policies" / f"{site}.toml"
        policy.parent.mkdir(exist_ok=True)
        policy.write_text(POLICIES[site])
        assay(console, home, "site", "add", site, "--policy", str(policy))


def review(console: Console, home: Home) -> None:
    assay(console, home, "results", "pending", "--site", REVIEWING)
    assay(console, home, "results", "approve", "--all", "--benchmark", BENCHMARK, "--site", REVIEWING, "--yes")


def onboard(console: Console, home: Home, name: str, role: str) -> None:
    """The member makes its NATS key and sends the public half; the operator enrols it with its role. From then on
    every command it signs (`--as NAME`) connects as that key, with that role's rights alone."""
    public = assay(console, home, "bus", "key", name).strip().splitlines()[-1]
    bundles = home.root / "bundles"
    bundles.mkdir(exist_ok=True)
    assay(console, home, "bus", "enrol", name, "--role", role, "--nkey", public, "--out", str(bundles / f"{name}.json"))


def enrol_actors(console: Console, home: Home) -> None:
    for name, role in ((OPERATOR, "operator"), (OWNER, "benchmark_owner"), (AUDITOR, "auditor"),
                       *((owner, "model_owner") for owner in sorted(set(MODEL_OWNERS.values()))),
                       *((site, "data_owner") for site in SITES)):
        onboard(console, home, name, role)
    # the committee runs a site worker of its own too, for the compatibility checks
    assay(console, home, "actor", "register", OWNER, "--role", "benchmark_owner", "--also", "site", "--as", OPERATOR)
    assay(console, home, "actor", "register", AUDITOR, "--role", "auditor", "--as", OPERATOR)
    for owner in sorted(set(MODEL_OWNERS.values())):
        assay(console, home, "actor", "register", owner, "--role", "model_owner", "--as", OPERATOR)
    for site in SITES:
        assay(console, home, "actor", "register", site, "--role", "site", "--as", OPERATOR)


def define_benchmark(console: Console, home: Home) -> None:
    spec_file = home.root / "benchmark.json"
    from assay.demo.data import write_demo_raw

    spec_file.write_text(json.dumps(benchmark_spec("assay-demo/model-reference:1"), indent=2))
    demo = home.root / "demo-data"
    cases = write_demo_raw(demo)
    assay(console, home, "benchmark", "register", str(spec_file), "--demo-data", str(demo), "--demo-cases", str(cases),
          "--as", OWNER)
    assay(console, home, "benchmark", "approve", BENCHMARK, "--as", OPERATOR)
    # the committee trusts these hospitals: their datasets join at once, by its policy (models it approves one by one)
    assay(console, home, "association", "policy", BENCHMARK, "--kind", "dataset", "--mode", "allow",
          *(arg for site in SITES for arg in ("--allow", site)), "--as", OWNER)


def join_models(console: Console, home: Home) -> None:
    for model, owner in MODEL_OWNERS.items():
        assay(console, home, "model", "register", model, "--image", f"assay-demo/model-{model}:1", "--push",
              "--as", owner)
        assay(console, home, "association", "request", BENCHMARK, "--model", model, "--as", owner)
    asyncio.run(wait_for_pairs(home, console, "compatibility checks on the demo data, at the committee's site",
                               len(MODEL_OWNERS), checked("model")))
    # the committee sees each check's metrics beside the request, then approves them all in one command
    assay(console, home, "association", "list", "--benchmark", BENCHMARK, "--pending", "--as", OWNER)
    assay(console, home, "association", "approve", BENCHMARK, "--all-pending", "--yes", "--as", OWNER)


def join_datasets(console: Console, home: Home) -> None:
    from assay.demo.data import describe_sites, write_site_raw

    for index, (summary, site) in enumerate(zip(describe_sites(), SITES, strict=True)):
        raw = home.root / "hospital-data" / site
        write_site_raw(index, raw)
        console.print(f"  [dim]·[/dim] {site} holds {summary.cases} cases, {summary.prevalence:.0%} malignant, "
                      f"in {raw}")
        dataset = f"{site}-wdbc"
        assay(console, home, "dataset", "prepare", dataset, "--benchmark", BENCHMARK, "--site", site,
              "--raw", str(raw))
        assay(console, home, "dataset", "register", dataset, "--as", site)
        assay(console, home, "association", "request", BENCHMARK, "--dataset", dataset, "--as", site)
    # each dataset is checked with the reference model at its own site; its result leaves by the site's own rules:
    # hospital-a's data owner reviews it like any result
    asyncio.run(wait_for_pairs(home, console, f"reference-model check held at {REVIEWING}", 1,
                               checked("dataset", "HELD")))
    review(console, home)
    asyncio.run(wait_for_pairs(home, console, "datasets admitted by the committee's policy once their check passed",
                               len(SITES), lambda pair: pair.kind.value == "dataset" and pair.status == "APPROVED"))
    assay(console, home, "association", "list", "--benchmark", BENCHMARK, "--as", OWNER)


STEPS: tuple[tuple[str, Callable[[Console, Home], None]], ...] = (
    ("4. The operator enrols the actors: on the bus, each its own NATS key and role; in the registry, its signing key",
     enrol_actors),
    ("5. The committee defines the benchmark; the operator approves it; the committee's policy admits the hospitals",
     define_benchmark),
    ("6. Model owners push their images, register them by digest and ask to join; each is checked on the demo data",
     join_models),
    ("7. Each hospital prepares its data locally, registers metadata only and asks to join; the reference model "
     "checks it there", join_datasets),
)
