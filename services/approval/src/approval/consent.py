"""Two-party consent over one pair (a benchmark and a model or dataset), as plain functions over an append-only
history: the entity's owner asks or accepts an invitation, the benchmark's owner approves, rejects or invites (or
its policy approves for it), either side revokes. Nobody approves their own request; a decision is a new entry, never
a changed one; only an approved pair is scheduled.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum


class Status(StrEnum):
    REQUESTED = "REQUESTED"  # the entity's owner asked; the benchmark's owner decides
    INVITED = "INVITED"      # the benchmark's owner asked; the entity's owner decides
    APPROVED = "APPROVED"    # both consented: its jobs are planned
    REJECTED = "REJECTED"    # refused by the side that was asked, with a reason
    REVOKED = "REVOKED"      # consent withdrawn by either side, with a reason: its open jobs are cancelled


class Action(StrEnum):
    REQUESTED = "requested"
    INVITED = "invited"
    APPROVED = "approved"
    ACCEPTED = "accepted"   # the entity's owner accepted an invitation: the two consents
    REJECTED = "rejected"
    REVOKED = "revoked"


OPEN = (None, Status.REJECTED, Status.REVOKED)  # where a new request or invitation may start


class Refusal(ValueError):
    """The action may not be taken; the message says why and what to do instead. Nothing changed."""


class Already(Refusal):
    """The rightful party asked for what is already so (the same command twice): nothing to do, nothing wrong."""


@dataclass(frozen=True)
class Entry:
    action: Action
    actor: str
    at: datetime
    reason: str = ""
    by_policy: bool = False  # approved by the benchmark's auto-approval policy, on its owner's standing word


@dataclass(frozen=True)
class Pair:
    benchmark_owner: str
    entity_owner: str
    entity: str  # "model m1", for the messages
    benchmark: str
    history: tuple[Entry, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.entity} in benchmark {self.benchmark}"

    @property
    def status(self) -> Status | None:
        for entry in reversed(self.history):
            return {Action.REQUESTED: Status.REQUESTED, Action.INVITED: Status.INVITED,
                    Action.APPROVED: Status.APPROVED, Action.ACCEPTED: Status.APPROVED,
                    Action.REJECTED: Status.REJECTED, Action.REVOKED: Status.REVOKED}[entry.action]
        return None

    @property
    def asked_by(self) -> str | None:
        """Who made the open request or invitation: never the one who decides it."""
        for entry in reversed(self.history):
            if entry.action in (Action.REQUESTED, Action.INVITED):
                return entry.actor
        return None

    @property
    def schedulable(self) -> bool:
        return self.status is Status.APPROVED

    def _then(self, entry: Entry) -> Pair:
        return replace(self, history=(*self.history, entry))


@dataclass(frozen=True)
class Policy:
    """A benchmark owner's standing answer to requests of one kind: never (decide each), always, or for the listed
    actors (or organisations, once actors belong to them)."""

    mode: str = "never"  # never | always | allow
    allowed: frozenset[str] = frozenset()

    def approves(self, requester: str, organisation: str | None = None) -> bool:
        return self.mode == "always" or (self.mode == "allow" and (
            requester in self.allowed or (organisation is not None and organisation in self.allowed)))


def _reason(reason: str, what: str) -> str:
    if not reason.strip():
        raise Refusal(f"give a reason for the {what} (--reason TEXT): it is kept in the pair's history")
    return reason.strip()


def request(pair: Pair, actor: str, at: datetime, policy: Policy = Policy(), organisation: str | None = None,
            checking: bool = False) -> Pair:
    """The entity's owner asks to join; the benchmark's policy may approve at once, or, where the request runs a
    check (`checking`), once it passed (`checked`). Asking on an invitation accepts it."""
    if actor != pair.entity_owner:
        raise Refusal(f"{pair.entity} belongs to {pair.entity_owner}, not to {actor}")
    if pair.status is Status.INVITED:
        return accept(pair, actor, at)
    if pair.status not in OPEN:
        raise Already(f"already {pair.status.lower()}")  # type: ignore[union-attr]
    asked = pair._then(Entry(Action.REQUESTED, actor, at))
    return asked if checking else checked(asked, at, policy, organisation)


def checked(pair: Pair, at: datetime, policy: Policy, organisation: str | None = None) -> Pair:
    """The request's check passed (or it runs none): the benchmark's policy approves it now if it approves the
    requester; otherwise the pair is as it was, waiting for the benchmark's owner."""
    requester = pair.asked_by
    if pair.status is Status.REQUESTED and requester != pair.benchmark_owner and policy.approves(requester or "",
                                                                                                  organisation):
        return pair._then(Entry(Action.APPROVED, pair.benchmark_owner, at, by_policy=True))
    return pair


def invite(pair: Pair, actor: str, at: datetime, failed: str | None = None) -> Pair:
    """The benchmark's owner asks the entity in; inviting what already asked approves it (one whose check `failed`
    only by an approval with an override)."""
    if actor != pair.benchmark_owner:
        raise Refusal(f"only the benchmark's owner ({pair.benchmark_owner}) may invite to it")
    if pair.status is Status.REQUESTED:
        return approve(pair, actor, at, failed=failed)
    if pair.status not in OPEN:
        raise Already(f"already {pair.status.lower()}")  # type: ignore[union-attr]
    return pair._then(Entry(Action.INVITED, actor, at))


def accept(pair: Pair, actor: str, at: datetime) -> Pair:
    if pair.status is not Status.INVITED:
        raise Refusal(f"{pair.label} has no open invitation to accept")
    if actor != pair.entity_owner:
        raise Refusal(f"only the owner of the invited entity ({pair.entity_owner}) may accept")
    if actor == pair.asked_by:
        raise Refusal("nobody may accept their own invitation")
    return pair._then(Entry(Action.ACCEPTED, actor, at))


def approve(pair: Pair, actor: str, at: datetime, override: str = "", failed: str | None = None) -> Pair:
    """The benchmark's owner consents to a request. One whose check `failed` (the reason) takes an `override`: why it
    joins anyway, kept in the history."""
    if actor != pair.benchmark_owner:
        raise Refusal(f"only the owner of benchmark {pair.benchmark} ({pair.benchmark_owner}) may approve its members")
    if pair.status is Status.APPROVED:
        raise Already("already approved")
    if pair.status is not Status.REQUESTED:
        raise Refusal("nobody asked for this association; its owner must request it first (assay association "
                      "request), or the benchmark's owner invite it (assay association invite)")
    if actor == pair.asked_by:
        raise Refusal("nobody may approve their own request")
    if failed is not None and not override.strip():
        raise Refusal(f"the check of {pair.label} failed ({failed}); approve it only with --override REASON, which "
                      "is kept in its history")
    return pair._then(Entry(Action.APPROVED, actor, at, f"check overridden: {override.strip()}"
                            if failed is not None else override.strip()))


def reject(pair: Pair, actor: str, reason: str, at: datetime) -> Pair:
    """The side that was asked says no: the benchmark's owner to a request, the entity's owner to an invitation."""
    deciding = {Status.REQUESTED: pair.benchmark_owner, Status.INVITED: pair.entity_owner}.get(pair.status)  # type: ignore[arg-type]
    if deciding is None:
        raise Refusal(f"{pair.label} has no open request or invitation to reject (it is "
                      f"{(pair.status or 'not asked for').lower()})")
    if actor != deciding:
        raise Refusal(f"only {deciding}, who was asked, may reject {pair.label}")
    return pair._then(Entry(Action.REJECTED, actor, at, _reason(reason, "rejection")))


def revoke(pair: Pair, actor: str, reason: str, at: datetime) -> Pair:
    """Either side withdraws its consent: the pair is no longer scheduled and its open jobs are cancelled."""
    if actor not in (pair.benchmark_owner, pair.entity_owner):
        raise Refusal(f"only {pair.benchmark_owner} or {pair.entity_owner} may revoke {pair.label}")
    if pair.status is not Status.APPROVED:
        raise Refusal(f"{pair.label} is not approved, so there is nothing to revoke")
    return pair._then(Entry(Action.REVOKED, actor, at, _reason(reason, "revocation")))
