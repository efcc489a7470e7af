"""Who may do what on the bus of `assay up`: one NATS user per process, each allowed only what it does, as in
compose/nats/nats.conf. Passwords are new at every start and never leave the state folder (mode 0600). Each user's
replies come to an inbox of its own (`_INBOX.<user>.`), so no process reads another's jobs or answers."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from contracts import subjects
from contracts.catalog import SERVICES

ADMIN, CLI = "supervisor", "cli"  # the supervisor provisions the streams and watches readiness; the CLI commands
AUDITOR = "auditor"  # `assay verify`: reads the history and the results, and asks for the board; changes nothing
INTEGRATION = "integration"  # a dashboard, a notifier, an archive: its own durable consumer of the events, nothing else


def consuming(stream: str, durable: str | None = None) -> list[str]:
    """The JetStream API a durable pull consumer on `stream` uses (any durable, or only the one named)."""
    if durable is None:
        return [f"$JS.API.CONSUMER.CREATE.{stream}.>", f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.>",
                f"$JS.API.CONSUMER.INFO.{stream}.>", f"$JS.API.CONSUMER.MSG.NEXT.{stream}.>", f"$JS.ACK.{stream}.>"]
    return [f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.>", f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
            f"$JS.API.CONSUMER.INFO.{stream}.{durable}", f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
            f"$JS.ACK.{stream}.{durable}.>"]


def replaying(stream: str) -> str:
    return f"$JS.API.STREAM.MSG.GET.{stream}"


def service_permissions(service: str, inbox: str | None = None) -> dict[str, object]:
    # a dead letter's message, read back by its sequence when the operator replays it (`assay dead-letters replay`),
    # from a stream the service reads anyway
    publish = ["assay.v1.evt.>", "assay.v1.dlq.*", *consuming(subjects.EVENTS_STREAM),
               replaying(subjects.EVENTS_STREAM)]
    if service == "scheduling":
        publish += [subjects.JOBS_ALL, f"$KV.{subjects.CANCELLED_BUCKET}.>"]  # the only publisher of jobs, and of
        # their cancellations
        publish += consuming(subjects.RESULTS_STREAM, subjects.durable(service, subjects.REPORTS_ALL))  # sites' reports
        publish += consuming(subjects.DEAD_LETTERS_STREAM, subjects.durable(service, subjects.DEAD_LETTERS_ALL))
        publish.append(replaying(subjects.DEAD_LETTERS_STREAM))  # not RESULTS: the leaderboard alone reads results
    if service == "leaderboard":
        publish += [*consuming(subjects.RESULTS_STREAM), replaying(subjects.RESULTS_STREAM)]  # the one reader of
        # results
    return {"publish": publish, "subscribe": [subjects.cmd(service, ">"), f"{inbox or '_INBOX.' + service}.>"],
            "allow_responses": True}


IMAGES_STREAM = f"OBJ_{subjects.IMAGES_BUCKET}"
# reading an object: its meta (the last message on its meta subject), then its chunks through an ordered consumer
# (nats-py looks up which stream holds a subject first: STREAM.NAMES answers stream names, nothing of their content)
READ_IMAGES = ["$JS.API.STREAM.NAMES", f"$JS.API.STREAM.INFO.{IMAGES_STREAM}", f"$JS.API.DIRECT.GET.{IMAGES_STREAM}.>",
               f"$JS.API.STREAM.MSG.GET.{IMAGES_STREAM}", f"$JS.API.CONSUMER.CREATE.{IMAGES_STREAM}",
               f"$JS.API.CONSUMER.CREATE.{IMAGES_STREAM}.>", f"$JS.API.CONSUMER.DELETE.{IMAGES_STREAM}.>",
               f"$JS.FC.{IMAGES_STREAM}.>"]
# writing one: its chunks and meta, and dropping the chunks of the object it replaces
WRITE_IMAGES = [f"$O.{subjects.IMAGES_BUCKET}.>", "$JS.API.STREAM.NAMES", f"$JS.API.STREAM.INFO.{IMAGES_STREAM}",
                f"$JS.API.DIRECT.GET.{IMAGES_STREAM}.>", f"$JS.API.STREAM.MSG.GET.{IMAGES_STREAM}",
                f"$JS.API.STREAM.PURGE.{IMAGES_STREAM}"]


def reading(stream: str) -> list[str]:
    """The JetStream API a reader of a whole stream uses: its info, and a consumer of its own that acks nothing."""
    return [f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.CONSUMER.CREATE.{stream}", f"$JS.API.CONSUMER.CREATE.{stream}.>",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.>", f"$JS.API.CONSUMER.DELETE.{stream}.>"]


# an integration pulls the events through its own durable consumer (`integration`), so it loses nothing while away;
# it may create and read that consumer only, and publish nothing but its acks
FOLLOW_EVENTS = [*consuming(subjects.EVENTS_STREAM, INTEGRATION), "$JS.API.INFO"]

# the auditor reads the event history and the sites' results, and asks the leaderboard for the board
AUDIT = [*reading(subjects.EVENTS_STREAM), *reading(subjects.RESULTS_STREAM), "$JS.API.STREAM.NAMES",
         subjects.cmd("leaderboard", "show")]


HEARTBEATS = f"KV_{subjects.SITES_BUCKET}"


def heartbeat_rights(site_id: str) -> list[str]:
    """What a site's NATS user must be allowed to publish to beat: its own keys, and the bucket's info that opening it
    reads (the replies come to its inbox, which it subscribes to already)."""
    return [f"$KV.{subjects.SITES_BUCKET}.{subjects.token(site_id, 'site id')}.>", f"$JS.API.STREAM.INFO.{HEARTBEATS}"]


CANCELLED = f"KV_{subjects.CANCELLED_BUCKET}"


def cancellation_rights(site_id: str) -> list[str]:
    """What a site reads of the cancelled bucket: the bucket's info, and by direct get its own keys only."""
    site = subjects.token(site_id, "site id")
    return [f"$JS.API.STREAM.INFO.{CANCELLED}",
            f"$JS.API.DIRECT.GET.{CANCELLED}.$KV.{subjects.CANCELLED_BUCKET}.{site}.>"]


# what a reader (`assay sites list`) must be allowed to publish: the bucket's info (its keys) and each key's value
READ_HEARTBEATS = [f"$JS.API.STREAM.INFO.{HEARTBEATS}", f"$JS.API.STREAM.MSG.GET.{HEARTBEATS}"]


def through_a_leaf(publish: list[str]) -> list[str]:
    """`publish` and the same rights as a client behind a leaf node names them: its JetStream requests, key-value
    writes included, go to the centre's domain (`$JS.<domain>.API.$KV...`), which maps them to its own API."""
    domain = f"$JS.{subjects.DOMAIN}.API."
    return [*publish, *(domain + s.removeprefix("$JS.API.") for s in publish if s.startswith("$JS.API.")),
            *(domain + s for s in publish if s.startswith("$KV."))]


def site_permissions(site_id: str, inbox: str | None = None) -> dict[str, object]:
    """A site's worker: its own queue (pulled, acked), its results, reports and dead letters, its heartbeats, its
    cancellations, the images it runs; connected to the centre directly or through a leaf node of the site's."""
    durable = subjects.durable(f"site-{site_id}", subjects.jobs(site_id))
    publish = [f"$JS.API.CONSUMER.CREATE.JOBS.{durable}.{subjects.jobs(site_id)}",
               f"$JS.API.CONSUMER.INFO.JOBS.{durable}", f"$JS.API.CONSUMER.MSG.NEXT.JOBS.{durable}",
               f"$JS.ACK.JOBS.{durable}.>", subjects.results(site_id), subjects.reports(site_id),
               subjects.dead_letter(durable),
               "$JS.API.INFO", *READ_IMAGES, *heartbeat_rights(site_id), *cancellation_rights(site_id)]
    return {"publish": through_a_leaf(publish), "subscribe": [f"{inbox or '_INBOX.site-' + site_id}.>"]}


# the events that carry a site's dataset statistics (DatasetRegistered): read by the operator, benchmark owners and the
# services; not by model owners nor by other sites
DATASET_EVENTS = subjects.evt("dataset", ">")
CLIENT = ["assay.v1.cmd.>", *WRITE_IMAGES, *READ_IMAGES, *READ_HEARTBEATS]  # a person's CLI: signed commands,
# pushed images and demo data, the sites' heartbeats
ROLES = ("operator", "benchmark_owner", "model_owner", "data_owner", "site", "integration", "auditor", "service",
         "provision")


def role_permissions(role: str, name: str, inbox: str) -> dict[str, object]:
    """What a NATS user of `role` may do: its replies come to `inbox` only (its own), and no other user reads them.
    A site's user is its worker's (its own queue and outputs, no command); the hospital's people who register datasets
    and decide on requests connect as a `data_owner` of their own."""
    sees_statistics = role in ("operator", "benchmark_owner")
    events = {"allow": [f"{inbox}.>", subjects.EVENTS_ALL]} if sees_statistics else {
        "allow": [f"{inbox}.>", subjects.EVENTS_ALL], "deny": [DATASET_EVENTS]}
    if role in ("operator", "benchmark_owner", "model_owner", "data_owner"):
        return {"publish": CLIENT, "subscribe": events}
    if role == "site":
        return site_permissions(name, inbox)
    if role == "integration":
        return {"publish": FOLLOW_EVENTS, "subscribe": [f"{inbox}.>"]}
    if role == "auditor":
        return {"publish": AUDIT, "subscribe": [f"{inbox}.>"]}
    if role == "service":
        if name not in SERVICES:
            raise ValueError(f"no service is called {name!r}; the services are {', '.join(SERVICES)}")
        return service_permissions(name, inbox)
    if role == "provision":  # declares the streams once, then exits: the only user that may change them
        return {"publish": ["$JS.API.>"], "subscribe": [f"{inbox}.>"]}
    raise ValueError(f"no NATS role {role!r}; the roles are {', '.join(ROLES)}")


def render_users(users: list[dict[str, object]]) -> str:
    """The `users` nats-server includes (in the `authorization` block, or an account's): JSON is valid there."""
    return "users: " + json.dumps(users, indent=2) + "\n"


@dataclass(frozen=True)
class Access:
    passwords: dict[str, str]  # user -> password

    @classmethod
    def new(cls, sites: list[str]) -> Access:
        users = [ADMIN, CLI, AUDITOR, INTEGRATION, *SERVICES, *(f"site-{site}" for site in sites)]
        return cls({user: secrets.token_urlsafe(24) for user in users})

    def url(self, user: str, hostport: str) -> str:
        """`user`'s URL of the server at `hostport`, or of each server of a cluster's (`host:port,host:port`)."""
        return ",".join(f"nats://{user}:{self.passwords[user]}@{one}" for one in hostport.split(","))

    def permissions(self, user: str) -> dict[str, object]:
        if user == ADMIN:
            return {"publish": [">"], "subscribe": [">"]}
        inbox = f"_INBOX.{user}"
        if user == CLI:  # the one person at this machine, in every role: what the operator may do
            return role_permissions("operator", user, inbox)
        if user in (AUDITOR, INTEGRATION):
            return role_permissions(user, user, inbox)
        if user in SERVICES:
            return service_permissions(user)
        return site_permissions(user.removeprefix("site-"))

    def users(self) -> list[dict[str, object]]:
        """This platform's own processes, each with its password (new at every start) and its permissions."""
        return [{"user": user, "password": password, "permissions": self.permissions(user)}
                for user, password in self.passwords.items()]

    def config(self) -> str:
        """An `authorization` block of these users alone, for a server with no roster."""
        return "authorization {\n" + render_users(self.users()) + "}\n"
