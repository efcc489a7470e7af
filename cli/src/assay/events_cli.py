"""`assay events follow`: an integration's view of the platform (a dashboard, a notifier, an audit archive). It pulls
the events through a durable consumer of its own, acknowledging each once it is printed, so what happens while it is
away is there when it comes back, and nothing twice. Every event is signed by the service that publishes it (see
contracts/asyncapi/assay.json for each subject and payload)."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from contracts import subjects

events_app = typer.Typer(help="The platform's events, for integrations: follow them through a durable consumer.",
                         no_args_is_help=True)
console = Console()
DURABLE = "integration"  # the consumer the `integration` user may create and read (assay up, compose)


@events_app.command("follow")
def follow(count: Annotated[int, typer.Option(help="stop after this many (0: until Ctrl-C)")] = 0,
           as_json: Annotated[bool, typer.Option("--json", help="each event's envelope as a JSON line")] = False,
           wait_s: Annotated[float, typer.Option("--wait", help="with --count: give up after this many seconds "
                                                                "without a new event")] = 30.0) -> None:
    """Print every event from where this integration left off (the first time: from the start of the history), and
    acknowledge each once printed."""
    from assay.cli import _home, say_error

    try:
        shown = asyncio.run(_follow(_home().nats_url("integration"), count, as_json, wait_s))
    except KeyboardInterrupt:
        return
    except ConnectionError as exc:
        say_error(str(exc))
        raise typer.Exit(1) from None
    if count and shown < count:
        say_error(f"only {shown} of {count} event(s) came within {wait_s:.0f} s")
        raise typer.Exit(1)


async def _follow(url: str, count: int, as_json: bool, wait_s: float) -> int:
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    from assay.client import connected

    shown = 0
    async with connected(url) as (nc, _):
        js = nc.jetstream()
        queue = await js.pull_subscribe(subjects.EVENTS_ALL, durable=DURABLE, stream=subjects.EVENTS_STREAM,
                                        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL,
                                                              ack_policy=AckPolicy.EXPLICIT))
        while not count or shown < count:
            try:
                batch = await queue.fetch(1 if count else 100, timeout=wait_s if count else 5)
            except NatsTimeout:
                if count:
                    return shown
                continue
            for msg in batch:
                if as_json:
                    print(msg.data.decode(), flush=True)
                else:
                    event = json.loads(msg.data)
                    console.print(f"{event.get('time', '')[:19]}  {escape(msg.subject)}  "
                                  f"{escape(event.get('type', ''))}  {escape(event.get('id', ''))}", highlight=False)
                await msg.ack_sync()
                shown += 1
                if count and shown >= count:
                    break
    return shown
