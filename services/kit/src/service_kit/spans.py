"""What a message's span says about the domain: the job, benchmark, model, dataset and site it is about and the
images it pins, as `assay.*` attributes an operator searches by (Tempo: `{ span.assay.job_id = "job-…" }`); and an
error status, with the reason, where a message was refused or set aside."""

from __future__ import annotations

from pydantic import BaseModel

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

DOMAIN = ("job_id", "benchmark_id", "model_id", "dataset_id", "site_id", "entity_id", "model_image", "evaluator_image",
          "dataset_hash")


def domain_of(message: BaseModel, depth: int = 4) -> dict[str, str]:
    """The domain ids `message` names, its own first, then those of what it nests (a result's signed job, its
    binding), without copying anything large (a result's replicates are never read)."""
    found: dict[str, str] = {}
    nested: list[BaseModel] = []
    for name in type(message).model_fields:
        value = getattr(message, name, None)
        if name in DOMAIN and isinstance(value, str):
            found.setdefault(name, value)
        elif isinstance(value, BaseModel) and depth > 1:
            nested.append(value)
    for inner in nested:
        for name, value in domain_of(inner, depth - 1).items():
            found.setdefault(name, value)
    return found


def annotate(envelope: BaseModel) -> None:
    """Put the message's id, type and domain ids on the current span (the one the telemetry middleware opened)."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attribute("assay.message_id", str(getattr(envelope, "id", "")))
    span.set_attribute("assay.message_type", str(getattr(envelope, "type", "")))
    for name, value in domain_of(envelope).items():
        span.set_attribute(f"assay.{name}", value)


def failed(outcome: str, reason: str) -> None:
    """The current span ends in error: `outcome` (refused, dead-lettered) and why."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("assay.outcome", outcome)
        span.set_status(Status(StatusCode.ERROR, reason[:500]))
