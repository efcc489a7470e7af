"""Signing and verifying one site result, as the leaderboard does for every result it takes (the job's signature and
the site's) and as every service does for what it publishes: libsodium through PyNaCl (what `contracts.signing` uses)
against OpenSSL through cryptography (what it used before) on the same canonical bytes, in the same run. CPU time per
operation (`time.process_time`, so a busy neighbour's steal counts less than in wall time), the two interleaved,
medians of 15 repetitions of 300. Run alone: `.venv/bin/python tests/bench/bench_signing.py`."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from contracts.envelope import Envelope, Signature
from contracts.messages import JobBinding, JobSpec, MetricSpec, SiteResult
from contracts.signing import KeyPair, _b64, _unb64, canonical_bytes, metrics_hash, verify

REPS, N = 15, 300


def a_site_result() -> tuple[Envelope[SiteResult], KeyPair]:
    """A result as a site sends it: the job the scheduler signed inside, the whole signed by the site."""
    scheduler, site = KeyPair.generate(), KeyPair.generate()
    job = JobSpec(job_id="job-1", site_id="site-1", metrics=(MetricSpec(name="auc"), MetricSpec(name="accuracy")),
                  model_owner="vendor", expires_at=datetime.now(UTC) + timedelta(days=1),
                  binding=JobBinding(benchmark_id="bench", model_id="model", dataset_id="data",
                                     model_image="sha256:" + "a" * 64, evaluator_image="sha256:" + "e" * 64,
                                     dataset_hash="sha256:" + "d" * 64, case_count=100))
    signed_job = scheduler.sign(Envelope.wrap(job, source="service:scheduling", id=job.job_id))
    metrics = {"auc": 0.8125, "accuracy": 0.75}
    result = SiteResult(job_id=job.job_id, site_id="site-1", binding=job.binding, metrics=metrics,
                        metrics_hash=metrics_hash(metrics), worker_id="worker-1", finished_at=datetime.now(UTC),
                        job=signed_job)
    return site.sign(Envelope.wrap(result, source="site:site-1/worker-1", id="result-job-1")), site


def cpu_us(operation: Callable[[], object]) -> float:
    start = time.process_time()
    for _ in range(N):
        operation()
    return (time.process_time() - start) / N * 1e6


def measure() -> dict[str, dict[str, float]]:
    envelope, site = a_site_result()
    assert envelope.signature is not None
    signature = _unb64(envelope.signature.value)
    openssl_public = Ed25519PublicKey.from_public_bytes(_unb64(site.public_key))

    def openssl_verify() -> None:  # contracts.signing.verify before, less its checks of the key id
        openssl_public.verify(signature, canonical_bytes(envelope, exclude={"signature"}))

    def openssl_sign() -> Envelope[SiteResult]:  # KeyPair.sign before
        unsigned = envelope.model_copy(update={"signature": None})
        value = site.private.sign(canonical_bytes(unsigned, exclude={"signature"}))
        return envelope.model_copy(update={"signature": Signature(key_id=site.key_id, value=_b64(value))})

    pairs = {"verify one signature": (lambda: verify(envelope, site.public_key), openssl_verify),
             "sign one message": (lambda: site.sign(envelope), openssl_sign)}
    out = {}
    for name, (now, before) in pairs.items():
        ours, theirs = [], []
        for _ in range(REPS):
            ours.append(cpu_us(now))
            theirs.append(cpu_us(before))
        out[name] = {"libsodium_us": round(statistics.median(ours), 1),
                     "openssl_us": round(statistics.median(theirs), 1),
                     "ratio": round(statistics.median(a / b for a, b in zip(ours, theirs, strict=True)), 2)}
    return out


def main() -> None:
    print(f"a site result's envelope, {len(a_site_result()[0].model_dump_json())} bytes; CPU per operation, with its "
          "canonical JSON (medians):")
    for name, got in measure().items():
        print(f"  {name}: libsodium (PyNaCl) {got['libsodium_us']} us, OpenSSL (cryptography) {got['openssl_us']} "
              f"us, ratio {got['ratio']}")


if __name__ == "__main__":
    main()
