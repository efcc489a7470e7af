"""The site's hash-chained audit log: what verify names for each kind of tampering, crashes, several writers."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest
import rfc8785

from contracts.envelope import Envelope
from contracts.signing import KeyPair, verify
from site_worker.audit import GENESIS, LOG_REPAIRED, AuditError, AuditHead, AuditLog, head_path, verify_log


def written(tmp_path: Path, count: int, key: KeyPair | None = None) -> AuditLog:
    log = AuditLog(tmp_path / "audit.jsonl", key or KeyPair.generate())
    for n in range(1, count + 1):
        log.append("job_received", job_id=f"job-{n}", attempt=1)
    return log


def lines(log: AuditLog) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.path.read_text().splitlines()]


def rewrite(log: AuditLog, entries: list[dict[str, Any]]) -> None:
    log.path.write_text("".join(json.dumps(e) + "\n" for e in entries))


def rehashed(entry: dict[str, Any]) -> dict[str, Any]:
    """What a forger who knows the (public) scheme does after an edit: recompute the entry's own hash."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return {**body, "hash": "sha256:" + hashlib.sha256(rfc8785.dumps(body)).hexdigest()}


def test_entries_are_chained_from_genesis_and_the_signed_head_names_the_last(tmp_path: Path) -> None:
    log = written(tmp_path, 3)
    first, second, third = log.entries()
    assert [e.seq for e in (first, second, third)] == [1, 2, 3]
    assert (first.prev, second.prev, third.prev) == (GENESIS, first.hash, second.hash)
    assert (third.kind, third.job_id, third.details) == ("job_received", "job-3", {"attempt": 1})
    head = log.head()
    assert head is not None and (head.data.seq, head.data.hash) == (3, third.hash)
    verdict = verify_log(log.path, log.key.public_key)
    assert verdict.ok and verdict.checked == 3 and verdict.problem == ""


def test_the_head_is_a_signed_message_the_centre_can_check_later(tmp_path: Path) -> None:
    log = written(tmp_path, 2)
    wire = log.head().model_dump_json()  # type: ignore[union-attr]
    received = Envelope[AuditHead].model_validate_json(wire)
    verify(received, log.key.public_key)
    assert received.data.seq == 2 and received.signature.key_id == log.key.key_id  # type: ignore[union-attr]


def test_an_empty_log_verifies_with_no_entries(tmp_path: Path) -> None:
    verdict = verify_log(tmp_path / "audit.jsonl", KeyPair.generate().public_key)
    assert verdict.ok and verdict.checked == 0
    assert AuditLog(tmp_path / "audit.jsonl", KeyPair.generate()).head() is None


def test_an_edited_entry_is_named_by_verify(tmp_path: Path) -> None:
    log = written(tmp_path, 9)
    entries = lines(log)
    entries[6]["details"]["attempt"] = 2
    rewrite(log, entries)
    verdict = verify_log(log.path, log.key.public_key)
    assert not verdict.ok and not verdict.crash
    assert verdict.problem == "entry 7 (line 7, job job-7) was changed after it was written"
    assert (verdict.kind, verdict.line, verdict.seq, verdict.job_id, verdict.checked) == ("changed", 7, 7, "job-7", 6)


def test_a_removed_entry_is_named_by_verify(tmp_path: Path) -> None:
    log = written(tmp_path, 9)
    entries = lines(log)
    rewrite(log, entries[:4] + entries[5:])
    verdict = verify_log(log.path, log.key.public_key)
    assert verdict.kind == "missing"
    assert verdict.problem == "entry 5 is missing, or entries were removed before line 5"


def test_several_removed_entries_are_named_together(tmp_path: Path) -> None:
    log = written(tmp_path, 9)
    entries = lines(log)
    rewrite(log, entries[:2] + entries[5:])
    assert verify_log(log.path, log.key.public_key).problem.startswith("entries 3 to 5 are missing")


def test_swapped_entries_are_reported_out_of_order(tmp_path: Path) -> None:
    log = written(tmp_path, 6)
    entries = lines(log)
    entries[3], entries[4] = entries[4], entries[3]
    rewrite(log, entries)
    verdict = verify_log(log.path, log.key.public_key)
    assert verdict.kind == "out_of_order"
    assert verdict.problem == "entries are out of order: line 4 holds entry 5, and entry 4 is at line 5"


def test_a_copied_entry_is_reported(tmp_path: Path) -> None:
    log = written(tmp_path, 4)
    entries = lines(log)
    rewrite(log, entries[:3] + [entries[1], entries[3]])
    assert verify_log(log.path, log.key.public_key).problem == "line 4 holds entry 2 again (a copy of an earlier entry)"


def test_a_replaced_entry_with_a_recomputed_hash_breaks_the_link_of_the_next(tmp_path: Path) -> None:
    log = written(tmp_path, 6)
    entries = lines(log)
    entries[3] = rehashed({**entries[3], "job_id": "job-other"})
    rewrite(log, entries)
    verdict = verify_log(log.path, log.key.public_key)
    assert verdict.kind == "broken_link" and verdict.seq == 5
    assert verdict.problem.startswith("entry 5 (line 5, job job-5) does not follow entry 4")


def test_a_cut_tail_is_caught_by_the_signed_head(tmp_path: Path) -> None:
    log = written(tmp_path, 10)
    rewrite(log, lines(log)[:8])
    verdict = verify_log(log.path, log.key.public_key)
    assert verdict.kind == "truncated" and not verdict.crash
    assert verdict.problem.startswith("the log ends at entry 8, but the site signed entry 10 at ")
    assert verdict.problem.endswith("entries 9 to 10 were removed from the end")


def test_a_rewritten_last_entry_is_caught_by_the_signed_head(tmp_path: Path) -> None:
    log = written(tmp_path, 5)
    entries = lines(log)
    entries[-1] = rehashed({**entries[-1], "kind": "job_refused"})
    rewrite(log, entries)
    verdict = verify_log(log.path, log.key.public_key)
    assert verdict.kind == "rewritten"
    assert verdict.problem.startswith("entry 5 is not the entry the site signed at ")


def test_a_head_signed_by_another_key_is_refused(tmp_path: Path) -> None:
    site = KeyPair.generate()
    log = written(tmp_path, 3, site)
    AuditLog(log.path, KeyPair.generate()).append("job_refused", job_id="job-4", reason="forged")
    verdict = verify_log(log.path, site.public_key)
    assert verdict.kind == "head_not_signed"
    assert verdict.problem.startswith(f"the head (audit.head.json) is not signed by the site key {site.key_id}")


def test_a_head_whose_content_was_edited_is_refused(tmp_path: Path) -> None:
    log = written(tmp_path, 3)
    head = json.loads(head_path(log.path).read_text())
    head["data"]["seq"] = 2
    head_path(log.path).write_text(json.dumps(head))
    assert verify_log(log.path, log.key.public_key).problem.endswith("the signature does not match the message content")


def test_a_missing_head_is_reported(tmp_path: Path) -> None:
    log = written(tmp_path, 3)
    head_path(log.path).unlink()
    verdict = verify_log(log.path, log.key.public_key)
    assert verdict.kind == "head_missing"
    assert verdict.problem == "the signed head (audit.head.json) is missing: the end of the log cannot be checked"


def test_a_line_that_is_not_json_is_named(tmp_path: Path) -> None:
    log = written(tmp_path, 4)
    text = log.path.read_text().splitlines()
    text[2] = "patient 42 was here"
    log.path.write_text("\n".join(text) + "\n")
    verdict = verify_log(log.path, log.key.public_key)
    assert (verdict.kind, verdict.line, verdict.checked) == ("not_readable", 3, 2)
    assert verdict.problem == "line 3 is not an audit entry (not JSON): it was damaged or edited"


def test_entries_added_after_the_head_without_the_site_key_are_unsigned(tmp_path: Path) -> None:
    log = written(tmp_path, 3)
    entries = lines(log)
    fourth = rehashed({**entries[2], "seq": 4, "prev": entries[2]["hash"], "job_id": "job-x"})
    fifth = rehashed({**fourth, "seq": 5, "prev": fourth["hash"]})
    rewrite(log, [*entries, fourth, fifth])
    verdict = verify_log(log.path, log.key.public_key)
    assert verdict.kind == "unsigned" and not verdict.crash
    assert verdict.problem.startswith("entries 4 to 5 come after the last head the site signed (entry 3, at ")
    with pytest.raises(AuditError, match="does not match its signed head"):
        log.append("job_received", job_id="job-6")


def test_an_append_refuses_to_extend_a_log_cut_after_its_head(tmp_path: Path) -> None:
    log = written(tmp_path, 5)
    rewrite(log, lines(log)[:3])
    before = (log.path.read_bytes(), head_path(log.path).read_bytes())
    with pytest.raises(AuditError, match="the head names entry 5, the log ends at entry 3"):
        log.append("job_received", job_id="job-6")
    assert (log.path.read_bytes(), head_path(log.path).read_bytes()) == before, "the evidence is kept"


def test_a_half_written_last_line_is_told_apart_from_tampering_and_the_next_append_repairs_it(tmp_path: Path) -> None:
    log = written(tmp_path, 3)
    half = b'{"seq":4,"time":"2026-01-'  # the worker died while writing entry 4
    with log.path.open("ab") as file:
        file.write(half)
    verdict = verify_log(log.path, log.key.public_key)
    assert not verdict.ok and verdict.crash and verdict.kind == "incomplete_line"
    assert (verdict.line, verdict.checked) == (4, 3)
    assert verdict.problem.startswith("line 4 is incomplete: the site stopped while writing it (a crash), not an edit")
    assert [e.seq for e in log.entries()] == [1, 2, 3]

    log.append("job_received", job_id="job-4")
    repaired, fourth = log.entries()[3:]
    assert (repaired.seq, repaired.kind, repaired.details["removed_bytes"]) == (4, LOG_REPAIRED, len(half))
    assert (fourth.seq, fourth.job_id) == (5, "job-4")
    assert verify_log(log.path, log.key.public_key).ok


def test_an_entry_written_just_before_a_crash_is_signed_by_the_next_append_and_the_repair_logged(
        tmp_path: Path) -> None:
    log = written(tmp_path, 3)
    signed_at_3 = head_path(log.path).read_bytes()
    log.append("job_received", job_id="job-4")
    head_path(log.path).write_bytes(signed_at_3)  # as if the worker died before re-signing the head
    verdict = verify_log(log.path, log.key.public_key)
    assert verdict.crash and verdict.kind == "head_behind" and verdict.seq == 4
    assert verdict.problem.startswith("entry 4 was written but the site did not sign the head after it (a crash")

    log.append("job_received", job_id="job-5")
    assert [(e.kind, e.details.get("unsigned_seq")) for e in log.entries()[3:]] == [
        ("job_received", None), (LOG_REPAIRED, 4), ("job_received", None)]
    assert verify_log(log.path, log.key.public_key).ok


def test_details_that_are_not_json_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    log = written(tmp_path, 1)
    for bad in (float("nan"), object(), 2**60):
        with pytest.raises(ValueError):
            log.append("job_run", job_id="job-2", value=bad)
    assert len(log.entries()) == 1


def test_the_log_its_head_and_its_lock_are_readable_by_the_site_account_only(tmp_path: Path) -> None:
    log = written(tmp_path, 1)
    for path in (log.path, head_path(log.path), log.path.with_suffix(".lock")):
        assert path.stat().st_mode & 0o777 == 0o600, path.name


def _append_many(path: Path, key: KeyPair, writer: int, count: int) -> None:
    log = AuditLog(path, key)
    for n in range(count):
        log.append("result_held", job_id=f"job-{writer}-{n}", writer=writer)


def test_appends_from_several_processes_at_once_keep_one_unbroken_chain(tmp_path: Path) -> None:
    key, path = KeyPair.generate(), tmp_path / "audit.jsonl"
    fork = multiprocessing.get_context("fork")
    writers = [fork.Process(target=_append_many, args=(path, key, w, 25)) for w in range(4)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=60)
        assert process.exitcode == 0
    verdict = verify_log(path, key.public_key)
    assert verdict.ok and verdict.checked == 100
    assert sorted(e.job_id or "" for e in AuditLog(path, key).entries()) == sorted(
        f"job-{w}-{n}" for w in range(4) for n in range(25))
    assert not any(name.endswith(".tmp") or name.startswith(".audit") for name in os.listdir(tmp_path))


def test_entries_longer_than_a_read_block_chain_like_any_other(tmp_path: Path) -> None:
    log = written(tmp_path, 1)
    log.append("policy_changed", old="sha256:" + "a" * 64, new="sha256:" + "b" * 64, note="x" * 20_000)
    log.append("job_received", job_id="job-3")
    assert [e.seq for e in log.entries()] == [1, 2, 3]
    assert verify_log(log.path, log.key.public_key).ok


def test_a_head_that_is_not_a_signed_head_is_reported_and_stops_appends(tmp_path: Path) -> None:
    log = written(tmp_path, 2)
    head_path(log.path).write_text("{}")
    assert verify_log(log.path, log.key.public_key).kind == "head_unreadable"
    with pytest.raises(AuditError, match="is not a signed audit head"):
        log.append("job_received", job_id="job-3")
