"""The `assay` command: every role's signed commands, `assay up` and `assay demo`."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from assay.association_cli import association_app
from assay.audit_cli import audit_app
from assay.bus_cli import bus_app
from assay.dead_letters_cli import dead_letters_replay
from assay.entities_cli import lister, shower, site_list
from assay.events_cli import events_app
from assay.images_cli import images_app
from assay.watch_cli import watch
from assay.home import Home, speak_as
from assay.site_cli import policy_app, prefetch, results_app
from assay.sites_cli import sites_list
from contracts import messages as m

app = typer.Typer(help="Assay: federated benchmarking for medical AI.", no_args_is_help=True, add_completion=False)
keys_app = typer.Typer(help="Actor keys (Ed25519): make one, rotate one.", no_args_is_help=True)
actor_app = typer.Typer(help="Actors: enrol and suspend (operator), list (anyone).", no_args_is_help=True)
benchmark_app = typer.Typer(help="Benchmarks: register, edit, archive (owner); approve, reject (operator); list.",
                            no_args_is_help=True)
model_app = typer.Typer(help="Models (model owner).", no_args_is_help=True)
dataset_app = typer.Typer(help="Datasets, prepared at the site (data owner).", no_args_is_help=True)
site_app = typer.Typer(help="Site workers.", no_args_is_help=True)
leaderboard_app = typer.Typer(help="The board: show it, plot it (as much as the asker may see).",
                              no_args_is_help=True)
job_app = typer.Typer(help="Where each job stands (everyone); run again what failed (its owners).",
                      no_args_is_help=True)
for sub, name in ((keys_app, "keys"), (actor_app, "actor"), (benchmark_app, "benchmark"), (model_app, "model"),
                  (dataset_app, "dataset"), (association_app, "association"), (site_app, "site"),
                  (leaderboard_app, "leaderboard"), (job_app, "job"), (results_app, "results"), (audit_app, "audit")):
    app.add_typer(sub, name=name)
app.add_typer(job_app, name="jobs", hidden=True)  # `assay jobs list` reads as well as `assay job list`
dead_letters_app = typer.Typer(help="What the platform's consumers gave up on, and why; run it again once the cause "
                                    "is fixed (operator).",
                               no_args_is_help=True)
app.add_typer(dead_letters_app, name="dead-letters")
for sub, kind in ((benchmark_app, m.EntityType.BENCHMARK), (model_app, m.EntityType.MODEL),
                  (dataset_app, m.EntityType.DATASET), (actor_app, m.EntityType.ACTOR)):
    sub.command("list")(lister(kind))
for sub, kind in ((model_app, m.EntityType.MODEL), (dataset_app, m.EntityType.DATASET)):
    sub.command("show")(shower(kind))
site_app.command("list")(site_list)
site_app.add_typer(policy_app, name="policy")
site_app.command("prefetch")(prefetch)
sites_app = typer.Typer(help="Site workers' heartbeats: who is online, busy, or silent.", no_args_is_help=True)
sites_app.command("list")(sites_list)
app.add_typer(sites_app, name="sites")
app.command("watch")(watch)
app.add_typer(events_app, name="events")
app.add_typer(images_app, name="images")
app.add_typer(bus_app, name="bus")

console = Console()
err = Console(stderr=True)
state: dict[str, Home] = {}
As = Annotated[str, typer.Option("--as", help="the key (actor) that signs this command", callback=speak_as)]


@app.callback()
def main_options(home: Annotated[Path, typer.Option(envvar="ASSAY_HOME", help="state folder")] = Path(".assay"),
                 nats: Annotated[str | None, typer.Option(
                     "--nats", envvar="ASSAY_NATS_URL", help="a deployment's bus: nats://user:password@host:4222 or "
                                                             "tls://host:4222 (default: the `assay up` of --home)")
                 ] = None,
                 creds: Annotated[Path | None, typer.Option(envvar="ASSAY_NATS_CREDS",
                                                            help="your NATS credentials file (nkey or user JWT)")
                                  ] = None,
                 ca: Annotated[Path | None, typer.Option(envvar="ASSAY_NATS_CA",
                                                         help="the CA bundle the server's TLS certificate is "
                                                              "checked against (default: the system's)")] = None,
                 profile: Annotated[Path | None, typer.Option(
                     envvar="ASSAY_PROFILE", help="a TOML file of nats_url, creds and ca (default: "
                                                  "HOME/profile.toml when it exists)")] = None) -> None:
    from assay.home import running_on, use_bus

    state["home"] = Home(home.resolve())
    running_on(state["home"])
    try:
        use_bus(state["home"], nats, creds, ca, profile)
    except (OSError, ValueError) as exc:
        say_error(str(exc))
        raise typer.Exit(2) from None


def say_error(message: str) -> None:
    from rich.markup import escape

    err.print(f"[red]error:[/red] {escape(message)}")


def _home() -> Home:
    return state["home"]


def _send(payload: m.Payload, actor: str | None) -> dict[str, Any]:
    from assay.client import CommandFailed, request

    home = _home()
    try:
        key = home.key(actor) if actor else None
        reply = asyncio.run(request(home.nats_url(), payload, actor=actor or "anonymous", key=key))
    except (CommandFailed, FileNotFoundError, ConnectionError) as exc:
        say_error(str(exc))
        raise typer.Exit(1) from exc
    if "message" in reply:
        console.print(f"[green]ok[/green] {reply['message']}")
    return reply


def _image_id(ref: str) -> str:
    import docker

    from site_worker.containers import DockerRunner

    found = DockerRunner(docker.from_env()).image_id(ref)
    if found is None:
        say_error(f"image {ref!r} is not in the local Docker engine; build or `docker load` it")
        raise typer.Exit(1)
    return found


@keys_app.command("new")
def keys_new(name: str) -> None:
    """Create an Ed25519 key pair NAME (private key mode 0600)."""
    from contracts.signing import KeyPair

    path = _home().key_file(name)
    if path.exists():
        say_error(f"{path} exists; keys are never overwritten")
        raise typer.Exit(1)
    pair = KeyPair.generate()
    pair.save(path)
    console.print(f"[green]ok[/green] key {name}: {pair.key_id} ({path})")


@actor_app.command("register")
def actor_register(name: str, role: Annotated[m.Role, typer.Option()], actor: As,
                   display_name: Annotated[str | None, typer.Option()] = None,
                   also: Annotated[list[m.Role] | None, typer.Option(
                       help="another role it holds (a hospital that also owns a model); repeat")] = None,
                   organisation: Annotated[str | None, typer.Option(help="the organisation it acts for")] = None,
                   public_key: Annotated[str | None, typer.Option(
                       help="the public key the actor sent you: its .pub file, or the key itself; by default "
                            "keys/NAME.pub of this installation")] = None) -> None:
    """Enrol actor NAME with ROLE. The actor makes its key pair itself (`assay keys new NAME` on its own machine)
    and sends only the public key; its private key never leaves it."""
    try:
        if public_key is None:
            public = _home().public_key(name)
        else:
            given = Path(public_key).expanduser()
            public = given.read_text().strip() if given.is_file() else public_key.strip()
    except FileNotFoundError as exc:
        say_error(str(exc))
        raise typer.Exit(1) from exc
    _send(m.RegisterActor(actor_id=name, role=role, public_key=public, display_name=display_name or name,
                          also=tuple(also or ()), organisation=organisation), actor)


organisation_app = typer.Typer(help="Organisations (operator): hospitals, vendors, committees.", no_args_is_help=True)
app.add_typer(organisation_app, name="organisation")
organisation_app.command("list")(lister(m.EntityType.ORGANISATION))


@organisation_app.command("register")
def organisation_register(organisation_id: str, actor: As, name: Annotated[str, typer.Option(help="its name")]) -> None:
    """Enrol an organisation (operator); its actors are then registered with --organisation ID."""
    _send(m.RegisterOrganisation(organisation_id=organisation_id, name=name), actor)


@keys_app.command("rotate")
def keys_rotate(name: str) -> None:
    """Replace key NAME with a new one, announced signed by the old: what the old key signed before stays valid,
    nothing it signs from now on is accepted. The old key is kept aside (NAME.key.retired-TIME). A site worker
    signs with the key it started with: restart it afterwards."""
    import time

    from contracts.signing import KeyPair

    home = _home()
    new = KeyPair.generate()
    _send(m.RotateKey(public_key=new.public_key), name)
    path = home.key_file(name)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for old in (path, path.with_suffix(".pub")):
        if old.exists():
            old.rename(old.with_name(f"{old.name}.retired-{stamp}"))
    new.save(path)
    console.print(f"[green]ok[/green] key {name}: {new.key_id} ({path}); the old one is in {path.name}.retired-{stamp}")


@actor_app.command("suspend")
def actor_suspend(name: str, actor: As,
                  reason: Annotated[str, typer.Option("--reason", help="why: told to every service and kept")]) -> None:
    """Suspend actor NAME (operator): nothing it signs is accepted from now on; its open jobs are cancelled."""
    _send(m.SuspendActor(actor_id=name, reason=reason), actor)


DemoFolder = Annotated[Path | None, typer.Option("--demo-data", help="a small folder of cases (raw, or prepared: "
                                                                   "data/ and labels/) that models are checked on; "
                                                                   "pushed to the artefact store")]
DemoCases = Annotated[int, typer.Option("--demo-cases", help="how many cases the demo data holds")]


@benchmark_app.command("register")
def benchmark_register(spec_file: Path, actor: As, demo_data: DemoFolder = None, demo_cases: DemoCases = 0) -> None:
    """Register a benchmark from a JSON spec; images given by tag are pinned to their local image id. With
    --demo-data (and the spec's `check_site`), a model asking to join is first run on it at that site."""
    _send(m.RegisterBenchmark(benchmark=_with_demo(_spec(spec_file), demo_data, demo_cases)), actor)


def _with_demo(spec: m.BenchmarkSpec, folder: Path | None, cases: int) -> m.BenchmarkSpec:
    """The spec with the demo data in `folder` pushed and named (by its archive's sha256)."""
    if folder is None:
        return spec
    from assay.push import push_demo

    if not folder.is_dir() or cases < 1:
        say_error(f"--demo-data {folder} must be a folder and --demo-cases the number of cases it holds (at least 1)")
        raise typer.Exit(2)
    if spec.check_site is None:
        say_error(f"{spec.benchmark_id}: demo data needs `check_site` in the spec: your own site worker, which runs "
                  "each model on it")
        raise typer.Exit(2)
    with console.status(f"pushing the demo data in {folder}"):
        try:
            demo = asyncio.run(push_demo(_home(), folder, cases))
        except ValueError as exc:
            say_error(str(exc))
            raise typer.Exit(1) from None
    console.print(f"demo data {folder}: {demo.archive.sha256} ({demo.archive.size:,} bytes, "
                  f"{'prepared' if demo.prepared else 'raw: the preparator runs on it'}, {cases} cases)")
    return spec.model_copy(update={"demo_data": demo})


@benchmark_app.command("edit")
def benchmark_edit(spec_file: Path, actor: As, demo_data: DemoFolder = None, demo_cases: DemoCases = 0) -> None:
    """Change a benchmark from its edited JSON spec: shows each changed field first. In OPERATION only what does not
    define results may change (name, description, limits, sharing, demo data); the registry says which field it
    refuses. The demo data stays as it was unless --demo-data gives it again."""
    from rich.table import Table

    new = _spec(spec_file)
    old = m.BenchmarkSpec.model_validate(_send(m.GetBenchmark(benchmark_id=new.benchmark_id), None)["benchmark"])
    if demo_data is None and new.demo_data is None and new.check_site is not None:
        new = new.model_copy(update={"demo_data": old.demo_data})  # the spec file names no archive: keep the one
    new = _with_demo(new, demo_data, demo_cases)
    before, after = old.model_dump(mode="json"), new.model_dump(mode="json")
    diff = Table(title=f"benchmark {new.benchmark_id}: what changes")
    for column in ("field", "now", "after the edit"):
        diff.add_column(column, overflow="fold")
    for name in after:
        if before.get(name) != after[name]:
            diff.add_row(name, json.dumps(before.get(name)), json.dumps(after[name]))
    console.print(diff)
    _send(m.EditBenchmark(benchmark=new), actor)


def _archive(kind: m.EntityType):  # type: ignore[no-untyped-def]
    def archive(entity_id: str, actor: As,
                reason: Annotated[str, typer.Option("--reason", help="why, kept and shown on the board")]) -> None:
        _send(m.ArchiveEntity(kind=kind, entity_id=entity_id, reason=reason), actor)

    archive.__doc__ = (f"Archive a {kind.value} (its owner): never scheduled again; its open jobs are cancelled, its "
                       "results stay on the board, marked archived.")
    return archive


def _spec(spec_file: Path) -> m.BenchmarkSpec:
    """The benchmark in `spec_file`, its images given by tag pinned to their local image ids."""
    from pydantic import ValidationError

    from assay.push import pushed

    raw = json.loads(spec_file.read_text())
    for kind in ("preparator", "reference_model", "evaluator"):
        ref = raw.get(kind)
        if isinstance(ref, dict) and "digest" not in ref and "name" in ref:
            ref["digest"] = _image_id(ref["name"])
        if isinstance(ref, dict) and "archive" not in ref and isinstance(ref.get("digest"), str):
            if (archive := pushed(_home(), ref["digest"])) is not None:  # pushed from here: sites can fetch it
                ref["archive"] = archive.model_dump()
    try:
        return m.BenchmarkSpec.model_validate(raw)
    except ValidationError as exc:
        from contracts.envelope import describe

        say_error(f"{spec_file}: {describe(exc)}")
        raise typer.Exit(1) from exc


@benchmark_app.command("approve")
def benchmark_approve(benchmark_id: str, actor: As) -> None:
    """Approve a benchmark (operator): it moves to OPERATION."""
    _send(m.ApproveBenchmark(benchmark_id=benchmark_id), actor)


@benchmark_app.command("reject")
def benchmark_reject(benchmark_id: str, actor: As,
                     reason: Annotated[str, typer.Option("--reason", help="why, told to its owner")]) -> None:
    """Reject a benchmark (operator), with the reason; nothing may join it until it is approved."""
    _send(m.RejectBenchmark(benchmark_id=benchmark_id, reason=reason), actor)


@benchmark_app.command("show")
def benchmark_show(benchmark_id: str) -> None:
    """What the registry holds of a benchmark: its owner, its state and its whole spec (JSON)."""
    console.print_json(json.dumps(_send(m.GetBenchmark(benchmark_id=benchmark_id), None)))


Private = Annotated[bool, typer.Option("--private", help="encrypted: only sites you grant its key can open it")]


@model_app.command("push")
def model_push(image: Annotated[str, typer.Argument(help="local tag or image id")], private: Private = False) -> None:
    """Upload an image (`docker save`) to the artefact store under its id, for sites that do not have it."""
    import docker

    from assay.push import push

    digest = _image_id(image)
    with console.status(f"pushing {image} ({digest[:19]})"):
        try:
            archive = asyncio.run(push(_home(), docker.from_env(), digest, private))
        except ConnectionError as exc:
            say_error(str(exc))
            raise typer.Exit(1) from exc
    console.print(f"[green]ok[/green] pushed {image}: image {digest}, archive {archive.sha256} ({archive.size:,} "
                  "bytes); registering it names this archive, and a site that lacks the image fetches it")
    if private:
        console.print("it is encrypted: give each site its key with `assay model grant IMAGE --site SITE --as YOU`")


@model_app.command("grant")
def model_grant(image: Annotated[str, typer.Argument(help="local tag or image id of a private image")],
                site: Annotated[str, typer.Option(help="the site that may open it")], actor: As) -> None:
    """Give one site the key of a private image (sealed to the site's key); its jobs there are planned then."""
    from assay.push import grant

    try:
        command = grant(_home(), _image_id(image), site)
    except FileNotFoundError as exc:
        say_error(str(exc))
        raise typer.Exit(1) from exc
    _send(command, actor)


@model_app.command("register")
def model_register(model_id: str, image: Annotated[str, typer.Option(help="local tag or image id")], actor: As,
                   name: Annotated[str | None, typer.Option()] = None,
                   push: Annotated[bool, typer.Option("--push", help="push the image first")] = False,
                   private: Private = False,
                   version_of: Annotated[str | None, typer.Option(
                       help="the model this is a new version of (yours): the old one stays as it was")] = None) -> None:
    """Register a model by its image id (a tag is resolved and pinned), with its archive when it was pushed."""
    from assay.push import image_ref

    if push or private:
        model_push(image, private)
    ref = image_ref(_home(), _image_id(image), image)
    _send(m.RegisterModel(model_id=model_id, name=name or image, image=ref, previous=version_of), actor)


def _entity(model: str | None, dataset: str | None) -> tuple[m.EntityKind, str]:
    if (model is None) == (dataset is None):
        say_error("give exactly one of --model or --dataset")
        raise typer.Exit(2)
    return (m.EntityKind.MODEL, model) if model else (m.EntityKind.DATASET, dataset)  # type: ignore[return-value]


@site_app.command("add")
def site_add(site_id: str,
             policy: Annotated[Path | None, typer.Option(help="the site's policy (TOML)")] = None) -> None:
    """Make this installation run a worker for SITE_ID (its key: keys/SITE_ID.key)."""
    from assay.site_cli import policy_set

    home = _home()
    home.key(site_id)
    home.site_dir(site_id).mkdir(parents=True, exist_ok=True)
    (home.site_dir(site_id) / "site.json").write_text(json.dumps({"site_id": site_id}))
    if policy is not None:
        policy_set(site_id, policy)
    held = "" if home.policy_file(site_id).exists() else " (no policy given: every result is held for review)"
    console.print(f"[green]ok[/green] site {site_id}: its worker starts with `assay up`{held}")


@job_app.command("list")
def job_list(benchmark: Annotated[str | None, typer.Option()] = None,
             site: Annotated[str | None, typer.Option()] = None,
             state_: Annotated[m.JobState | None, typer.Option("--state")] = None,
             as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The jobs the scheduler planned, newest first, with what their sites reported."""
    from assay.tables import jobs_table

    reply = m.JobList.model_validate(_send(m.ListJobs(benchmark_id=benchmark, site_id=site, state=state_), None))
    if as_json:
        print(reply.model_dump_json(indent=2))
    else:
        console.print(jobs_table(reply))


@job_app.command("show")
def job_show(job_id: str) -> None:
    """One job: its state and reason, and what it asks of its site."""
    details = m.JobDetails.model_validate(_send(m.GetJob(job_id=job_id), None))
    status = details.status
    console.print(f"job {job_id}: [bold]{status.state.value}[/bold] since {status.updated_at:%Y-%m-%d %H:%M:%S}"
                  + (f": {status.reason}" if status.reason else ""), highlight=False, soft_wrap=True)
    console.print(f"its site took it {status.attempts} time(s)"
                  + (f"; it runs again as {status.retried_as}" if status.retried_as else ""), highlight=False)
    if status.state in (m.JobState.REFUSED, m.JobState.FAILED) and not status.retried_as:
        console.print(f"once the cause is fixed: assay job retry {status.job_id} --as ME (the operator, the owner "
                      f"of {status.benchmark_id} or site {status.site_id})", highlight=False, soft_wrap=True)
    console.print_json(details.job.model_dump_json())


@job_app.command("retry")
def job_retry(actor: As, job_id: Annotated[str | None, typer.Argument(help="the job (any unique start)")] = None,
              failed: Annotated[bool, typer.Option("--failed", help="every REFUSED or FAILED job you may retry")
                                ] = False,
              benchmark: Annotated[str | None, typer.Option(help="with --failed: of this benchmark")] = None,
              site: Annotated[str | None, typer.Option(help="with --failed: at this site")] = None) -> None:
    """Run again a REFUSED or FAILED job once its cause is fixed (an image loaded, data restored), as a new round of
    it; or, --failed, every such job you may (the operator: any; a benchmark's owner: its own; a site: its own)."""
    if (job_id is None) == (not failed):
        say_error("name one JOB_ID or give --failed (with --benchmark B or --site S to narrow it)")
        raise typer.Exit(2)
    _send(m.RetryJobs(job_id=job_id, failed=failed, benchmark_id=benchmark, site_id=site), actor)


@dead_letters_app.command("list")
def dead_letters_list(actor: As, consumer: Annotated[str | None, typer.Option(
                          help="one consumer's, e.g. site-hospital-a-jobs or leaderboard-results")] = None,
                      as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The messages each consumer gave up on, newest first: which, after how many deliveries, why."""
    from rich.table import Table

    from assay.tables import when

    listed = m.DeadLetterList.model_validate(_send(m.ListDeadLetters(consumer=consumer), actor))
    if as_json:
        print(listed.model_dump_json(indent=2))
        return
    table = Table(title=f"{len(listed.letters)} dead letter(s)" + (f" of {consumer}" if consumer else ""),
                  caption="assay dead-letters show ID --as ME: the whole letter; replay ID --as ME: its message "
                          "run again, once the cause is fixed")
    for column in ("letter", "when", "consumer", "message", "tries", "why", "replayed"):
        table.add_column(column, overflow="fold")
    for letter in listed.letters:
        last = letter.replays[-1] if letter.replays else None
        table.add_row(letter.letter_id[:8], when(letter.at), letter.consumer, letter.message_id[:20],
                      str(letter.deliveries), letter.error, f"{last.outcome.value} {when(last.at)}" if last else "")
    console.print(table)


@dead_letters_app.command("show")
def dead_letters_show(letter_id: Annotated[str, typer.Argument(help="the letter (any unique start)")],
                      actor: As) -> None:
    """One dead letter, whole."""
    found = m.DeadLetterList.model_validate(_send(m.ListDeadLetters(letter_id=letter_id, limit=2), actor)).letters
    if len(found) != 1:
        say_error(f"dead letter {letter_id}: " + ("more than one begins with it; give more of its id" if found else
                                                  "none has it; `assay dead-letters list` shows them"))
        raise typer.Exit(1)
    console.print_json(found[0].model_dump_json())


dead_letters_app.command("replay")(dead_letters_replay)


@dataset_app.command("prepare")
def dataset_prepare(dataset_id: str, benchmark: Annotated[str, typer.Option()], site: Annotated[str, typer.Option()],
                    raw: Annotated[Path, typer.Option(help="the raw data folder; it never leaves the site")]) -> None:
    """Run the benchmark's preparator on raw data, locally; show what registering would send."""
    import docker

    from site_worker.containers import ContainerError, DockerRunner
    from site_worker.datasets import prepare_dataset

    spec = m.BenchmarkSpec.model_validate(_send(m.GetBenchmark(benchmark_id=benchmark), None)["benchmark"])
    home = _home()
    os.umask(0o077)  # the prepared cases are readable by this user (and the sandbox's) only
    out = home.dataset_dir(site, dataset_id)
    if out.exists():
        say_error(f"{out} exists; choose another dataset id or remove it")
        raise typer.Exit(1)
    try:
        prepared = prepare_dataset(DockerRunner(docker.from_env()), spec.preparator.digest, raw.resolve(), out)
    except BaseException as exc:  # whatever stopped it, a half-prepared folder must not block the id
        shutil.rmtree(out, ignore_errors=True)
        if isinstance(exc, ContainerError):
            say_error(f"{exc}; nothing was kept, so `assay dataset prepare {dataset_id}` may simply run again")
            raise typer.Exit(1) from exc
        raise
    registration = m.RegisterDataset(dataset_id=dataset_id, benchmark_id=benchmark, name=dataset_id,
                                     content_hash=prepared.content_hash, case_count=prepared.case_count,
                                     statistics=prepared.statistics, preparator_digest=spec.preparator.digest)
    (out / "registration.json").write_text(registration.model_dump_json(indent=2))
    datasets_file = home.datasets_file(site)
    datasets = json.loads(datasets_file.read_text()) if datasets_file.exists() else {}
    datasets[dataset_id] = str(out)
    datasets_file.write_text(json.dumps(datasets, indent=2))
    console.print(f"[green]ok[/green] prepared {prepared.case_count} cases into {out}")
    console.print("registering will send only this metadata:")
    console.print_json(registration.model_dump_json())


@dataset_app.command("register")
def dataset_register(dataset_id: str, actor: As) -> None:
    """Register a prepared dataset: metadata and content hash only."""
    path = _home().dataset_dir(actor, dataset_id) / "registration.json"
    if not path.exists():
        say_error(f"{path} not found; run `assay dataset prepare {dataset_id} ... --site {actor}`")
        raise typer.Exit(1)
    _send(m.RegisterDataset.model_validate_json(path.read_text()), actor)


Asker = Annotated[str | None, typer.Option("--as", help="who asks (signs the query): the board shows what this "
                                                         "actor may see; without it, what is public",
                                           callback=speak_as)]


def _board(benchmark_id: str, actor: str | None) -> m.Leaderboard:
    return m.Leaderboard.model_validate(_send(m.ShowLeaderboard(benchmark_id=benchmark_id), actor))


@leaderboard_app.command("show")
def leaderboard_show(benchmark_id: str, actor: Asker = None,
                     as_json: Annotated[bool, typer.Option("--json", help="the board as JSON")] = False,
                     as_csv: Annotated[bool, typer.Option("--csv", help="one line per model, site and metric")] = False,
                     ) -> None:
    """The leaderboard: pooled values with 95% intervals, shared ranks, rank probabilities, per-site values."""
    from assay.tables import leaderboard_csv, leaderboard_table

    board = _board(benchmark_id, actor)
    if as_json:
        print(board.model_dump_json(indent=2))
    elif as_csv:
        print(leaderboard_csv(board), end="")
    else:
        console.print(leaderboard_table(board))


@leaderboard_app.command("plot")
def leaderboard_plot(benchmark_id: str, out: Annotated[Path, typer.Option("-o", "--out", help="the PNG to write")],
                     actor: Asker = None) -> None:
    """A forest plot of each model's pooled value and interval with its per-site values, and a rank-probability heat
    map, in one PNG."""
    from assay.board_plot import plot_board

    try:
        written = plot_board(_board(benchmark_id, actor), out)
    except ValueError as exc:
        say_error(str(exc))
        raise typer.Exit(1) from exc
    console.print(f"[green]ok[/green] wrote {written}: the forest plot of the pooled values and the rank heat map")


@app.command("verify")
def verify_board(benchmark_id: str, actor: Annotated[str, typer.Option(
                     "--as", help="an auditor, or the benchmark's owner: who asks the service for the whole board",
                     callback=speak_as)],
                 service_keys: Annotated[Path | None, typer.Option(
                     help="JSON {service: public key}; by default the keys of this installation")] = None) -> None:
    """Rebuild the board from the streams alone (signed results, keys, approvals), check every signature and binding
    again, recompute every figure and name each difference from the leaderboard service's board."""
    from assay.verify import verified

    home = _home()
    keys = (json.loads(service_keys.read_text()) if service_keys is not None
            else {service: home.public_key(service) for service in ("registry", "approval", "scheduling",
                                                                       "leaderboard")})
    raise typer.Exit(asyncio.run(verified(home, benchmark_id, actor, keys, console)))


@app.command()
def provision(nats_url: Annotated[str, typer.Option(envvar="ASSAY_NATS_URL")],
              replicas: Annotated[int, typer.Option(
                  min=1, max=5, help="servers that keep each stream and bucket: 1 on one server, 3 on a cluster")] = 1,
              ) -> None:
    """Declare the JetStream streams on a NATS server or cluster (compose runs this once before the services)."""
    from assay.client import connected
    from contracts.streams import STREAMS, ensure_streams
    from service_kit.connection import where

    async def run() -> None:
        async with connected(nats_url, "check the address, the user and the password") as (nc, _):
            await ensure_streams(nc.jetstream(), replicas)

    asyncio.run(run())
    console.print(f"[green]ok[/green] streams {', '.join(str(c.name) for c in STREAMS)} on {where(nats_url)}, "
                  f"each on {replicas} server{'s' if replicas > 1 else ''}")


@app.command()
def alive(file: Annotated[Path, typer.Argument(help="the ALIVE_FILE a service or site worker writes")],
          within: Annotated[float, typer.Option(help="seconds: older than this is unwell")] = 30.0) -> None:
    """A container's health check: 0 while the process writing FILE wrote it within the last WITHIN seconds (its bus
    and its database or Docker engine answered), 1 and why otherwise."""
    from service_kit.alive import unwell

    if (why := unwell(file, within)) is not None:
        say_error(why)
        raise typer.Exit(1)
    console.print(f"[green]ok[/green] {file} written within {within:.0f} s")


@app.command()
def up(cluster: Annotated[int, typer.Option(
           help="nats-servers: 1, or a cluster of 3 or more on loopback (each stream kept on three of them)")] = 1,
       replicas: Annotated[int, typer.Option(
           help="processes of each service, sharing its durable consumers (more than 1 needs --postgres)")] = 1,
       postgres: Annotated[str, typer.Option(
           help="a PostgreSQL server (postgresql+asyncpg://user:password@host:port) for the services' databases "
                "(assay_<service>, made if absent); by default a SQLite file each")] = "",
       leaf_port: Annotated[int, typer.Option(
           help="where sites' own nats-servers connect as leaf nodes, on loopback (server N of a cluster: the port "
                "+ N - 1); by default nowhere")] = 0) -> None:
    """Start the platform on this machine (nats-server, services, site workers); Ctrl-C, SIGTERM or SIGHUP stop it."""
    from assay.platform import Platform, stopping_signals
    from service_kit.connection import where

    try:
        platform = Platform(_home(), on_step=lambda s: console.print(f"[dim]·[/dim] {s}"), cluster=cluster,
                            replicas=replicas, database=postgres, leaf_port=leaf_port)
    except ValueError as exc:
        say_error(str(exc))
        raise typer.Exit(2) from None
    try:
        with stopping_signals():  # from the first moment: a signal while it starts stops it cleanly too
            platform.start()
            console.print(f"[green]Assay is up[/green] on {where(platform.nats_url)}; logs in {_home().logs}. "
                          "Ctrl-C stops it.")
            platform.wait()
    except KeyboardInterrupt:
        console.print("stopping...")
    finally:
        platform.stop()  # whenever the signal came: stopping twice is stopping once


@app.command()
def demo(keep: Annotated[bool, typer.Option(help="keep the platform running afterwards")] = False) -> None:
    """Run a whole federated benchmark on this machine, every role through the same commands."""
    from assay.demo.run import run_demo

    raise typer.Exit(run_demo(_home(), console, keep=keep))


for sub, kind in ((benchmark_app, m.EntityType.BENCHMARK), (model_app, m.EntityType.MODEL),
                  (dataset_app, m.EntityType.DATASET)):
    sub.command("archive")(_archive(kind))


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        app()
    except (ValueError, FileNotFoundError, ConnectionError, RuntimeError) as exc:  # bad input or setup: say what
        say_error(str(exc))
        raise SystemExit(1) from None
