"""Canaries for the py-amqp details behind celery_domain_events._compat.

If an upgrade changes one of them, these fail before a worker does: the hardening would then
silently stop applying, or py-amqp may have fixed the problem itself (then drop the patch).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest
from amqp import serialization
from amqp.basic_message import Message as AmqpMessage

from celery_domain_events import _compat

from .hostile import FarFuture, deep_recursion, nested


def encoded_properties(**properties: Any) -> bytes:
    with deep_recursion():
        raw = bytes(AmqpMessage(**properties)._serialize_properties())
    return raw.replace(b"\x01\x02\x03", b"\xff\xfe\xfd")


POISON = {
    "deep-headers": {"application_headers": {"nest": nested(5_000)}},
    "timestamp-overflow": {"application_headers": {"t": FarFuture(2000, 1, 1)}},
    "nested-timestamp": {"application_headers": {"x": {"t": FarFuture(2000, 1, 1)}}},
    # b"\x01\x02\x03" is replaced by bytes that are not UTF-8 once encoded (see below).
    "not-utf8-property": {"correlation_id": "\x01\x02\x03", "content_type": "application/json"},
}


def original_decoder() -> Any:
    assert _compat._original_decode_properties is not None
    return _compat._original_decode_properties


@pytest.fixture(autouse=True)
def hardened() -> None:
    _compat.harden_amqp_decoder()


def test_py_amqp_still_looks_up_what_we_replace() -> None:
    assert serialization._read_item is _compat._read_item_bounded  # type: ignore[attr-defined]
    basic = serialization.Basic.CLASS_ID
    assert serialization.PROPERTY_CLASSES[basic] is _compat._decode_properties_safely
    _compat.harden_amqp_decoder()  # idempotent
    assert _compat._original_read_item is not _compat._read_item_bounded


@pytest.mark.parametrize("case", list(POISON))
def test_py_amqp_alone_fails_on_these_properties(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reason for the patch: without it each raises inside the connection's frame handler.
    raw = encoded_properties(**POISON[case])
    monkeypatch.setattr(serialization, "_read_item", _compat._original_read_item)
    with pytest.raises((RecursionError, OverflowError, ValueError, OSError, UnicodeDecodeError)):
        original_decoder()(raw, 0)


@pytest.mark.parametrize("case", list(POISON))
def test_hardened_decoder_delivers_them_marked(case: str) -> None:
    raw = encoded_properties(**POISON[case])
    properties, _ = serialization.PROPERTY_CLASSES[serialization.Basic.CLASS_ID](raw, 0)
    headers = properties["application_headers"]
    if case == "deep-headers":
        # Decoded to the depth limit; deeper levels stay raw bytes (refused later as too deep).
        value, levels = headers["nest"], 0
        while isinstance(value, dict):
            value, levels = value["a"], levels + 1
        assert isinstance(value, bytes)
        assert levels == _compat.MAX_DECODED_TABLE_DEPTH
    else:
        assert _compat.UNDECODABLE_HEADER in headers
    if case == "not-utf8-property":
        assert properties["correlation_id"] == "\ufffd\ufffd\ufffd"
        assert properties["content_type"] == "application/json"


def test_ordinary_properties_decode_unchanged() -> None:
    props = {
        "content_type": "application/cloudevents+json",
        "content_encoding": "utf-8",
        "application_headers": {"a": 1, "b": "x", "c": {"d": [1, 2]}, "t": datetime(2026, 1, 1)},
        "delivery_mode": 2,
        "priority": 3,
        "message_id": "m",
        "timestamp": int(datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()),
        "type": "user.created",
        "app_id": "shop",
    }
    raw = encoded_properties(**props)
    hardened = serialization.PROPERTY_CLASSES[serialization.Basic.CLASS_ID](raw, 0)
    assert hardened == original_decoder()(raw, 0)
    assert hardened[0]["application_headers"]["c"] == {"d": [1, 2]}


def test_encoded_table_size_is_py_amqps_own() -> None:
    table = {"a": "x" * 100, "b": {"c": 1}}
    assert _compat.encoded_table_size(table) == len(serialization.dumps("F", (table,)))
    assert _compat.encoded_table_size(table) > 100
