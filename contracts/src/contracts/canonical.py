"""RFC 8785 canonical JSON, the bytes every signature and every audit hash is made over.

The `rfc8785` package is the reference, and it writes in Python: its `dumps` was the largest single cost of the
leaderboard's ingest (170 µs for one site result, and a result is canonicalised three times: its envelope, the job
inside it, the ResultAccepted signed for it). Python's own C encoder writes exactly RFC 8785's bytes for the values
almost every message is made of, so `canonical` hands those to it and everything else to `rfc8785`, which then also
raises what it raises (a NaN, an integer beyond 2**53). `tests/unit/test_canonical.py` holds the two to the same
bytes, and the same refusals, over generated values.
"""

from __future__ import annotations

import json
import math

import rfc8785

# sorted keys, no spaces, no escaping beyond what RFC 8785 escapes (`"`, `\\`, and the controls, as \b \f \n \r \t or
# a lower-case \u00XX), non-finite numbers refused
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False,
                           check_circular=False).encode

_SAFE = 2**53  # RFC 8785 writes an integer as the IEEE double it is: beyond this it is not exact, and refused


class _Other(Exception):
    """A value whose canonical form json's encoder does not write: it goes to rfc8785."""


def _plain(value: object) -> object:
    """`value` where json's encoder writes it byte for byte as RFC 8785 does, else _Other.

    - keys: ASCII strings (RFC 8785 sorts by UTF-16 code unit, json by code point: the same for ASCII);
    - integers: within +-2**53;
    - floats: finite, and written by `repr` without an exponent (RFC 8785 uses ECMAScript's shortest digits, as repr
      does, and also writes them without an exponent in that range); an integral float is the integer it is
      (RFC 8785 writes 2.0 as 2, and -0.0 as 0).
    """
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is dict:
        out = {}
        for key, item in value.items():  # type: ignore[attr-defined]
            if type(key) is not str or not key.isascii():
                raise _Other
            out[key] = _plain(item)
        return out
    if kind is list:
        return [_plain(item) for item in value]  # type: ignore[attr-defined]
    if kind is int:
        if not -_SAFE < value < _SAFE:  # type: ignore[operator]
            raise _Other
        return value
    if kind is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise _Other
        text = repr(value)
        if "e" in text:
            raise _Other
        return int(value) if text.endswith(".0") else value  # type: ignore[arg-type]
    raise _Other


def canonical(value: object) -> bytes:
    """The RFC 8785 canonical JSON of a JSON value (dicts, lists, strings, numbers, booleans, None), or rfc8785's
    CanonicalizationError where it has none."""
    try:
        return _ENCODE(_plain(value)).encode()
    except (_Other, RecursionError, UnicodeEncodeError):  # UnicodeEncodeError: a lone surrogate, rfc8785's to judge
        return rfc8785.dumps(value)  # type: ignore[arg-type]
