"""The AsyncAPI 3.0 document of the whole platform, from each app's own wiring: every subject, its payload schema,
who publishes and who consumes, and what answers a request. `just asyncapi` (`python -m assay.asyncapi`) writes it
to contracts/asyncapi/assay.json; a test fails when the committed file is stale."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from faststream.nats import NatsBroker
from faststream.specification import AsyncAPI
from pydantic.json_schema import models_json_schema

from contracts import messages as m
from contracts import subjects
from contracts.catalog import REPLY_TYPES, REQUEST_SUBJECTS, SERVICES, replay_subject

DOCUMENT = Path(__file__).resolve().parents[3] / "contracts" / "asyncapi" / "assay.json"
DESCRIPTION = """Assay on NATS JetStream. Every message is a CloudEvents-named envelope whose `data` is the typed
payload. Commands and queries are request/reply on `assay.v1.cmd.<service>.<verb>`, signed by the acting actor.
Events (`assay.v1.evt.<entity>.<fact>`, stream EVENTS), jobs (`assay.v1.jobs.<site_id>`, stream JOBS, signed by the
scheduler) and results (`assay.v1.results.<site_id>`, stream RESULTS, signed by the site) are published with
`Nats-Msg-Id` set, and read by durable pull consumers named `<owner>-<what it reads>`. A job's events end in its kind
(`assay.v1.evt.job.<fact>.check` for a dataset's or model's check before joining, `.evaluation` for the others;
`assay.v1.evt.job.<fact>.*` reads both). What a consumer gives up on
goes to `assay.v1.dlq.<consumer>` (stream DEAD_LETTERS) with the reason and where its stream keeps it; the operator
replays it through the same consumer on `assay.v1.cmd.<service>.replay_dead_letter` of the service that owns it, which
announces what became of it (DeadLetterReplayed, signed by that service). A channel is named after its owner: the
service or site that consumes it (`leaderboard-results`) or publishes it (`registry:ActorRegistered`).
An integration (a dashboard, a notifier, an audit archive) reads every event here through its own durable pull
consumer `integration` on EVENTS, as the NATS user `integration`, which may create, read and acknowledge that
consumer and nothing else: what happens while it is away waits for it (`assay events follow`). Check each event's
signature against the public key of the one service that publishes its type (a DeadLetterReplayed: of the service
its `service` names) before acting on it."""


def platform_broker() -> NatsBroker:
    """One broker that never connects, carrying every service's wiring and a site worker's."""
    from site_worker.config import Settings
    from site_worker.main import wiring

    broker = NatsBroker("nats://nats:4222", description="the central NATS server of a deployment")
    for name in SERVICES:
        importlib.import_module(f"{name}.handlers").WIRING.declare(broker, units=None)
    defaults = {name: Settings.model_fields[name].default for name in ("max_deliver", "ack_wait_s")}
    wiring(subjects.SITE, worker_id="{worker_id}", **defaults).declare(broker, units=None)
    return broker


def document() -> dict[str, Any]:
    spec = AsyncAPI(platform_broker(), title="Assay", version="v1", schema_version="3.0.0", description=DESCRIPTION)
    doc: dict[str, Any] = json.loads(spec.to_specification().to_json())
    add_parameters(doc)
    add_replies(doc)
    return doc


def add_parameters(doc: dict[str, Any]) -> None:
    """A site's subjects carry its id: AsyncAPI wants each `{name}` in an address declared."""
    for channel in doc["channels"].values():
        if subjects.SITE in (channel.get("address") or ""):
            channel["parameters"] = {"site_id": {"description": "the site's id, as registered (lower case letters, "
                                                               "digits, '-' and '_')"}}


def add_replies(doc: dict[str, Any]) -> None:
    """faststream documents what a request carries; this adds what answers it, on the requester's inbox: its
    reply type when it is done, a CommandReply (ok false, and why) when it is refused."""
    _, schemas = models_json_schema([(reply, "serialization") for reply in m.REPLIES],
                                    ref_template="#/components/schemas/{model}")
    doc["components"]["schemas"].update(schemas["$defs"])
    inbox: dict[str, Any] = {"address": None, "description": "the requester's reply inbox", "messages": {}}
    for reply in m.REPLIES:
        name = reply.__name__
        doc["components"]["messages"][f"reply:{name}"] = {"title": name,
                                                          "payload": {"$ref": f"#/components/schemas/{name}"}}
        inbox["messages"][name] = {"$ref": f"#/components/messages/reply:{name}"}
    doc["channels"]["replies"] = inbox
    requests = {subject: request for request, subject in REQUEST_SUBJECTS.items()}
    requests.update({replay_subject(service): m.ReplayDeadLetter for service in SERVICES})  # each its own consumers'
    for operation in doc["operations"].values():
        channel = doc["channels"][unquote(operation["channel"]["$ref"].rsplit("/", 1)[1])]
        if (request := requests.get(channel["address"])) is not None:
            answers = sorted({REPLY_TYPES[request].__name__, m.CommandReply.__name__})
            operation["reply"] = {"channel": {"$ref": "#/channels/replies"},
                                  "messages": [{"$ref": f"#/channels/replies/messages/{a}"} for a in answers]}


def render() -> str:
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DOCUMENT
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render())
    print(f"wrote {target}")
