"""CloudEvents *binary content mode* on RabbitMQ: attributes in ``ce-`` headers, data in the body.

The RabbitMQ protocol binding the official SDKs implement (the Python SDK's
``cloudevents.core.bindings.rabbitmq``): each attribute is an application header named
``ce-<attribute>`` (matched case-insensitively), ``datacontenttype`` is the AMQP
``content_type`` property, and the body is the event's data alone. A message is in binary mode
when it has a ``ce-specversion`` header and its content type does not start with
``application/cloudevents`` (that is structured mode, whatever the headers say).

A worker turns a binary-mode delivery into the equivalent structured envelope
(:func:`to_structured`), so validation, upcasting and handlers see one format; retries and dead
letters still re-publish the original body and headers. Only JSON data is accepted
(``application/json``, ``*/json``, ``*/*+json``, or no content type, which CloudEvents reads as
``application/json``); any other data content type is poison.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from pydantic_core import from_json, to_json

from celery_domain_events.events import METADATA_FIELDS, AnyEvent, GenericEvent
from celery_domain_events.exceptions import EventDecodeError

from .envelope import is_json_media_type, json_error

__all__ = [
    "CE_PREFIX",
    "DATA_CONTENT_TYPE",
    "REQUIRED",
    "SPECVERSION_HEADER",
    "encoder",
    "envelope_text",
    "event_id",
    "has_attribute_headers",
    "is_binary",
    "to_structured",
]

#: Prefix of the headers that carry CloudEvents attributes.
CE_PREFIX = "ce-"
#: The header whose presence marks a binary-mode message.
SPECVERSION_HEADER = "ce-specversion"
#: The content type of the data this library publishes in binary mode.
DATA_CONTENT_TYPE = "application/json"
#: Attributes every CloudEvent has; a binary-mode message without one is poison.
REQUIRED = ("specversion", "id", "source", "type")
_STRUCTURED = "application/cloudevents"
_NAME = re.compile(r"[a-z0-9]+")
_PREFIX_LEN = len(CE_PREFIX)
_SHOWN = 64


def is_binary(content_type: Any, headers: Mapping[Any, Any] | None) -> bool:
    """Whether a message is a binary-mode CloudEvent (see the module docstring)."""
    if not headers:
        return False
    if isinstance(content_type, str) and content_type.lower().startswith(_STRUCTURED):
        return False  # application/cloudevents...: structured mode
    return any(isinstance(key, str) and key.lower() == SPECVERSION_HEADER for key in headers)


def has_attribute_headers(headers: Mapping[Any, Any]) -> bool:
    """Whether any application header is named ``ce-...`` (case-insensitively)."""
    return any(isinstance(key, str) and key[:_PREFIX_LEN].lower() == CE_PREFIX for key in headers)


def event_id(headers: Mapping[Any, Any]) -> str | None:
    """Return the ``ce-id`` header of a binary-mode message, or None."""
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == "ce-id" and isinstance(value, str) and value:
            return value
    return None


def _attributes(content_type: Any, headers: Mapping[Any, Any]) -> dict[str, Any]:
    attributes: dict[str, Any] = {}
    for key, value in headers.items():
        name = str(key).lower()
        if not name.startswith(CE_PREFIX):
            continue
        attribute = name[_PREFIX_LEN:]
        if not _NAME.fullmatch(attribute) or attribute == "data":
            raise EventDecodeError(
                f"header {str(key)[:_SHOWN]!r} does not name a CloudEvents attribute "
                "(ce- and lower-case letters and digits, not data)"
            )
        if attribute in attributes:
            raise EventDecodeError(f"attribute {attribute!r} is given twice in ce- headers")
        if type(value) not in (str, int, bool):
            raise EventDecodeError(
                f"header {str(key)[:_SHOWN]!r} must be a string, integer or boolean, "
                f"got {type(value).__name__}"
            )
        attributes[attribute] = value
    if content_type is not None:  # the content type is datacontenttype (it wins over a header)
        attributes["datacontenttype"] = content_type
    missing = [name for name in REQUIRED if attributes.get(name) in (None, "")]
    if missing:
        raise EventDecodeError(
            "binary-mode CloudEvent without required attribute(s): "
            + ", ".join(CE_PREFIX + name for name in missing)
        )
    for name in ("id", "type"):
        if not isinstance(attributes[name], str):
            raise EventDecodeError(f"header ce-{name} must be a string")
    datacontenttype = attributes.get("datacontenttype")
    if datacontenttype is not None and (
        not isinstance(datacontenttype, str)
        or not is_json_media_type(datacontenttype)
        or not _utf8_charset(datacontenttype)
    ):
        raise EventDecodeError(
            f"binary-mode data of content type {str(datacontenttype)[:_SHOWN]!r} is not "
            "accepted; handlers take JSON data (application/json or */*+json, UTF-8)"
        )
    return attributes


def _utf8_charset(content_type: str) -> bool:
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"').lower() in ("utf-8", "utf8")
    return True


def to_structured(
    body: str, content_type: Any, headers: Mapping[Any, Any]
) -> tuple[str, dict[str, Any]]:
    """Return the structured envelope (JSON text) of a binary-mode event, and its attributes.

    ``body`` is the message body as text (the caller bounded its size and checked it is
    UTF-8). Attribute values are taken as they are (the SDKs send every one as a string;
    the envelope's validation reads ``eventversion`` ``"2"`` as 2).

    Raises:
        EventDecodeError: a required attribute is missing, a ``ce-`` header is not an
            attribute, the data content type is not JSON, or the body is not JSON.
    """
    attributes = _attributes(content_type, headers)
    try:
        head = to_json(attributes).decode("utf-8")
    except ValueError as exc:  # a header string with a lone surrogate
        raise EventDecodeError(f"ce- headers cannot be read as text: {exc}") from exc
    if not body.strip():
        return head, attributes  # no data
    try:
        from_json(body, allow_inf_nan=False)
    except (ValueError, TypeError) as exc:
        raise EventDecodeError(json_error(body, exc)) from exc
    return f'{head[:-1]},"data":{body}}}', attributes


def envelope_text(
    body: bytes, content_type: Any, headers: Mapping[Any, Any] | None
) -> tuple[str, str | None]:
    """Return a message's structured envelope text, and its body as text if in binary mode.

    For messages this library wrote (the test harness's deliveries): no size bound.

    Raises:
        EventDecodeError: as :func:`to_structured`, or the body is not UTF-8.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EventDecodeError(f"body is not UTF-8: {exc}") from exc
    if headers and is_binary(content_type, headers):
        return to_structured(text, content_type, headers)[0], text
    return text, None


# Metadata travels in the attributes (id, time), not in "data".
_NOT_DATA = set(METADATA_FIELDS)


def encoder(
    source: str, **extensions: Any
) -> Callable[[AnyEvent], tuple[dict[str, Any], bytes, str]]:
    """Return ``encode`` for a batch in binary mode: ``event -> (headers, body, id)``.

    The headers are the attributes, every value a string as the SDKs write them
    (``ce-eventversion: "1"``, ``ce-time`` RFC 3339 ending in ``Z``); the body is the data.
    ``datacontenttype`` is the message's content type, :data:`DATA_CONTENT_TYPE`.
    """
    shared = {CE_PREFIX + key: str(value) for key, value in extensions.items() if value is not None}
    base = {SPECVERSION_HEADER: "1.0", "ce-source": source}

    def encode_event(event: AnyEvent) -> tuple[dict[str, Any], bytes, str]:
        if isinstance(event, GenericEvent):
            data = to_json(event.data)
        else:
            data = type(event).__pydantic_serializer__.to_json(event, exclude=_NOT_DATA)
        headers = {
            **base,
            "ce-id": event.event_id,
            "ce-type": event.event_name,
            "ce-eventversion": str(event.event_version),
            "ce-time": to_json(event.occurred_at).decode()[1:-1],
            **shared,
        }
        return headers, data, event.event_id

    return encode_event
