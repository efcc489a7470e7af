"""Whether the scheduler cancelled a job before it ran: its signed JobCancelled under the job's key of the cancelled
bucket (`<site_id>.<job_id>`), which only this site may read. A job waits in the queue of a site that was offline
while its pair was revoked, its entity archived or its actor suspended; it is acknowledged and never run."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from contracts.envelope import Envelope
from contracts.messages import JobCancelled
from contracts.signing import SignatureError, verify

log = logging.getLogger(__name__)


class Cancellations:
    """The cancelled bucket, opened at the first look (and again after an open that failed)."""

    def __init__(self, open: Callable[[], Awaitable[Any]], scheduler_key: str) -> None:
        self._open, self._key = open, scheduler_key
        self._bucket: Any = None

    async def reason(self, site_id: str, job_id: str) -> str | None:
        """Why the scheduler cancelled the job, or None: not cancelled, or no word of it that checks out. A bucket
        that cannot be read lets the job run (and says so): its result would be refused at the board anyway."""
        from nats.js.errors import KeyNotFoundError

        try:
            if self._bucket is None:
                self._bucket = await self._open()
            entry = await self._bucket.get(f"{site_id}.{job_id}")
        except KeyNotFoundError:
            return None
        except Exception as exc:  # the bus or the bucket is away: not a reason to hold every job
            self._bucket = None
            log.warning("could not look up whether job %s was cancelled (%s); it runs", job_id, exc)
            return None
        try:
            said = Envelope[JobCancelled].model_validate_json(entry.value or b"")
            verify(said, self._key)
        except (ValidationError, SignatureError) as exc:
            log.warning("the cancellation of job %s is not the scheduler's word (%s): ignored", job_id, exc)
            return None
        if (said.data.site_id, said.data.job_id) != (site_id, job_id):
            log.warning("the cancellation under %s.%s names another job: ignored", site_id, job_id)
            return None
        return said.data.reason
