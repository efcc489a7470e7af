"""Who may connect to the bus: the operator's roster of NATS users. Each member is a name, a role and an nkey (an
Ed25519 public key; its holder made the seed and keeps it). The `users` file nats-server includes is rendered from the
roster, and the server reloads it when the operator asks through the system account: enrolling or revoking needs no
restart and no password, and a revoked member's connections are closed."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nkeys

from assay.access import ROLES, render_users, role_permissions
from contracts.subjects import token

SYSTEM_ACCOUNT = "SYS"
SYSTEM_KEY = "nats-system"  # HOME/keys/nats-system.nk: the operator's system user, which asks servers to reload


def new_seed(path: Path) -> str:
    """Make a NATS user nkey: its seed in `path` (this user's alone, never overwritten); its public key returned."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
        file.write(seed + b"\n")
    return public_of(path)


def public_of(seed_file: Path) -> str:
    """The public nkey (U...) of the user seed in `seed_file`."""
    try:
        seed = bytearray(seed_file.read_bytes().strip())
        return str(nkeys.from_seed(seed).public_key.decode())
    except (nkeys.NkeysError, ValueError, IndexError) as exc:
        raise ValueError(f"{seed_file} is not a NATS user nkey seed ({type(exc).__name__})") from None


def checked_nkey(value: str) -> str:
    """`value` if it is a user's public nkey; a clear error otherwise (a seed sent by mistake is named as such)."""
    value = value.strip()
    if value.startswith("SU"):
        raise ValueError("that is a seed (SU...), the private half: keep it, and send only the public key (U...) "
                         "that `assay bus key` printed")
    if not _user_public_key(value):
        raise ValueError(f"{value[:12]!r}... is not a NATS user public key (56 characters starting with U)")
    return value


def _user_public_key(value: str) -> bool:
    """The nkey encoding: base32 of a prefix byte (U), the 32-byte key and a CRC-16 of both (nkeys.py decodes seeds
    only, not public keys)."""
    try:
        raw = base64.b32decode(value.encode())
    except (ValueError, binascii.Error):
        return False
    return (len(value) == 56 and len(raw) == 35 and raw[0] == nkeys.PREFIX_BYTE_USER
            and nkeys.crc16(raw[:-2]) == int.from_bytes(raw[-2:], "little"))


def inbox_of_nkey(nkey: str) -> str:
    """Where a member's replies come: an inbox only it may read."""
    return f"_INBOX.{nkey}"


@dataclass(frozen=True)
class Member:
    name: str
    role: str
    nkey: str
    site: str = ""  # a site worker's site, where its name is not the site id (one key per GPU host of a site)

    def user(self) -> dict[str, object]:
        return {"nkey": self.nkey,
                "permissions": role_permissions(self.role, self.site or self.name, inbox_of_nkey(self.nkey))}


@dataclass
class Roster:
    """The roster in `folder` (roster.json, and the users.conf and system.conf nats-server includes)."""

    folder: Path
    members: list[Member] = field(default_factory=list)
    central: str = ""  # the address members connect to, for their bundles
    system: str = ""  # the public nkey of the system user that asks the server to reload
    local_users: Callable[[], list[dict[str, object]]] = lambda: []  # `assay up`'s own processes (passwords)

    @property
    def file(self) -> Path:
        return self.folder / "roster.json"

    @classmethod
    def load(cls, folder: Path) -> Roster:
        path = folder / "roster.json"
        if not path.exists():
            raise FileNotFoundError(f"no roster in {folder}; make one with `assay bus init {folder}` (a deployment) "
                                    "or start `assay up` once")
        data = json.loads(path.read_text())
        roster = cls(folder, [Member(**m) for m in data["members"]], data.get("central", ""), data.get("system", ""))
        local = folder / "local-users.json"
        if local.exists():
            roster.local_users = lambda: list(json.loads(local.read_text()))
        return roster

    def find(self, name: str) -> Member | None:
        return next((m for m in self.members if m.name == name), None)

    def enrol(self, name: str, role: str, nkey: str, site: str | None = None) -> Member:
        """Add a member; bad input changes nothing and says what is wrong."""
        token(name, "name")
        if site is not None and role != "site":
            raise ValueError(f"--site names the site of a worker (role site), not of a {role}")
        if role not in ROLES:
            raise ValueError(f"no NATS role {role!r}; the roles are {', '.join(ROLES)}")
        nkey = checked_nkey(nkey)
        if (known := self.find(name)) is not None:
            raise ValueError(f"{name} is enrolled already (role {known.role}); `assay bus revoke {name}` first to "
                             "replace its key")
        if any(m.nkey == nkey for m in self.members) or nkey == self.system:
            raise ValueError("that public key is enrolled already, under another name: every member has its own key")
        member = Member(name, role, nkey, token(site, "site id") if site and site != name else "")
        member.user()  # a role that needs a known name (a service) says so now
        self.members.append(member)
        return member

    def revoke(self, name: str) -> Member:
        if (member := self.find(name)) is None:
            raise ValueError(f"{name} is not enrolled; `assay bus users` lists who is")
        self.members.remove(member)
        return member

    def save(self) -> None:
        """roster.json, users.conf and system.conf, each replaced whole (a reader never sees one half written)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        users = [*self.local_users(), *(m.user() for m in self.members)]
        data = {"central": self.central, "system": self.system, "members": [asdict(m) for m in self.members]}
        for name, text in (("roster.json", json.dumps(data, indent=2) + "\n"), ("users.conf", render_users(users)),
                           ("system.conf", render_users([{"nkey": self.system}] if self.system else []))):
            _replace(self.folder / name, text)

    def snapshot(self) -> dict[str, str]:
        """The files as they are now, to put back when the server refuses what replaced them."""
        return {n: (self.folder / n).read_text() for n in ("roster.json", "users.conf", "system.conf")
                if (self.folder / n).exists()}

    def restore(self, files: dict[str, str]) -> None:
        for name, text in files.items():
            _replace(self.folder / name, text)


def _replace(path: Path, text: str) -> None:
    """Replace `path` whole with `text`, readable by this user only (`assay up`'s users.conf holds passwords)."""
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
        file.write(text)
    partial.replace(path)


class ReloadFailed(Exception):
    """A server did not take the new configuration; the message says which and why."""


async def reload_servers(url: str, system_seed: Path, tls: dict[str, Any] | None = None,
                         wait_s: float = 1.0) -> list[str]:
    """Ask every server of the bus (one, or a cluster's) to reload its configuration, as the system user; the names of
    those that did. A server that refuses it (a file it cannot parse) raises ReloadFailed with its reason."""
    import nats

    from service_kit.connection import servers

    nc = await nats.connect(servers(url), nkeys_seed=str(system_seed), connect_timeout=5, max_reconnect_attempts=1,
                            allow_reconnect=False, **(tls or {}))
    try:
        inbox = nc.new_inbox()
        replies: asyncio.Queue[bytes] = asyncio.Queue()

        async def note(msg: Any) -> None:
            replies.put_nowait(msg.data)

        sub = await nc.subscribe(inbox, cb=note)
        await nc.publish("$SYS.REQ.SERVER.PING", b"", reply=inbox)
        await nc.flush()
        await asyncio.sleep(wait_s)  # every server of a cluster answers the ping; each is told to reload
        await sub.unsubscribe()
        servers = []
        while not replies.empty():
            servers.append(json.loads(replies.get_nowait())["server"])
        if not servers:
            raise ReloadFailed(f"no server answered the system account at {url}")
        reloaded = []
        for server in servers:
            answer = json.loads((await nc.request(f"$SYS.REQ.SERVER.{server['id']}.RELOAD", b"", timeout=10)).data)
            if error := answer.get("error"):
                raise ReloadFailed(f"{server.get('name', server['id'])} refused the new configuration: "
                                   f"{error.get('description', error)}".strip())
            reloaded.append(str(server.get("name", server["id"])))
        return reloaded
    finally:
        await nc.close()
