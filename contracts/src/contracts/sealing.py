"""Private images: an archive encrypted with a key of its own (libsodium's secretstream, XChaCha20-Poly1305, in
authenticated chunks), and that key sealed to one site at a time (a sealed box to the X25519 form of the site's
registered Ed25519 key), so only the worker holding that site's private key can open it. PyNaCl does the crypto."""

from __future__ import annotations

import base64
from pathlib import Path

import nacl.bindings as sodium
import nacl.exceptions
import nacl.public

from contracts.signing import KeyPair, verify_key

CHUNK = 1 << 20
_PUSH = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
_FINAL = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL
_ABYTES = sodium.crypto_secretstream_xchacha20poly1305_ABYTES


class SealError(ValueError):
    """A sealed key or an encrypted archive that cannot be opened: another key, or changed content."""


def new_key() -> bytes:
    return sodium.crypto_secretstream_xchacha20poly1305_keygen()


def encrypt_file(source: Path, target: Path, key: bytes) -> None:
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    header = sodium.crypto_secretstream_xchacha20poly1305_init_push(state, key)
    with source.open("rb") as plain, target.open("wb") as sealed:
        sealed.write(header)
        chunk = plain.read(CHUNK)
        while True:
            following = plain.read(CHUNK)
            tag = _PUSH if following else _FINAL
            sealed.write(sodium.crypto_secretstream_xchacha20poly1305_push(state, chunk, None, tag))
            if not following:
                return
            chunk = following


def decrypt_file(source: Path, target: Path, key: bytes) -> None:
    """The plain archive, or SealError: a chunk changed, removed, reordered, or a stream cut short."""
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    with source.open("rb") as sealed, target.open("wb") as plain:
        try:
            sodium.crypto_secretstream_xchacha20poly1305_init_pull(
                state, sealed.read(sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES), key)
            while chunk := sealed.read(CHUNK + _ABYTES):
                message, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(state, chunk, None)
                plain.write(message)
                if tag == _FINAL:
                    if sealed.read(1):
                        raise SealError("the archive goes on past its last chunk")
                    return
        except nacl.exceptions.CryptoError as exc:
            raise SealError(f"the archive does not decrypt with its key ({exc})") from None
    raise SealError("the archive ends before its last chunk: it was cut short")


def seal(data: bytes, public_key: str) -> str:
    """`data` (a few KiB at most), readable only with the private key of whose Ed25519 public key this is."""
    recipient = verify_key(public_key).to_curve25519_public_key()
    return base64.urlsafe_b64encode(nacl.public.SealedBox(recipient).encrypt(data)).decode()


def unseal(sealed: str, keys: KeyPair, refusal: str = "it is not sealed to this key") -> bytes:
    mine = keys.signing_key.to_curve25519_private_key()
    try:
        return bytes(nacl.public.SealedBox(mine).decrypt(base64.urlsafe_b64decode(sealed)))
    except (nacl.exceptions.CryptoError, ValueError):
        raise SealError(refusal) from None


def seal_key(key: bytes, site_public_key: str) -> str:
    """`key`, readable only with the private key of the site whose Ed25519 public key this is."""
    return seal(key, site_public_key)


def open_key(sealed: str, site: KeyPair) -> bytes:
    return unseal(sealed, site, "the image's key is not sealed to this site's key")
