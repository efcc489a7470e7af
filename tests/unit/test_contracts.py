"""Envelopes, canonical JSON signatures, subjects and the committed JSON Schema."""

from __future__ import annotations

import base64
import json

import pytest
from pydantic import ValidationError

from contracts import messages as m
from contracts.envelope import Envelope, Signature
from contracts.schema import SCHEMA_DIR, schemas
from contracts.signing import KeyPair, SignatureError, _unb64, canonical_bytes, metrics_hash, verify
from contracts.subjects import jobs, stream_of, token


def signed(key: KeyPair) -> Envelope[m.ApproveBenchmark]:
    return key.sign(Envelope.wrap(m.ApproveBenchmark(benchmark_id="b1"), source="actor:op"))


def test_a_signed_envelope_verifies_after_a_json_round_trip() -> None:
    key = KeyPair.generate()
    wire = signed(key).model_dump_json()
    verify(Envelope[m.ApproveBenchmark].model_validate_json(wire), key.public_key)


def test_a_changed_field_breaks_the_signature() -> None:
    key = KeyPair.generate()
    raw = json.loads(signed(key).model_dump_json())
    raw["data"]["benchmark_id"] = "b2"
    with pytest.raises(SignatureError, match="does not match"):
        verify(Envelope[m.ApproveBenchmark].model_validate(raw), key.public_key)


def test_a_signature_by_another_key_is_named_as_such() -> None:
    with pytest.raises(SignatureError, match="signed with key"):
        verify(signed(KeyPair.generate()), KeyPair.generate().public_key)


def test_an_unsigned_envelope_does_not_verify() -> None:
    with pytest.raises(SignatureError, match="not signed"):
        verify(Envelope.wrap(m.ApproveBenchmark(benchmark_id="b1"), source="x"), KeyPair.generate().public_key)


def test_what_openssl_signed_before_verifies_and_what_libsodium_signs_openssl_accepts() -> None:
    """Signatures are libsodium's now; results, audit heads and events signed through OpenSSL before still verify,
    and a verifier elsewhere (cryptography, the Go client) accepts what is signed now: Ed25519 is deterministic."""
    key = KeyPair.generate()
    unsigned = Envelope.wrap(m.ApproveBenchmark(benchmark_id="b1"), source="actor:op")
    message = canonical_bytes(unsigned, exclude={"signature"})
    by_openssl = unsigned.model_copy(update={"signature": Signature(
        key_id=key.key_id, value=base64.urlsafe_b64encode(key.private.sign(message)).decode().rstrip("="))})
    verify(by_openssl, key.public_key)
    by_libsodium = key.sign(unsigned)
    assert by_libsodium.signature == by_openssl.signature
    key.private.public_key().verify(_unb64(by_libsodium.signature.value), message)  # raises InvalidSignature if not
    with pytest.raises(SignatureError, match="does not match"):
        verify(by_openssl.model_copy(update={"source": "actor:someone-else"}), key.public_key)


def test_the_metrics_hash_does_not_depend_on_key_order() -> None:
    assert metrics_hash({"a": 0.5, "b": 1.0}) == metrics_hash({"b": 1.0, "a": 0.5})
    assert metrics_hash({"a": 0.5}) != metrics_hash({"a": 0.50001})


def test_a_key_saved_and_loaded_signs_alike(tmp_path) -> None:  # type: ignore[no-untyped-def]
    key = KeyPair.generate()
    key.save(tmp_path / "k.key")
    assert (tmp_path / "k.key").stat().st_mode & 0o777 == 0o600
    loaded = KeyPair.load(tmp_path / "k.key")
    assert loaded.public_key == key.public_key == (tmp_path / "k.pub").read_text().strip()
    with pytest.raises(FileExistsError):
        key.save(tmp_path / "k.key")


def test_an_envelope_whose_type_contradicts_its_payload_is_refused() -> None:
    with pytest.raises(ValidationError, match="does not match the payload"):
        Envelope[m.ApproveBenchmark](source="x", type="assay.v1.RegisterModel", data=m.ApproveBenchmark(benchmark_id="b"))


def test_ids_cannot_inject_subject_wildcards() -> None:
    for bad in ("a.b", "*", ">", "A", ""):
        with pytest.raises(ValueError):
            token(bad)
    assert jobs("site-1") == "assay.v1.jobs.site-1"
    assert stream_of("assay.v1.results.site-1") == "RESULTS"


def test_a_benchmark_whose_primary_metric_is_undeclared_is_refused() -> None:
    image = m.ImageRef(digest="sha256:" + "a" * 64, name="x")
    with pytest.raises(ValidationError, match="primary_metric 'f1' is not one of"):
        m.BenchmarkSpec(benchmark_id="b", name="b", preparator=image, reference_model=image, evaluator=image,
                        metrics=(m.MetricSpec(name="auc"),), primary_metric="f1")


def test_the_committed_json_schema_matches_the_models() -> None:
    committed = {p.name: p.read_text() for p in SCHEMA_DIR.glob("*.json")}
    assert committed == schemas(), "a message model changed: run `just schema` and commit contracts/schema/"


def test_an_actor_key_must_be_a_raw_ed25519_public_key() -> None:
    with pytest.raises(ValidationError, match="not a raw Ed25519 public key"):
        m.RegisterActor(actor_id="x", role=m.Role.SITE, public_key="!" * 43, display_name="x")


def test_a_durable_consumer_is_named_after_its_owner_and_what_it_reads() -> None:
    from contracts.subjects import durable, evt, matches, results

    assert durable("registry", evt("benchmark", "approved")) == "registry-benchmark-approved"
    assert durable("leaderboard", "assay.v1.results.*") == "leaderboard-results"
    assert durable("site-hospital-a", jobs("hospital-a")) == "site-hospital-a-jobs"
    assert matches("assay.v1.jobs.*", jobs("a")) and not matches("assay.v1.jobs.*", "assay.v1.jobs.a.b")
    assert matches("assay.v1.dlq.>", "assay.v1.dlq.a-b") and not matches("assay.v1.dlq.>", "assay.v1.dlq")
    assert matches(results("a"), results("a")) and not matches(results("a"), results("b"))
    assert durable("approval", "assay.v1.evt.job.scheduled.check") == "approval-job-scheduled-check"
    assert durable("x", "assay.v1.evt.job.scheduled.*") == "x-job-scheduled"  # every kind's: no wildcard in a name


def test_a_jobs_events_end_in_its_kind_so_a_reader_of_checks_is_sent_no_evaluations_events() -> None:
    from datetime import UTC, datetime

    from contracts.catalog import EVENT_SUBJECTS, event_subject, event_type
    from contracts.subjects import job_evt, matches

    check = m.CheckOf(kind=m.EntityKind.DATASET, entity_id="ds-a")
    evaluation = m.JobSpec(job_id="job-1", site_id="site-a", metrics=(m.MetricSpec(name="auc"),),
                           expires_at=datetime(2100, 1, 1, tzinfo=UTC), binding=m.JobBinding(
                               benchmark_id="bm", model_id="model-1", dataset_id="ds-a",
                               model_image="sha256:" + "a" * 64, evaluator_image="sha256:" + "b" * 64,
                               dataset_hash="sha256:" + "c" * 64, case_count=3))
    checked = evaluation.model_copy(update={"check": check})
    changed = m.JobStateChanged(job_id="job-1", site_id="site-a", benchmark_id="bm", model_id="model-1",
                                state=m.JobState.HELD, reason="held", check=check)
    sent = {event_subject(m.JobScheduled(job=evaluation)), event_subject(m.JobScheduled(job=checked)),
            event_subject(changed), event_subject(changed.model_copy(update={"check": None}))}
    assert sent == {"assay.v1.evt.job.scheduled.evaluation", "assay.v1.evt.job.scheduled.check",
                    "assay.v1.evt.job.state_changed.check", "assay.v1.evt.job.state_changed.evaluation"}
    checks = {job_evt("scheduled", "check"), job_evt("state_changed", "check")}
    assert {s for s in sent if any(matches(c, s) for c in checks)} == checks  # approval's filters
    assert all(matches(EVENT_SUBJECTS[event_type(s)], s) for s in sent)  # each subject's type, as `assay watch` reads
    assert event_type("assay.v1.evt.job.scheduled.check") is m.JobScheduled
    assert event_type("assay.v1.evt.job.scheduled") is None and event_type("assay.v1.jobs.site-a") is None
    assert event_subject(m.ModelRegistered.model_construct()) == "assay.v1.evt.model.registered"
    with pytest.raises(ValueError, match="job kind"):
        job_evt("scheduled", "check.>")


def test_a_dataset_registers_the_cases_its_preparator_reported_and_no_absurd_count() -> None:
    register = dict(dataset_id="d", benchmark_id="b", name="d", content_hash="sha256:" + "d" * 64,
                    preparator_digest="sha256:" + "e" * 64)
    assert m.RegisterDataset(**register, case_count=141, statistics={"cases": 141}).case_count == 141
    with pytest.raises(ValidationError, match=r"case_count 100000 is not the count the preparator reported \(statis"):
        m.RegisterDataset(**register, case_count=100_000, statistics={"cases": 141})
    with pytest.raises(ValidationError, match="less than or equal to 100000000"):
        m.RegisterDataset(**register, case_count=10**12, statistics={"cases": 10**12})
