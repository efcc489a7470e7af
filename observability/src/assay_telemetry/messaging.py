"""faststream's NATS telemetry middleware with its two kinds of noise taken out where they are made.

- No zero-length "create" spans. faststream opens and at once ends a `<subject> create` span before each publish
  (its context is what travels in the headers) and before handling a message that came with no trace context (a
  CLI command). Here the span that sends is the message's context instead: a handler's, or the one the outbox relay
  restores, so the consumers' spans are its children and nothing is lost from the tree; a message handled with no
  context starts its trace at its handling span. Only a publish with no span open at all (nothing to be the child
  of) keeps faststream's create span, the root that ties the publisher's and the consumers' spans together.
- Span names (and the destination attribute of faststream's metrics) that stay few: a reply goes to a one-off
  `_INBOX.…` subject, so it is named `(reply)`, and a key-value put after its bucket (its key names one job).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from faststream.nats.opentelemetry import NatsTelemetryMiddleware
from faststream.nats.opentelemetry.provider import NatsBatchTelemetrySettingsProvider, NatsTelemetrySettingsProvider
from faststream.opentelemetry.middleware import TelemetryMiddleware
from faststream.response import PublishType
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import INVALID_SPAN, NonRecordingSpan, SpanKind, Tracer, TracerProvider

REPLY = "(reply)"


def destination_name(subject: str, *, reply: bool = False) -> str:
    """What a span and a metric name a destination by: the subject, unless it is one of a kind without end."""
    if reply or subject.startswith("_INBOX."):
        return REPLY
    if subject.startswith("$KV."):
        return ".".join(subject.split(".")[:2])
    return subject


class _Naming:
    """Names a publish by `destination_name`; its real subject stays in `messaging.destination.name`."""

    def get_publish_destination_name(self, cmd: Any) -> str:
        return destination_name(cmd.destination, reply=cmd.publish_type is PublishType.REPLY)

    def get_publish_attrs_from_cmd(self, cmd: Any) -> dict[str, Any]:
        attributes: dict[str, Any] = super().get_publish_attrs_from_cmd(cmd)  # type: ignore[misc]
        if self.get_publish_destination_name(cmd) != cmd.destination:
            attributes["messaging.destination.temporary"] = True
        return attributes

    def get_consume_destination_name(self, msg: Any) -> str:
        return destination_name(super().get_consume_destination_name(msg))  # type: ignore[misc]


class _Settings(_Naming, NatsTelemetrySettingsProvider):
    __slots__ = ()


class _BatchSettings(_Naming, NatsBatchTelemetrySettingsProvider):
    __slots__ = ()


def settings_for(msg: Any) -> Any:
    """As faststream's own factory: a message, a batch, or none (a publish); a key-value watch is not traced."""
    if isinstance(msg, Sequence):
        return _BatchSettings()
    if isinstance(msg, Msg) or msg is None:
        return _Settings()
    return None


class _WithoutCreateSpans(Tracer):
    """The tracer faststream is given: a `… create` span becomes the span already open (or none at all)."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    def start_span(self, name: str, context: Any = None, kind: SpanKind = SpanKind.INTERNAL, attributes: Any = None,
                   links: Any = None, start_time: int | None = None, record_exception: bool = True,
                   set_status_on_exception: bool = True) -> Any:
        if name.endswith(" create"):
            sending = trace.get_current_span(context).get_span_context()
            if sending.is_valid:
                return NonRecordingSpan(sending)  # its end() does nothing: the context travels, no span is made
            if kind is SpanKind.CONSUMER:
                return INVALID_SPAN  # the handling span is the root of a trace that came with no context
        return self._tracer.start_span(name, context, kind, attributes, links, start_time, record_exception,
                                       set_status_on_exception)

    def start_as_current_span(self, name: str, context: Any = None, kind: SpanKind = SpanKind.INTERNAL,
                              attributes: Any = None, links: Any = None, start_time: int | None = None,
                              record_exception: bool = True, set_status_on_exception: bool = True,
                              end_on_exit: bool = True) -> Any:
        return self._tracer.start_as_current_span(name, context, kind, attributes, links, start_time,
                                                  record_exception, set_status_on_exception, end_on_exit)


class _Provider(TracerProvider):
    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider

    def get_tracer(self, *args: Any, **kwargs: Any) -> Tracer:
        return _WithoutCreateSpans(self._provider.get_tracer(*args, **kwargs))


class AssayTelemetryMiddleware(NatsTelemetryMiddleware):
    """faststream's NATS telemetry, naming and parenting spans as above, and measuring into `meter_provider` (the
    duration of every message handled and published; its per-message counters are left out: the durations count)."""

    def __init__(self, *, tracer_provider: TracerProvider, meter_provider: MeterProvider | None = None) -> None:
        TelemetryMiddleware.__init__(self, settings_provider_factory=settings_for,
                                     tracer_provider=_Provider(tracer_provider), meter_provider=meter_provider,
                                     include_messages_counters=False)
