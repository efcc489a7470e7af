"""Sends signed commands and queries over request/reply, retrying while the services catch up."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from contracts.catalog import REQUEST_SUBJECTS
from contracts.envelope import Envelope, Payload
from contracts.signing import KeyPair
from assay.home import BUS_URL, bus_creds, bus_security
from service_kit.connection import inbox_of, servers, where


@asynccontextmanager
async def connected(nats_url: str, advice: str | None = None) -> AsyncIterator[tuple[NATS, list[str]]]:
    """The CLI's connection (replies to its own user's inbox), and what the server said went wrong on it; a failed
    connect is a ConnectionError naming the address (never the password) and the server's last reason, at once."""
    errors: list[str] = []
    advice = advice or ("check --nats, --creds and --ca (or ASSAY_NATS_URL, _CREDS, _CA, or the profile)"
                        if os.environ.get(BUS_URL) else "is `assay up` running?")

    hopeless = asyncio.Event()  # trying again cannot help: the server's certificate, or who we are, is refused

    async def note(exc: Exception) -> None:
        errors.append(str(exc) or type(exc).__name__)
        if isinstance(exc, ssl.SSLError) or "authorization" in str(exc).lower():
            hopeless.set()

    connecting = asyncio.ensure_future(nats.connect(
        servers(nats_url), connect_timeout=5, max_reconnect_attempts=2, reconnect_time_wait=1, error_cb=note,
        inbox_prefix=inbox_of(nats_url, bus_creds()), **bus_security(nats_url)))
    giving_up = asyncio.ensure_future(hopeless.wait())
    try:  # bounded as well: nats-py may go on trying a server whose TLS it cannot verify
        await asyncio.wait({connecting, giving_up}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        if not connecting.done():
            connecting.cancel()
            raise TimeoutError("no connection")
        nc = connecting.result()
    except (Exception, asyncio.CancelledError) as exc:  # the user needs the address and the last reason
        refused = [e for e in errors if "authorization" in e.lower()]  # said before the server hung up
        reason = refused[-1] if refused else errors[-1] if errors else exc
        raise ConnectionError(f"cannot connect to NATS at {where(nats_url)}: {reason}; {advice}") from None
    finally:
        giving_up.cancel()
    try:
        yield nc, errors
    finally:
        await nc.close()


class CommandFailed(Exception):
    """The platform refused a command; the message says why and what to do."""


def signed(payload: Payload, actor: str, key: KeyPair | None) -> bytes:
    envelope = Envelope.wrap(payload, source=f"actor:{actor}")
    return (key.sign(envelope) if key is not None else envelope).model_dump_json().encode()


async def request(nats_url: str, payload: Payload, *, actor: str, key: KeyPair | None = None,
                  patience_s: float = 20.0, subject: str | None = None) -> dict[str, Any]:
    """Send one command or query; return the reply, retrying while the services catch up. `subject`: where a command
    that every service answers goes (a replay: to the service of the letter's consumer).

    When nobody answered (or the answer was lost) the same envelope goes again: a command already done says so. When
    the service refused it for now (`retry`), a new envelope is signed: a refused command is never applied later.
    """
    body = signed(payload, actor, key)
    subject = subject or REQUEST_SUBJECTS[type(payload)]
    async with connected(nats_url) as (nc, _):
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + patience_s, 0.1
        while True:
            try:
                msg = await nc.request(subject, body, timeout=10)
                reply = json.loads(msg.data)
            except (NoRespondersError, NatsTimeout):
                reply = {"ok": False, "retry": True, "message": f"no service answers on {subject}; is `assay up` running?"}
            else:
                if reply.get("retry"):
                    body = signed(payload, actor, key)
            if reply.get("ok", True) or not reply.get("retry") or loop.time() > deadline:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
    if reply.get("ok") is False:
        raise CommandFailed(reply["message"])
    return reply
