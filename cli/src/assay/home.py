"""The state folder of one Assay installation: keys, service databases, the bus's storage, sites and logs."""

from __future__ import annotations

import json
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
        """The bus as the CLI's user (`nats`), or as another the platform made (`auditor`: read only)."""
        if not self.platform_file.exists():
            raise ConnectionError(f"no platform is running for {self.root}; start one with: assay up")
        state = json.loads(self.platform_file.read_text())
        return state.get(f"{user}_url", state["nats_url"])
