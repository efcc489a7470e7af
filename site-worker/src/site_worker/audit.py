"""The site's tamper-evident audit log: one hash-chained JSON entry per line, and a head signed by the site key.

An entry's `hash` is the SHA-256 of its RFC 8785 canonical JSON without `hash`, its `prev` the hash of the entry
before, so an edited, removed or moved entry breaks the chain; the signed head (`audit.head.json`) names the last
entry, so a cut tail shows too. A crash mid-append is told apart from tampering; the next append repairs and logs it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import rfc8785
from pydantic import BaseModel, ConfigDict, Field, JsonValue, TypeAdapter, ValidationError

from contracts.canonical import canonical
from contracts.envelope import Envelope, describe, utcnow
from contracts.messages import AuditHead
from contracts.signing import KeyPair, SignatureError, key_id_of, verify

GENESIS = "sha256:" + "0" * 64  # the `prev` of entry 1
LOG_REPAIRED = "log_repaired"
CRASH_KINDS = frozenset({"incomplete_line", "head_behind"})  # problems a crash leaves, which the next append repairs
_DETAILS = TypeAdapter(dict[str, JsonValue])


class AuditError(Exception):
    """The log cannot be read or extended as it is; `assay audit verify` says where and why."""


class Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    seq: int = Field(ge=1)
    time: datetime
    kind: str = Field(min_length=1, max_length=64)
    job_id: str | None = None
    details: dict[str, JsonValue] = {}
    prev: str
    hash: str


SignedHead = Envelope[AuditHead]


@dataclass(frozen=True)
class Verdict:
    """What verify_log found: ok, or the first problem in words for an auditor, its kind and where it is.

    Kinds: not_readable, changed, out_of_order, missing, broken_link, head_missing, head_unreadable, head_not_signed,
    truncated, rewritten, unsigned; and those a crash leaves (`crash`), which the next append repairs and logs:
    incomplete_line, head_behind. `checked` counts the entries found intact before the problem.
    """

    ok: bool
    checked: int
    problem: str = ""
    kind: str = ""
    line: int | None = None
    seq: int | None = None
    job_id: str | None = None

    @property
    def crash(self) -> bool:
        return self.kind in CRASH_KINDS


def head_path(path: Path) -> Path:
    return path.with_suffix(".head.json")


def _hash_of(body: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(canonical(body)).hexdigest()


@contextmanager
def _locked(path: Path, mode: int) -> Iterator[None]:
    """Hold `mode` (fcntl.LOCK_EX or LOCK_SH) on the log's lock file; every writer takes it, in any process."""
    fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)


def _tail(fd: int, size: int) -> tuple[bytes, bytes]:
    """The file's last complete line (without its newline) and the incomplete bytes after it, read from the end."""
    chunk = 4096
    while True:
        start = max(0, size - chunk)
        block = os.pread(fd, size - start, start)
        end = block.rfind(b"\n")
        if end < 0 and start == 0:
            return b"", block
        begin = block.rfind(b"\n", 0, end) + 1 if end >= 0 else 0
        if end >= 0 and (begin > 0 or start == 0):
            return block[begin:end], block[end + 1:]
        chunk *= 2


def read_head(path: Path) -> SignedHead | None:
    """The head beside the log as stored, its signature not checked (verify_log checks it); None before any entry."""
    try:
        return SignedHead.model_validate_json(head_path(path).read_bytes())
    except FileNotFoundError:
        return None
    except ValidationError as exc:
        raise AuditError(f"{head_path(path)} is not a signed audit head ({describe(exc)})") from exc


def read_entries(path: Path) -> list[Entry]:
    """The log's entries, oldest first; an incomplete last line (a crash while writing) is left out."""
    if not path.exists():
        return []
    *lines, _incomplete = path.read_bytes().split(b"\n")
    try:
        return [Entry.model_validate_json(line) for line in lines]
    except ValidationError as exc:
        raise AuditError(f"{path} holds a line that is not an audit entry; run `assay audit verify`") from exc


class AuditLog:
    """Appends to one site's log; safe from several processes at once (the worker and the data owner's CLI)."""

    def __init__(self, path: Path, key: KeyPair, *, source: str | None = None,
                 now: Callable[[], datetime] = utcnow) -> None:
        self.path, self.key, self.now = path, key, now
        self.source = source or f"audit:{key.key_id}"

    def append(self, kind: str, job_id: str | None = None, **details: Any) -> Entry:
        """Write one entry, fsync it and re-sign the head; raise AuditError, writing nothing, if the log was altered."""
        checked = _DETAILS.validate_python(details)
        canonical(checked)  # a NaN or an integer beyond 2**53 has no canonical JSON: refuse it before writing
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path, fcntl.LOCK_EX):
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                last, repairs = self._recover(fd)
                written = []
                for repair in repairs:
                    last = self._seal(last, LOG_REPAIRED, None, repair)
                    written.append(last)
                entry = self._seal(last, kind, job_id, checked)
                lines = b"".join(e.model_dump_json().encode() + b"\n" for e in [*written, entry])
                while lines:
                    lines = lines[os.write(fd, lines):]
                os.fsync(fd)
            finally:
                os.close(fd)
            self._sign_head(entry)
        return entry

    def entries(self) -> list[Entry]:
        return read_entries(self.path)

    def head(self) -> SignedHead | None:
        """The head the site signed after its last append, to publish; None before the first entry."""
        return read_head(self.path)  # replaced atomically: a reader sees the old head or the new one

    def _seal(self, last: Entry | None, kind: str, job_id: str | None, details: dict[str, JsonValue]) -> Entry:
        draft = Entry(seq=last.seq + 1 if last else 1, time=self.now(), kind=kind, job_id=job_id,
                      details=details, prev=last.hash if last else GENESIS, hash="")
        return draft.model_copy(update={"hash": _hash_of(draft.model_dump(mode="json", exclude={"hash"}))})

    def _recover(self, fd: int) -> tuple[Entry | None, list[dict[str, JsonValue]]]:
        """The last entry, and the repairs to log first when a crash interrupted the previous append."""
        size = os.fstat(fd).st_size
        line, incomplete = _tail(fd, size)
        try:
            last = Entry.model_validate_json(line) if line else None
        except ValidationError as exc:
            raise AuditError(f"the last line of {self.path} is not an audit entry; nothing was appended: "
                             "run `assay audit verify`") from exc
        head = read_head(self.path)
        signed = (head.data.seq, head.data.hash) if head else (0, GENESIS)
        repairs: list[dict[str, JsonValue]] = []
        if last and signed != (last.seq, last.hash):
            if (last.seq, last.prev) != (signed[0] + 1, signed[1]):
                raise AuditError(f"{self.path} does not match its signed head (the head names entry {signed[0]}, "
                                 f"the log ends at entry {last.seq}); nothing was appended: run `assay audit verify`")
            repairs.append({"reason": "the head was not signed after the last entry (a crash); it is signed now",
                            "unsigned_seq": last.seq})
        elif not last and head:
            raise AuditError(f"{self.path} is empty or missing but its signed head names entry {signed[0]}; "
                             "nothing was appended: run `assay audit verify`")
        if incomplete:
            os.ftruncate(fd, size - len(incomplete))
            repairs.append({"reason": "the last line was incomplete (a crash while writing); it was removed",
                            "removed_bytes": len(incomplete)})
        return last, repairs

    def _sign_head(self, last: Entry) -> None:
        head = AuditHead(seq=last.seq, hash=last.hash, time=self.now())
        signed = self.key.sign(Envelope.wrap(head, source=self.source))
        target = head_path(self.path)
        fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(signed.model_dump_json().encode())
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        folder = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def verify_log(path: Path, public_key: str) -> Verdict:
    """Walk the chain from entry 1 and check the head against the site key: ok, or the first problem and where."""
    # the shared lock keeps an append from landing between reading the log and its head; a copy has no lock file
    with _locked(path, fcntl.LOCK_SH) if path.with_suffix(".lock").exists() else nullcontext():
        data = path.read_bytes() if path.exists() else b""
        head = head_path(path).read_bytes() if head_path(path).exists() else None
    *lines, incomplete = data.split(b"\n")
    chained: list[dict[str, Any]] = []
    problem = _check_chain(lines, chained) or _check_head(path, head, chained, public_key)
    if problem:
        return problem
    if incomplete:
        return Verdict(False, len(chained), f"line {len(lines) + 1} is incomplete: the site stopped while writing it "
                       f"(a crash), not an edit; the {len(chained)} entries before it are intact and signed, "
                       "and the next entry the site writes records the repair", "incomplete_line", len(lines) + 1)
    return Verdict(True, len(chained))


def _parse(line: bytes) -> dict[str, Any] | str:
    try:
        raw = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "not JSON" if line.strip() else "empty"
    if not isinstance(raw, dict) or not isinstance(raw.get("hash"), str):
        return "a JSON value without a hash"
    return raw


def _where(line: int, raw: dict[str, Any]) -> str:
    seq, job = raw.get("seq"), raw.get("job_id")
    at = f"line {line}, job {job}" if isinstance(job, str) else f"line {line}"
    return f"entry {seq} ({at})" if isinstance(seq, int) else f"the entry at {at}"


def _fault(kind: str, words: str, line: int, raw: dict[str, Any] | str, checked: int) -> Verdict:
    seq, job = (raw.get("seq"), raw.get("job_id")) if isinstance(raw, dict) else (None, None)
    return Verdict(False, checked, words, kind, line, seq if isinstance(seq, int) else None,
                   job if isinstance(job, str) else None)


def _check_chain(lines: list[bytes], chained: list[dict[str, Any]]) -> Verdict | None:
    """Check every line's own hash, place and link to the one before; the good entries are collected in `chained`."""
    parsed = [_parse(line) for line in lines]
    prev = GENESIS
    for number, raw in enumerate(parsed, start=1):
        if isinstance(raw, str):
            words = f"line {number} is not an audit entry ({raw}): it was damaged or edited"
            return _fault("not_readable", words, number, raw, len(chained))
        try:
            intact = _hash_of({k: v for k, v in raw.items() if k != "hash"}) == raw["hash"]
        except rfc8785.CanonicalizationError:
            intact = False
        if not intact:
            return _fault("changed", f"{_where(number, raw)} was changed after it was written", number, raw,
                          len(chained))
        try:
            Entry.model_validate_json(lines[number - 1])
        except ValidationError as exc:
            words = f"line {number} is not an audit entry ({describe(exc)})"
            return _fault("not_readable", words, number, raw, len(chained))
        if raw["seq"] != number:
            return _misplaced(number, parsed, len(chained))
        if raw["prev"] != prev:
            words = (f"{_where(number, raw)} does not follow entry {number - 1}: an earlier entry was replaced, "
                     "or entries were removed and the rest renumbered")
            return _fault("broken_link", words, number, raw, len(chained))
        prev = raw["hash"]
        chained.append(raw)
    return None


def _misplaced(number: int, parsed: list[dict[str, Any] | str], checked: int) -> Verdict:
    """Line `number` holds another entry: say whether entries were moved, copied or removed."""
    raw = parsed[number - 1]
    seq = raw["seq"] if isinstance(raw, dict) else None
    later = {r.get("seq"): n for n, r in enumerate(parsed[number:], start=number + 1) if isinstance(r, dict)}
    if isinstance(seq, int) and seq < number:
        return _fault("out_of_order", f"line {number} holds entry {seq} again (a copy of an earlier entry)", number,
                      raw, checked)
    if number in later:
        words = (f"entries are out of order: line {number} holds entry {seq}, and entry {number} is at line "
                 f"{later[number]}")
        return _fault("out_of_order", words, number, raw, checked)
    gone = f"entry {number} is" if seq == number + 1 else f"entries {number} to {seq - 1} are"
    return _fault("missing", f"{gone} missing, or entries were removed before line {number}", number, raw, checked)


def _check_head(path: Path, stored: bytes | None, chained: list[dict[str, Any]], public_key: str) -> Verdict | None:
    """The signed head must be the site key's and name the log's last entry."""
    count, name = len(chained), head_path(path).name

    def bad(kind: str, words: str, seq: int | None = None) -> Verdict:
        job = chained[seq - 1].get("job_id") if seq and seq <= count else None
        return Verdict(False, count, words, kind, seq, seq, job)

    if stored is None:
        if count > 1:
            return bad("head_missing", f"the signed head ({name}) is missing: the end of the log cannot be checked")
        seq, digest, at = 0, GENESIS, "before its first entry"
    else:
        try:
            head = SignedHead.model_validate_json(stored)
            verify(head, public_key)
        except ValidationError as exc:
            return bad("head_unreadable", f"the signed head ({name}) is not readable ({describe(exc)})")
        except SignatureError as exc:
            return bad("head_not_signed", f"the head ({name}) is not signed by the site key {key_id_of(public_key)}: "
                       f"{exc}")
        seq, digest, at = head.data.seq, head.data.hash, f"at {head.data.time:%Y-%m-%d %H:%M:%S} UTC"
    if seq > count:
        gone = f"entry {seq} was" if seq == count + 1 else f"entries {count + 1} to {seq} were"
        return bad("truncated", f"the log ends at entry {count}, but the site signed entry {seq} {at}: "
                   f"{gone} removed from the end", count + 1)
    if seq and chained[seq - 1]["hash"] != digest:
        return bad("rewritten", f"entry {seq} is not the entry the site signed {at}: the log was rewritten", seq)
    if seq == count:
        return None
    if seq == count - 1:
        return bad("head_behind", f"entry {count} was written but the site did not sign the head after it "
                   "(a crash while writing), not an edit; the next entry the site writes records the repair", count)
    return bad("unsigned", f"entries {seq + 1} to {count} come after the last head the site signed "
               f"(entry {seq}, {at}): they were added without the site key", seq + 1)
