"""The state folder of one Assay installation: keys, service databases, the bus's storage, sites and logs."""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from contracts.signing import KeyPair
from contracts.subjects import token


@dataclass(frozen=True)
class Home:
    root: Path

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def platform_file(self) -> Path:
        return self.root / "platform.json"

    def key_file(self, name: str) -> Path:
        return self.keys / f"{token(name, 'key name')}.key"

    def key(self, name: str) -> KeyPair:
        path = self.key_file(name)
        if not path.exists():
            raise FileNotFoundError(f"no key named {name!r} in {self.keys}; create it with: assay keys new {name}")
        return KeyPair.load(path)

    def public_key(self, name: str) -> str:
        path = self.key_file(name).with_suffix(".pub")
        if not path.exists():
            raise FileNotFoundError(f"no public key {path}; create it with: assay keys new {name}")
        return path.read_text().strip()

    def site_dir(self, site_id: str) -> Path:
        return self.root / "sites" / token(site_id, "site id")

    def dataset_dir(self, site_id: str, dataset_id: str) -> Path:
        return self.site_dir(site_id) / "datasets" / token(dataset_id, "dataset id")

    def sites(self) -> list[str]:
        return sorted(p.parent.name for p in (self.root / "sites").glob("*/site.json"))

    def policy_file(self, site_id: str) -> Path:
        """The site's policy (`assay site policy set`); where there is none, the worker holds every result."""
        return self.site_dir(site_id) / "policy.toml"

    def datasets_file(self, site_id: str) -> Path:
        return self.site_dir(site_id) / "datasets.json"

    def nats_url(self, user: str = "nats") -> str:
        """The bus as the CLI's user (`nats`), or as another the platform made (`auditor`: read only); a deployment's
        (`--nats`, ASSAY_NATS_URL or a profile) as the credentials given with it, whoever asks."""
        if target := os.environ.get(BUS_URL):
            return target
        if not self.platform_file.exists():
            raise ConnectionError(f"no platform is running for {self.root}; start one with: assay up")
        state = json.loads(self.platform_file.read_text())
        return state.get(f"{user}_url", state["nats_url"])


BUS_URL, BUS_CREDS, BUS_CA = "ASSAY_NATS_URL", "ASSAY_NATS_CREDS", "ASSAY_NATS_CA"
PROFILE_KEYS = {"nats_url": BUS_URL, "creds": BUS_CREDS, "ca": BUS_CA}


def use_bus(home: Home, url: str | None, creds: Path | None, ca: Path | None, profile: Path | None) -> None:
    """Which bus this command (and what it starts) talks to, and as whom: the flags, else the environment (typer
    reads both), else a profile file (`profile`, or `HOME/profile.toml` when it exists), else the `assay up` of
    `home`. What is chosen goes into this process's environment, where every connection it opens reads it."""
    chosen = {BUS_URL: url, BUS_CREDS: str(creds) if creds else None, BUS_CA: str(ca) if ca else None}
    found = profile or (home.root / "profile.toml")
    if profile is not None or found.exists():
        try:
            written = tomllib.loads(found.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"the profile {found} is not TOML: {exc}") from None
        if unknown := sorted(set(written) - set(PROFILE_KEYS)):
            raise ValueError(f"the profile {found} has {unknown}; it may set {sorted(PROFILE_KEYS)} only")
        for key, variable in PROFILE_KEYS.items():
            if chosen[variable] is None and key in written:
                value = str(written[key])
                chosen[variable] = str(Path(value).expanduser()) if key != "nats_url" else value
    for variable, value in chosen.items():
        if value is not None:
            os.environ[variable] = value


_installation: list[Home] = []  # the state folder this command runs on (the CLI's main callback sets it)


def running_on(home: Home) -> None:
    _installation[:] = [home]


def speak_as(actor: str | None) -> str | None:
    """`--as ACTOR`, on this installation's own `assay up`: a command ACTOR signs also connects as ACTOR's own NATS
    user when it has one here (`assay bus key ACTOR`, enrolled by the operator), with that role's rights alone. A bus
    chosen by flag, environment or profile is left as it is."""
    if actor and _installation and not os.environ.get(BUS_URL) and not os.environ.get(BUS_CREDS):
        home = _installation[0]
        seed = home.keys / f"{token(actor, 'actor')}.nk"
        if seed.is_file() and home.platform_file.exists():
            from service_kit.connection import where

            os.environ[BUS_URL], os.environ[BUS_CREDS] = where(home.nats_url()), str(seed)
    return actor


def bus_creds() -> Path | None:
    """The NATS credentials file this command was given, if any (see `use_bus`)."""
    creds = os.environ.get(BUS_CREDS)
    return Path(creds) if creds else None


def bus_security(url: str) -> dict[str, object]:
    """nats-py options for the credentials and TLS this command was given (see `use_bus`)."""
    from service_kit.connection import secured

    creds, ca = os.environ.get(BUS_CREDS), os.environ.get(BUS_CA)
    return secured(url, Path(creds) if creds else None, Path(ca) if ca else None)
