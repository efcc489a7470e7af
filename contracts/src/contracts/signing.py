"""Ed25519 keys and signatures over the RFC 8785 canonical JSON of an envelope.

The key files are cryptography's (PEM, PKCS#8); the signatures are libsodium's, through PyNaCl. Ed25519 is
deterministic, so both libraries make the same signature of the same bytes, but libsodium verifies one in about half
the time OpenSSL takes on these machines (141 against 269 us, and signs in 76 against 93), and verifying is most of
the leaderboard's work per result (the job's signature and the site's). libsodium is also the stricter verifier: it
refuses small-order keys and non-canonical signatures, which no honest signer makes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey
from pydantic import BaseModel

from contracts.canonical import canonical
from contracts.envelope import Envelope, Payload, Signature

P = TypeVar("P", bound=Payload)


class SignatureError(Exception):
    """A signature is missing, malformed, made with another key, or does not match the content."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def check_public_key(public_key: str) -> str:
    """`public_key` if it is a raw Ed25519 public key in url-safe base64, else ValueError saying so."""
    try:
        raw = base64.urlsafe_b64decode(public_key + "=")
        Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, binascii.Error) as exc:
        raise ValueError("not a raw Ed25519 public key (43 url-safe base64 characters, as in NAME.pub)") from exc
    if _b64(raw) != public_key:
        raise ValueError("not a raw Ed25519 public key (43 url-safe base64 characters, as in NAME.pub)")
    return public_key


def key_id_of(public_key: str) -> str:
    """A short, stable name for a public key: 'ed25519:' and 16 hex digits of its SHA-256."""
    return "ed25519:" + hashlib.sha256(_unb64(public_key)).hexdigest()[:16]


def canonical_bytes(message: BaseModel, *, exclude: set[str] | None = None) -> bytes:
    return canonical(message.model_dump(mode="json", exclude=exclude))


def sha256_of(message: BaseModel) -> str:
    return "sha256:" + hashlib.sha256(canonical_bytes(message)).hexdigest()


@dataclass(frozen=True)
class KeyPair:
    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(Ed25519PrivateKey.generate())

    @cached_property  # (a frozen dataclass keeps it in its __dict__): every signature names the key
    def public_key(self) -> str:
        raw = self.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return _b64(raw)

    @cached_property
    def key_id(self) -> str:
        return key_id_of(self.public_key)

    @cached_property
    def signing_key(self) -> SigningKey:
        """This key as libsodium holds it: it signs, and `contracts.sealing` opens what is sealed to it."""
        return SigningKey(self.private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                     serialization.NoEncryption()))

    def sign(self, envelope: Envelope[P]) -> Envelope[P]:
        value = self.signing_key.sign(canonical_bytes(envelope, exclude={"signature"})).signature
        return envelope.model_copy(update={"signature": Signature(key_id=self.key_id, value=_b64(value))})

    def save(self, path: Path) -> None:
        """Write the private key (PEM, mode 0600) and the public key beside it (`.pub`)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        path.with_suffix(".pub").write_text(self.public_key + "\n")

    @classmethod
    def load(cls, path: Path) -> KeyPair:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise SignatureError(f"{path} is not an Ed25519 private key")
        return cls(key)


@lru_cache(maxsize=4096)  # the keys a service checks again and again: the scheduler's, each site's
def verify_key(public_key: str) -> VerifyKey:
    """A public key (url-safe base64) as libsodium holds it."""
    return VerifyKey(_unb64(public_key))


def verify(envelope: Envelope[P], public_key: str) -> None:
    """Raise SignatureError unless `envelope` carries a valid signature by `public_key`."""
    sig = envelope.signature
    if sig is None:
        raise SignatureError("the message is not signed")
    if sig.alg != "ed25519":
        raise SignatureError(f"unsupported signature algorithm {sig.alg!r}")
    if sig.key_id != key_id_of(public_key):
        raise SignatureError(f"signed with key {sig.key_id}, expected {key_id_of(public_key)}")
    try:
        verify_key(public_key).verify(canonical_bytes(envelope, exclude={"signature"}), _unb64(sig.value))
    except (BadSignatureError, ValueError) as exc:  # (nacl's ValueError is one: a key or signature of a wrong length)
        raise SignatureError("the signature does not match the message content") from exc


def metrics_hash(metrics: dict[str, float]) -> str:
    """The hash a site binds its metrics with: SHA-256 of their RFC 8785 canonical JSON."""
    return "sha256:" + hashlib.sha256(canonical(metrics)).hexdigest()
