"""What a site decided to let leave: every result it computed waits here, on disk, until it is released (by the
policy or by the data owner) or rejected, and until that decision has left. The worker and the data owner's CLI share
one SQLite file, each change one transaction, so a result survives a restart or a reboot and leaves once.

A held result is not signed yet: the site's signature is its word that it releases these metrics, so it is made when
the data owner has said so. A copy of a held row is worth nothing outside the site.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path

from contracts.envelope import utcnow
from contracts.messages import SiteResult

SCHEMA = """
CREATE TABLE IF NOT EXISTS result (
    job_id TEXT PRIMARY KEY,
    benchmark_id TEXT NOT NULL,
    model_id TEXT NOT NULL,
    dataset_id TEXT NOT NULL,
    result TEXT NOT NULL,          -- the SiteResult, unsigned: exactly what would leave
    kept TEXT NOT NULL,            -- what stays at the site (names only): JSON
    state TEXT NOT NULL,           -- held, approved, rejected
    decided_by TEXT,
    reason TEXT,
    held_at TEXT NOT NULL,
    decided_at TEXT,
    signed TEXT,                   -- the signed envelope, made once, so a resend sends the same bytes
    sent_at TEXT                   -- when the decision left: the result (approved) or the refusal (rejected)
)
"""
# what `unsent` asks after every kept result: found without reading the rows already sent (all of them, in time)
UNSENT_INDEX = ("CREATE INDEX IF NOT EXISTS result_unsent ON result (decided_at) "
                "WHERE state != 'held' AND sent_at IS NULL")


class Decision(StrEnum):
    HELD = "held"
    APPROVED = "approved"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Held:
    job_id: str
    benchmark_id: str
    model_id: str
    dataset_id: str
    result: SiteResult
    kept: dict[str, object]
    state: Decision
    decided_by: str | None
    reason: str | None
    held_at: datetime
    decided_at: datetime | None
    signed: str | None
    sent_at: datetime | None

    @property
    def leaving(self) -> dict[str, object]:
        """What releasing it sends, besides the job and its binding: the metrics and their hash, the aggregates, and
        the replicates (summarised here as their count and range: the JSON of `results show --json` has them all)."""
        leaving: dict[str, object] = {"metrics": self.result.metrics, "metrics_hash": self.result.metrics_hash}
        if (evidence := self.result.evidence) is not None:
            leaving |= evidence.model_dump(mode="json", exclude={"replicates"}, exclude_none=True)
            leaving["replicates"] = {name: f"{len(values)} values in [{min(values):.4f}, {max(values):.4f}]"
                                     for name, values in evidence.replicates.items()}
        return leaving


class ReviewError(ValueError):
    """A decision that cannot be taken (an unknown job, one already decided); nothing was changed."""


def _modified(path: Path) -> int:
    """When `path` last changed; 0 when it is not there (SQLite removes its WAL file as the last connection closes,
    at any moment between two looks)."""
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


class Review:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute(SCHEMA)
            db.execute(UNSENT_INDEX)

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened once with its pragmas (a connection and its pragmas per call cost more
        than the query: 4-5 calls a job). Each transaction still sees what another process committed (SQLite's own
        locking), and a forked child opens its own: a connection must not cross a fork."""
        held = getattr(self._local, "db", None)
        if held is not None and held[0] == os.getpid():
            return held[1]
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # per connection: every transaction of this one is on disk at COMMIT
        self._local.db = (os.getpid(), db)
        return db

    @contextmanager
    def _db(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction: committed when the block ends, rolled back if it raises. FULL sync: a result the worker
        acknowledged its job for is on disk. A read takes no write lock."""
        db = self._connection()
        try:
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield db
            db.execute("COMMIT")
        except BaseException as exc:
            try:
                db.execute("ROLLBACK") if db.in_transaction else None
            finally:
                if isinstance(exc, sqlite3.Error):  # SQLite failed (a lock, the disk): the next call starts afresh
                    self._local.db = None
                    db.close()
            raise
        if write:
            self.path.chmod(0o600)

    def stamp(self) -> tuple[int, ...]:
        """Changes whenever anything was written (by the worker or the CLI): nothing to look at while it stays."""
        return tuple(_modified(path) for path in (self.path, self.path.with_name(self.path.name + "-wal")))

    def keep(self, result: SiteResult, *, kept: dict[str, object], release: bool, by: str,
             signed: str | None = None) -> Held:
        """Keep a computed result: held for review, or approved at once by the policy (`by` names the rule) and kept
        in the envelope the site signed it in (`signed`, made once, as the policy released it). A job kept before is
        not kept again: what was kept then is returned."""
        if signed is not None and not release:
            raise ValueError("a held result is not signed: the site signs what it releases")
        now = utcnow().isoformat()
        state, decided = (Decision.APPROVED, now) if release else (Decision.HELD, None)
        with self._db() as db:
            added = db.execute(
                "INSERT OR IGNORE INTO result (job_id, benchmark_id, model_id, dataset_id, result, kept, state,"
                " decided_by, held_at, decided_at, signed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (result.job_id, result.binding.benchmark_id, result.binding.model_id, result.binding.dataset_id,
                 result.model_dump_json(), json.dumps(kept), state.value, by if release else None, now, decided,
                 signed)).rowcount
        if added:  # what was written, as it reads back, without reading it back
            return Held(result.job_id, result.binding.benchmark_id, result.binding.model_id,
                        result.binding.dataset_id, result, json.loads(json.dumps(kept)), state,
                        by if release else None, None, datetime.fromisoformat(now), _time(decided), signed, None)
        found = self.get(result.job_id)
        assert found is not None
        return found

    def get(self, job_id: str) -> Held | None:
        rows = self._select("WHERE job_id = ?", (job_id,))
        return rows[0] if rows else None

    def resolve(self, start: str) -> str:
        """The one kept job whose id begins with `start` (tables show the first characters)."""
        with self._db(write=False) as db:
            found = [row[0] for row in db.execute("SELECT job_id FROM result WHERE substr(job_id, 1, ?) = ? LIMIT 2",
                                                  (len(start), start))]
        if len(found) == 1:
            return str(found[0])
        if not found:
            raise ReviewError(f"no result of a job {start}... is kept at this site; `assay results pending` lists "
                              "the held ones")
        raise ReviewError(f"more than one kept job begins with {start}; give more of its id")

    def pending(self, benchmark_id: str | None = None) -> list[Held]:
        """The results that wait for the data owner, oldest first."""
        if benchmark_id is None:
            return self._select("WHERE state = 'held' ORDER BY held_at", ())
        return self._select("WHERE state = 'held' AND benchmark_id = ? ORDER BY held_at", (benchmark_id,))

    def all(self) -> list[Held]:
        return self._select("ORDER BY held_at", ())

    def unsent(self) -> list[Held]:
        """Decisions that have not left yet: what the worker sends next."""
        return self._select("WHERE state != 'held' AND sent_at IS NULL ORDER BY decided_at", ())

    def decide(self, job_ids: Sequence[str], decision: Decision, *, by: str, reason: str | None = None) -> list[Held]:
        """Approve or reject held results, all or none: an unknown job, or one already decided, changes nothing."""
        if decision is Decision.HELD:
            raise ValueError("a decision approves or rejects")
        now = utcnow().isoformat()
        with self._db() as db:
            for job_id in job_ids:
                row = db.execute("SELECT state FROM result WHERE job_id = ?", (job_id,)).fetchone()
                if row is None:
                    raise ReviewError(f"no result of job {job_id} is kept at this site; `assay results pending` "
                                      "lists the held ones")
                if row[0] != Decision.HELD:
                    raise ReviewError(f"the result of job {job_id} was already {row[0]}; a decision is taken once")
                db.execute("UPDATE result SET state = ?, decided_by = ?, reason = ?, decided_at = ? WHERE job_id = ?",
                           (decision.value, by, reason, now, job_id))
        return [held for job_id in job_ids if (held := self.get(job_id)) is not None]

    def sign_once(self, job_id: str, signed: str) -> str:
        """Store the signed envelope unless one is stored; the one stored."""
        with self._db() as db:
            db.execute("UPDATE result SET signed = ? WHERE job_id = ? AND signed IS NULL", (signed, job_id))
            return str(db.execute("SELECT signed FROM result WHERE job_id = ?", (job_id,)).fetchone()[0])

    def sent(self, job_id: str) -> None:
        with self._db() as db:
            db.execute("UPDATE result SET sent_at = ? WHERE job_id = ? AND sent_at IS NULL",
                       (utcnow().isoformat(), job_id))

    def _select(self, where: str, args: tuple[object, ...]) -> list[Held]:
        with self._db(write=False) as db:
            rows = db.execute(f"SELECT job_id, benchmark_id, model_id, dataset_id, result, kept, state, decided_by, "
                              f"reason, held_at, decided_at, signed, sent_at FROM result {where}", args).fetchall()
        return [Held(r[0], r[1], r[2], r[3], SiteResult.model_validate_json(r[4]), json.loads(r[5]), Decision(r[6]),
                     r[7], r[8], datetime.fromisoformat(r[9]), _time(r[10]), r[11], _time(r[12])) for r in rows]
