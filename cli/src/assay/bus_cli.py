"""`assay bus`: who may connect to the bus, and as what. A hospital, a vendor or a committee makes its own NATS key
and sends the operator only its public half (`assay bus key`); the operator enrols it with a role (`assay bus enrol`),
which the running server takes at once, and hands back the bundle it prints; `assay bus join` sets the CLI up from
it. `assay bus revoke` cuts a member off: its connections are closed and it is refused from then on."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from assay.roster import SYSTEM_KEY

bus_app = typer.Typer(help="NATS users: make your key, enrol and revoke members (operator), join with a bundle.",
                      no_args_is_help=True)
console = Console()
BUNDLE_VERSION = 1

Config = Annotated[Path | None, typer.Option("--config", help="the folder of roster.json and the users.conf "
                                                             "nats-server includes (default: HOME/nats, `assay up`'s)")]


def _fail(message: str) -> typer.Exit:
    from assay.cli import say_error

    say_error(message)
    return typer.Exit(1)


def _folder(config: Path | None) -> Path:
    from assay.cli import _home

    return (config or _home().root / "nats").resolve()


def _roster(config: Path | None) -> Any:
    """The roster in `config` (default HOME/nats), or the command ends with why it cannot be read."""
    from assay.roster import Roster

    try:
        return Roster.load(_folder(config))
    except (OSError, ValueError) as exc:
        raise _fail(str(exc)) from None


def seed_file(name: str) -> Path:
    from assay.cli import _home

    return _home().keys / f"{name}.nk"


@bus_app.command("key")
def key(name: Annotated[str, typer.Argument(help="who you are: a site id, or your actor name")]) -> None:
    """Make NAME's NATS key: the seed stays here (HOME/keys/NAME.nk, mode 0600); send the operator the public key."""
    from assay.roster import new_seed
    from contracts.subjects import token

    path = seed_file(token(name, "name"))
    if path.exists():
        raise _fail(f"{path} exists; keys are never overwritten")
    public = new_seed(path)
    console.print(f"[green]ok[/green] NATS key {name} ({path}); send the operator only this public key:")
    print(public)


def _reload(url: str, system_seed: Path) -> list[str]:
    import os

    from assay.home import BUS_CA
    from assay.roster import reload_servers
    from service_kit.connection import secured, where

    ca = os.environ.get(BUS_CA)
    bare = where(url)  # as the system user, whatever user the URL names
    return asyncio.run(reload_servers(bare, system_seed, secured(bare, None, Path(ca) if ca else None)))


def _apply(roster: Any, before: dict[str, str], done: str) -> None:
    """Save the roster and have the running server take it; a server that refuses it gets the old files back."""
    from assay.cli import _home
    from assay.roster import ReloadFailed

    roster.save()
    system_seed = seed_file(SYSTEM_KEY)
    try:
        url = _home().nats_url()
    except ConnectionError:
        url = ""
    if not url or not system_seed.exists():
        why = "no bus to reach" if not url else f"no system key {system_seed}"
        console.print(f"[green]ok[/green] {done}; the server takes it when it starts ({why}: `assay bus reload` "
                      "once it runs)")
        return
    try:
        servers = _reload(url, system_seed)
    except ReloadFailed as exc:
        roster.restore(before)
        raise _fail(f"{exc}; nothing was changed") from None
    except Exception as exc:  # noqa: BLE001 - nats-py fails a connect in many ways; the change is kept either way
        console.print(f"[yellow]saved[/yellow] {done}, but the server was not told ({type(exc).__name__}: {exc}); "
                      "run `assay bus reload` once it can be reached")
        return
    took = "the server took it" if len(servers) == 1 else f"{len(servers)} servers took it ({', '.join(servers)})"
    console.print(f"[green]ok[/green] {done}; {took} at once, with no restart")


@bus_app.command("init")
def init(config: Annotated[Path, typer.Argument(help="the folder nats-server includes its users from "
                                                     "(compose/nats)")],
         secrets: Annotated[Path, typer.Option(help="where the services' and the provisioner's seeds go "
                                                    "(compose/secrets), never in the server's folder")],
         central: Annotated[str, typer.Option(help="the address members connect to, for their bundles "
                                                   "(tls://central.example.org:4222)")]) -> None:
    """A deployment's roster (operator, once): the system user (its seed in HOME/keys), the provisioner and the four
    services, each with a seed of its own in SECRETS; then enrol sites, people and integrations one by one."""
    from assay.roster import Roster, new_seed, public_of
    from contracts.catalog import SERVICES

    folder = config.resolve()
    if (folder / "roster.json").exists():
        raise _fail(f"{folder / 'roster.json'} exists; `assay bus users --config {config}` shows it")
    system_seed = seed_file(SYSTEM_KEY)
    roster = Roster(folder, central=central)
    roster.system = public_of(system_seed) if system_seed.exists() else new_seed(system_seed)
    for name, role in (("provision", "provision"), *((service, "service") for service in SERVICES)):
        path = secrets / f"nats-{name}.nk"
        roster.enrol(name, role, public_of(path) if path.exists() else new_seed(path))
    roster.save()
    console.print(f"[green]ok[/green] roster in {folder}: the provisioner and {', '.join(SERVICES)}, their seeds in "
                  f"{secrets} (nats-NAME.nk); the system key {system_seed}")


@bus_app.command("enrol")
def enrol(name: Annotated[str, typer.Argument(help="the member: a site id (role site), an actor, an integration")],
          role: Annotated[str, typer.Option(help="site (a worker), data_owner, operator, benchmark_owner, model_owner, "
                                                 "integration, auditor")],
          nkey: Annotated[str, typer.Option(help="the public key (U...) the member's `assay bus key` printed")],
          config: Config = None,
          site: Annotated[str | None, typer.Option(help="a worker's site, where NAME is not the site id (one key "
                                                        "per GPU host: hospital-a-gpu2 --site hospital-a)")] = None,
          central: Annotated[str | None, typer.Option(help="the address in the bundle (default: the roster's)")] = None,
          scheduler_key: Annotated[Path | None, typer.Option(help="the scheduler's public key file, for a site's "
                                                                  "bundle (default: HOME/keys/scheduling.pub)")] = None,
          ca: Annotated[Path | None, typer.Option(help="the CA bundle members check the server against, put in the "
                                                       "bundle")] = None,
          out: Annotated[Path | None, typer.Option(help="write the bundle here, not to the screen")] = None) -> None:
    """Let NAME connect as ROLE (operator): the running server takes it at once. Prints the bundle to hand over: where
    to connect, the scheduler's public key (a site runs only jobs it signed), the CA; never a secret."""
    from assay.cli import _home
    roster = _roster(config)
    try:
        before = roster.snapshot()
        member = roster.enrol(name, role, nkey, site)
        bundle: dict[str, Any] = {"assay_bundle": BUNDLE_VERSION, "name": member.name, "role": member.role,
                                  "nkey": member.nkey, "nats_url": central or roster.central or _local_address()}
        if member.site:
            bundle["site"] = member.site
        if role == "site":
            bundle["scheduler_public_key"] = (scheduler_key.read_text().strip() if scheduler_key
                                              else _home().public_key("scheduling"))
        if ca is not None:
            bundle["ca"] = ca.read_text()
    except (OSError, ValueError) as exc:
        raise _fail(str(exc)) from None
    _apply(roster, before, f"{name} enrolled as {role}")
    text = json.dumps(bundle, indent=2)
    if out is not None:
        out.write_text(text + "\n")
        console.print(f"the bundle for {name} is in {out}: it holds no secret")
    else:
        print(text)


def _local_address() -> str:
    from assay.cli import _home
    from service_kit.connection import where

    return where(_home().nats_url())


@bus_app.command("revoke")
def revoke(name: str, config: Config = None) -> None:
    """Cut NAME off (operator): the server closes its connections and refuses it from now on."""
    roster = _roster(config)
    try:
        before = roster.snapshot()
        member = roster.revoke(name)
    except (OSError, ValueError) as exc:
        raise _fail(str(exc)) from None
    _apply(roster, before, f"{name} ({member.role}) revoked: its connections are closed")


@bus_app.command("reload")
def reload(config: Config = None) -> None:
    """Have the running server(s) read the roster again (operator), after a change made while it was down."""
    roster = _roster(config)
    _apply(roster, roster.snapshot(), "the roster is read again")


@bus_app.command("users")
def users(config: Config = None) -> None:
    """Who may connect, and as what (operator)."""
    roster = _roster(config)
    table = Table("name", "role", "site", "public key", title=f"NATS users in {roster.folder}",
                  caption="assay bus revoke NAME: cut one off")
    for member in sorted(roster.members, key=lambda m: (m.role, m.name)):
        table.add_row(member.name, member.role, member.site or (member.name if member.role == "site" else ""),
                      member.nkey)
    console.print(table)


@bus_app.command("join")
def join(bundle_file: Annotated[Path, typer.Argument(help="the bundle the operator's `assay bus enrol` printed")],
         name: Annotated[str | None, typer.Option(help="whose key (default: the bundle's name)")] = None) -> None:
    """Use the bundle: this installation's commands connect where it says, as your key (HOME/profile.toml). A site's
    bundle also gives what its worker's environment needs."""
    from assay.cli import _home
    from assay.roster import public_of
    from contracts.subjects import DOMAIN

    home = _home()
    try:
        bundle = json.loads(bundle_file.read_text())
        if bundle.get("assay_bundle") != BUNDLE_VERSION:
            raise ValueError(f"{bundle_file} is not an Assay bundle (`assay bus enrol` prints one)")
        who = name or str(bundle["name"])
        seed = seed_file(who)
        if not seed.exists():
            raise ValueError(f"no NATS key {seed}; the bundle is for the key `assay bus key {who}` made")
        if public_of(seed) != bundle["nkey"]:
            raise ValueError(f"the bundle enrols the key {bundle['nkey'][:12]}..., not yours ({seed}): ask the "
                             "operator to enrol the public key `assay bus key` printed")
    except (OSError, ValueError, KeyError) as exc:
        raise _fail(f"{exc}" if not isinstance(exc, KeyError) else f"{bundle_file} lacks {exc}") from None
    lines = [f'nats_url = "{bundle["nats_url"]}"', f'creds = "{seed}"']
    if bundle.get("ca"):
        ca_file = home.keys / "central-ca.pem"
        ca_file.write_text(bundle["ca"])
        lines.append(f'ca = "{ca_file}"')
    profile = home.root / "profile.toml"
    profile.write_text("\n".join(lines) + "\n")
    console.print(f"[green]ok[/green] {profile}: this installation's commands connect to {bundle['nats_url']} as "
                  f"{who} ({bundle['role']})")
    if bundle["role"] == "site":
        console.print("its worker's environment (compose/site.env, or `python -m assay.serve site`):")
        print(f"ASSAY_SITE_SITE_ID={bundle.get('site', who)}\nASSAY_SITE_NATS_URL={bundle['nats_url']}\n"
              f"ASSAY_SITE_NATS_CREDS={seed}\n"
              f"ASSAY_SITE_SCHEDULER_PUBLIC_KEY={bundle['scheduler_public_key']}"
              + (f"\nASSAY_SITE_NATS_CA={home.keys / 'central-ca.pem'}" if bundle.get("ca") else ""))
        console.print(f"[dim]behind a nats-server of the hospital's own (a leaf node of the centre's): its URL as "
                      f"ASSAY_SITE_NATS_URL, and ASSAY_SITE_NATS_DOMAIN={DOMAIN} (README, leaf nodes)[/dim]")
