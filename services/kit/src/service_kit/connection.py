"""How every long-running process holds its NATS connection: it never gives up (the bus may be away for a while),
and it says in its log, each time, why it cannot reach the server, never with the credentials in the URL."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("service_kit.connection")


def servers(url: str) -> list[str]:
    """The servers of `url`: one, or a cluster's seed list written comma-separated (`nats://a:4222,nats://b:4222`),
    as nats-py and faststream take it (a list; each keeps its own credentials). A client that knows several servers
    goes on to another when the one it uses dies."""
    return [server.strip() for server in url.split(",") if server.strip()]


def where(url: str) -> str:
    """`url` without its users and passwords (every server of a seed list, comma-separated)."""
    return ",".join(f"{parts.scheme}://{parts.hostname}:{parts.port}" for parts in map(urlsplit, servers(url)))


def inbox_of(url: str, creds: Path | None = None) -> str:
    """Where the replies to a connection come, an inbox the server lets only this user read: `_INBOX.<public nkey>`
    for a user of the operator's roster (an nkey seed), `_INBOX.<user>` when the URL names a user, else nats-py's."""
    if creds is not None and creds.is_file() and (seed := creds.read_bytes().strip()).startswith(b"SU"):
        import nkeys

        try:
            return f"_INBOX.{nkeys.from_seed(bytearray(seed)).public_key.decode()}"
        except (nkeys.NkeysError, ValueError, IndexError):
            pass  # not a seed after all: the connection says why when it is refused
    user = urlsplit(url.split(",")[0]).username
    return f"_INBOX.{user}" if user else "_INBOX"


def secured(url: str, creds: Path | None = None, ca: Path | None = None) -> dict[str, Any]:
    """nats-py options for the connection's own credentials and TLS: a NATS credentials file (a user JWT and its seed,
    as `nsc` writes it, or an nkey seed alone), and TLS for a `tls://` URL or a CA bundle, verifying the server against
    that bundle (else the system's). Credentials in the URL (`nats://user:password@host`) need nothing here."""
    options: dict[str, Any] = {}
    if creds is not None:
        if not creds.is_file():
            raise FileNotFoundError(f"the NATS credentials file {creds} does not exist")
        jwt = "-----BEGIN NATS USER JWT-----" in creds.read_text(errors="replace")
        options["user_credentials" if jwt else "nkeys_seed"] = str(creds)  # a .creds file, or an nkey seed alone
    if ca is not None or url.startswith("tls://"):
        if ca is not None and not ca.is_file():
            raise FileNotFoundError(f"the CA bundle {ca} does not exist")
        options["tls"] = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    return options


def connection_options(owner: str, url: str, creds: Path | None = None, ca: Path | None = None) -> dict[str, Any]:
    """nats-py options for `owner`'s broker: endless reconnects, each failure and recovery logged; its own
    credentials and TLS (`secured`)."""

    async def failed(exc: Exception) -> None:
        log.error("%s cannot reach NATS at %s: %s: %s; trying again", owner, where(url), type(exc).__name__, exc)

    closing = False  # nats-py calls disconnected_cb on close() too, just before closed_cb: no warning for that

    async def lost() -> None:
        def warn() -> None:
            if not closing:
                log.warning("%s lost its connection to NATS at %s; reconnecting", owner, where(url))
        asyncio.get_running_loop().call_soon(warn)

    async def closed() -> None:
        nonlocal closing
        closing = True

    async def back() -> None:
        log.info("%s is connected to NATS at %s again", owner, where(url))

    options = secured(url, creds, ca)
    if (context := options.pop("tls", None)) is not None:  # faststream takes TLS as a security object
        from faststream.security import BaseSecurity

        options["security"] = BaseSecurity(ssl_context=context)
    return {"error_cb": failed, "disconnected_cb": lost, "closed_cb": closed, "reconnected_cb": back,
            "max_reconnect_attempts": -1, "reconnect_time_wait": 2, "connect_timeout": 5,
            "inbox_prefix": inbox_of(url, creds),
            **options}
