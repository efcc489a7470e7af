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


def service_permissions(service: str) -> dict[str, object]:
    publish = ["assay.v1.evt.>", "assay.v1.dlq.*", *consuming(subjects.EVENTS_STREAM)]
    if service == "scheduling":
        publish += [subjects.JOBS_ALL, f"$KV.{subjects.CANCELLED_BUCKET}.>"]  # the only publisher of jobs, and of
        # their cancellations
        publish += consuming(subjects.RESULTS_STREAM, subjects.durable(service, subjects.REPORTS_ALL))  # sites' reports
        publish += consuming(subjects.DEAD_LETTERS_STREAM, subjects.durable(service, subjects.DEAD_LETTERS_ALL))
    if service == "leaderboard":
        publish += consuming(subjects.RESULTS_STREAM)  # the only reader of results
    return {"publish": publish, "subscribe": [subjects.cmd(service, ">"), f"_INBOX.{service}.>"],
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


def site_permissions(site_id: str) -> dict[str, object]:
    durable = subjects.durable(f"site-{site_id}", subjects.jobs(site_id))
    return {"publish": [f"$JS.API.CONSUMER.CREATE.JOBS.{durable}.{subjects.jobs(site_id)}",
                        f"$JS.API.CONSUMER.INFO.JOBS.{durable}", f"$JS.API.CONSUMER.MSG.NEXT.JOBS.{durable}",
                        f"$JS.ACK.JOBS.{durable}.>", subjects.results(site_id), subjects.reports(site_id),
                        subjects.dead_letter(durable),
                        "$JS.API.INFO", *READ_IMAGES, *heartbeat_rights(site_id), *cancellation_rights(site_id)],
            "subscribe": [f"_INBOX.site-{site_id}.>"]}


@dataclass(frozen=True)
class Access:
    passwords: dict[str, str]  # user -> password

    @classmethod
    def new(cls, sites: list[str]) -> Access:
        users = [ADMIN, CLI, AUDITOR, INTEGRATION, *SERVICES, *(f"site-{site}" for site in sites)]
        return cls({user: secrets.token_urlsafe(24) for user in users})

    def url(self, user: str, hostport: str) -> str:
        return f"nats://{user}:{self.passwords[user]}@{hostport}"

    def permissions(self, user: str) -> dict[str, object]:
        if user == ADMIN:
            return {"publish": [">"], "subscribe": [">"]}
        if user == CLI:
            return {"publish": ["assay.v1.cmd.>", *WRITE_IMAGES, *READ_IMAGES, *READ_HEARTBEATS],
                    "subscribe": [f"_INBOX.{CLI}.>", subjects.EVENTS_ALL]}
        if user == AUDITOR:
            return {"publish": AUDIT, "subscribe": [f"_INBOX.{AUDITOR}.>"]}
        if user == INTEGRATION:
            return {"publish": FOLLOW_EVENTS, "subscribe": [f"_INBOX.{INTEGRATION}.>"]}
        if user in SERVICES:
            return service_permissions(user)
        return site_permissions(user.removeprefix("site-"))

    def config(self) -> str:
        """The `authorization` block of nats-server's configuration."""
        users = [{"user": user, "password": password, "permissions": self.permissions(user)}
                 for user, password in self.passwords.items()]
        return "authorization {\n  users: " + json.dumps(users, indent=2) + "\n}\n"
