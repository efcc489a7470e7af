"""`contracts.canonical` writes exactly the bytes the rfc8785 package writes, and refuses exactly what it refuses."""

from __future__ import annotations

import math

import pytest
import rfc8785
from hypothesis import example, given, settings
from hypothesis import strategies as st

from contracts.canonical import canonical

# every kind of text: ASCII, controls, astral characters, lone surrogates (which RFC 8785 refuses)
TEXT = st.text(st.characters(codec=None, categories=None), max_size=12)
NUMBERS = (st.integers(min_value=-(2**60), max_value=2**60)
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.floats(min_value=-1e-3, max_value=1e-3)  # the exponent's border at small values
           | st.floats(min_value=1e14, max_value=1e22)  # ... and at large ones
           | st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.1, 1e-7, 1e-6, 1e-5, 1e16, 1e21, 2.0**53, 2**53 - 1, 2**53,
                              -(2**53), 5e-324, 1.7976931348623157e308]))
JSON = st.recursive(st.none() | st.booleans() | NUMBERS | TEXT,
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT, inner, max_size=5),
                    max_leaves=30)


def outcome(write, value: object) -> bytes | type[Exception]:
    try:
        return write(value)  # type: ignore[no-any-return]
    except Exception as exc:  # rfc8785's refusals, and its UnicodeEncodeError for a lone surrogate in a key
        return type(exc)


@settings(max_examples=1500, deadline=None)
@given(JSON)
@example({"b": 1, "a": [1.5, 2.0, -0.0, "é\u2028\x7f\x00\n"], "Z": None, "é": True, "\U0001f600": 1, "\uff61": 2})
@example({"metrics": {"auc": 0.9123456789, "accuracy": 1.0}, "cases": 141})
def test_canonical_is_rfc8785_byte_for_byte(value: object) -> None:
    assert outcome(canonical, value) == outcome(rfc8785.dumps, value)


@pytest.mark.parametrize("value", [math.nan, math.inf, 2**53, -(2**53), {"x": [math.nan]}, "\ud800"])
def test_what_rfc8785_refuses_canonical_refuses(value: object) -> None:
    with pytest.raises(rfc8785.CanonicalizationError):
        canonical(value)


def test_a_plain_message_is_written_by_the_fast_encoder_not_handed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The speed is the point: a message of strings, integers and ordinary floats never reaches rfc8785."""
    def refuse(value: object) -> bytes:
        raise AssertionError(f"handed to rfc8785: {value!r}")

    monkeypatch.setattr(rfc8785, "dumps", refuse)
    assert canonical({"b": [1, 2.5, 3.0], "a": {"s": "x\ny"}}) == b'{"a":{"s":"x\\ny"},"b":[1,2.5,3]}'
