"""Every subject and stream name of the v1 bus, spelled once."""

from __future__ import annotations

import re

PREFIX = "assay.v1"
EVENTS_STREAM = "EVENTS"
JOBS_STREAM = "JOBS"
RESULTS_STREAM = "RESULTS"
DEAD_LETTERS_STREAM = "DEAD_LETTERS"
# the centre's JetStream domain: what a site worker behind a leaf node of its own names ($JS.assay.API...) to reach
# the centre's streams through it
DOMAIN = "assay"
SITES_BUCKET = "assay-sites"    # KV: each site worker's latest SiteHeartbeat, under `<site_id>.<worker_id>`
IMAGES_BUCKET = "assay-images"  # object store: `docker save` tarballs of images, named by image id
CANCELLED_BUCKET = "assay-cancelled"  # KV: the scheduler's signed JobCancelled, under `<site_id>.<job_id>`

EVENTS_ALL = f"{PREFIX}.evt.>"
JOBS_ALL = f"{PREFIX}.jobs.*"
RESULTS_ALL = f"{PREFIX}.results.*"
REPORTS_ALL = f"{PREFIX}.reports.*"
DEAD_LETTERS_ALL = f"{PREFIX}.dlq.>"
CANCELLED_ALL = f"$KV.{CANCELLED_BUCKET}.*.*"  # a KV put is a publish: the scheduler stages it in its outbox

_TOKEN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
SITE = "{site_id}"  # where a site's id goes in its subjects, as the AsyncAPI document shows them


def token(value: str, what: str = "id") -> str:
    """A subject token: lower case letters, digits, '-' and '_' only, so ids can never inject wildcards."""
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"{what} {value!r} must match {_TOKEN.pattern} (lower case letters, digits, '-', '_')")
    return value


def cmd(service: str, verb: str) -> str:
    return f"{PREFIX}.cmd.{service}.{verb}"


def evt(entity: str, fact: str) -> str:
    return f"{PREFIX}.evt.{entity}.{fact}"


CHECK, EVALUATION = "check", "evaluation"  # the kinds of job: a dataset's or model's check before joining, or a run
# for the board


def job_evt(fact: str, kind: str = "*") -> str:
    """A job's event, `assay.v1.evt.job.<fact>.<kind>`: its kind last, so the approval service reads only the checks'
    (`...check`) and everyone else all of them (`...*`, the default)."""
    return f"{evt('job', fact)}.{kind if kind == '*' else token(kind, 'job kind')}"


def job_kind(check: object | None) -> str:
    """The kind of a job, from its `check` (None: an evaluation)."""
    return EVALUATION if check is None else CHECK


def _site(site_id: str) -> str:
    return site_id if site_id == SITE else token(site_id, "site id")


def jobs(site_id: str) -> str:
    return f"{PREFIX}.jobs.{_site(site_id)}"


def results(site_id: str) -> str:
    return f"{PREFIX}.results.{_site(site_id)}"


def reports(site_id: str) -> str:
    """Where a site says what became of a job that has no result (yet): refused, failed, held, declined."""
    return f"{PREFIX}.reports.{_site(site_id)}"


def cancelled(site_id: str, job_id: str) -> str:
    """Where the scheduler says a job of `site_id` is cancelled: the key `<site_id>.<job_id>` of the cancelled
    bucket, which that site alone may read."""
    return f"$KV.{CANCELLED_BUCKET}.{_site(site_id)}.{token(job_id, 'job id')}"


def dead_letter(consumer: str) -> str:
    return f"{PREFIX}.dlq.{consumer}"


_SITE_QUEUE = re.compile(r"^site-(?P<site>[a-z0-9][a-z0-9_-]{0,62})-jobs$")


def site_of_queue(consumer: str) -> str | None:
    """The site whose job queue the durable `consumer` is (`site-<id>-jobs`), if it is one."""
    found = _SITE_QUEUE.fullmatch(consumer)
    return found["site"] if found else None


def durable(owner: str, subject: str) -> str:
    """The one spelling of a durable consumer's name: its owner, then what it reads.

    `registry-benchmark-approved` for an event, `approval-job-scheduled-check` for one kind of job's, `x-job-scheduled`
    for every kind's (a wildcard names nothing), `leaderboard-results` and `site-hospital-a-jobs` for a work queue.
    """
    kind, _, rest = subject.removeprefix(PREFIX + ".").partition(".")
    what = "-".join(t for t in rest.split(".") if t not in ("*", ">")) if kind == "evt" else kind
    return f"{owner}-{what}"


def matches(pattern: str, subject: str) -> bool:
    """Whether `subject` is one of the subjects `pattern` names (`*` one token, `>` the rest)."""
    want, got = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(got) > i
        if i >= len(got) or token not in ("*", got[i]):
            return False
    return len(got) == len(want)


def stream_of(subject: str) -> str:
    """The stream that stores `subject`."""
    if subject.startswith(f"$KV.{CANCELLED_BUCKET}."):
        return f"KV_{CANCELLED_BUCKET}"
    kind = subject.removeprefix(PREFIX + ".").split(".", 1)[0]
    streams = {"evt": EVENTS_STREAM, "jobs": JOBS_STREAM, "results": RESULTS_STREAM, "reports": RESULTS_STREAM,
               "dlq": DEAD_LETTERS_STREAM}
    if not subject.startswith(PREFIX + ".") or kind not in streams:
        raise ValueError(f"{subject!r} is not stored in any stream")
    return streams[kind]
