"""Who may have published an event: each event type has one publishing service (an event a service tells of itself,
such as a replay of its own dead letter, the service it names), and every service knows each service's public key
from configuration. An event whose signature does not say so is never applied."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from contracts.catalog import publisher_of
from contracts.envelope import Envelope, Payload
from contracts.signing import SignatureError, check_public_key, verify
from service_kit.edge import Refused


@dataclass(frozen=True)
class Trust:
    keys: Mapping[str, str]  # service name -> its raw Ed25519 public key

    def __post_init__(self) -> None:
        for service, key in self.keys.items():
            try:
                check_public_key(key)
            except ValueError as exc:
                raise ValueError(f"the public key given for service {service!r}: {exc}") from None

    def check(self, envelope: Envelope[Payload]) -> None:
        """Refused unless `envelope` is an event signed by the one service that publishes its type."""
        kind = type(envelope.data)
        publisher = publisher_of(envelope.data)  # one service per event type, or the one an event of its own names
        if publisher is None:
            return  # not an event: its handler checks who sent it (a site's result, a scheduler's job)
        if publisher not in self.keys:
            raise Refused(f"{kind.__name__} comes from {publisher}, whose public key this service is not given")
        try:
            verify(envelope, self.keys[publisher])
        except SignatureError as exc:
            raise Refused(f"a {kind.__name__} must be signed by {publisher}: {exc}; it is not applied") from None
