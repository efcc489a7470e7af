"""Every subject and stream name of the v1 bus, spelled once."""

from __future__ import annotations

import re

PREFIX = "assay.v1"
EVENTS_STREAM = "EVENTS"
JOBS_STREAM = "JOBS"
RESULTS_STREAM = "RESULTS"
DEAD_LETTERS_STREAM = "DEAD_LETTERS"

EVENTS_ALL = f"{PREFIX}.evt.>"
JOBS_ALL = f"{PREFIX}.jobs.*"
RESULTS_ALL = f"{PREFIX}.results.*"
DEAD_LETTERS_ALL = f"{PREFIX}.dlq.>"

_TOKEN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def token(value: str, what: str = "id") -> str:
    """A subject token: lower case letters, digits, '-' and '_' only, so ids can never inject wildcards."""
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"{what} {value!r} must match {_TOKEN.pattern} (lower case letters, digits, '-', '_')")
    return value


def cmd(service: str, verb: str) -> str:
    return f"{PREFIX}.cmd.{service}.{verb}"


def evt(entity: str, fact: str) -> str:
    return f"{PREFIX}.evt.{entity}.{fact}"


def jobs(site_id: str) -> str:
    return f"{PREFIX}.jobs.{token(site_id, 'site id')}"


def results(site_id: str) -> str:
    return f"{PREFIX}.results.{token(site_id, 'site id')}"


def dead_letter(consumer: str) -> str:
    return f"{PREFIX}.dlq.{consumer}"


def stream_of(subject: str) -> str:
    """The stream that stores `subject`."""
    kind = subject.removeprefix(PREFIX + ".").split(".", 1)[0]
    streams = {"evt": EVENTS_STREAM, "jobs": JOBS_STREAM, "results": RESULTS_STREAM, "dlq": DEAD_LETTERS_STREAM}
    if not subject.startswith(PREFIX + ".") or kind not in streams:
        raise ValueError(f"{subject!r} is not stored in any stream")
    return streams[kind]
