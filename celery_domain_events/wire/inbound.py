"""The untrusted side of the wire: what a worker checks before a delivery becomes a task.

Anyone who can publish to the events exchange can put any bytes, properties and headers on a
handler queue. This module runs on the worker's main thread, once per delivery, and either
returns an :class:`Inbound` (a CloudEvent worth handing to the pool) or raises
:class:`~celery_domain_events.exceptions.EventDecodeError` with the reason it is poison. It
never executes anything from the message, never recurses without bound, and reads at most
``max_bytes`` of body:

* a ``task`` header (a Celery task message) is poison: a handler queue carries CloudEvents
  only, so no message can name a task, a callback, a chain or a chord to run;
* the content type must be JSON (pickle and every other serializer are never decoded);
* the body must fit ``domain_events_max_event_bytes``, be UTF-8, parse as JSON (no ``NaN``)
  nested at most :data:`~.envelope.MAX_JSON_DEPTH` levels, and be an object with a
  non-empty string ``id`` and ``type``;
* application headers may nest at most :data:`MAX_HEADER_DEPTH` tables deep.

A binary-mode CloudEvent (attributes in ``ce-`` headers, data in the body, see
:mod:`.binary`) gets the same checks, then becomes the equivalent structured envelope:
:attr:`Inbound.text` is that envelope, :attr:`Inbound.body` the original body, which retries
and dead letters re-publish.

The full CloudEvents validation of the envelope and the event model runs in the pool
(:mod:`celery_domain_events.consuming.task`), where a failure dead-letters the event as poison
too.

Retry bookkeeping (:data:`RETRIES_HEADER`, :data:`RETRY_AT_HEADER`) is read only from
deliveries that came through the service's own retry exchange (or RabbitMQ's delayed-delivery
exchanges that forward to it); on a message published to the events exchange these headers
mean nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from kombu.message import Message
from pydantic_core import from_json

from celery_domain_events._compat import UNDECODABLE_HEADER
from celery_domain_events.exceptions import EventDecodeError
from celery_domain_events.wire import binary
from celery_domain_events.wire.envelope import JSON_CONTENT_TYPES, json_error

__all__ = [
    "DELAYED_EXCHANGE_PREFIX",
    "KEPT_PROPERTIES",
    "MAX_HEADER_DEPTH",
    "ORIGIN_EXCHANGE_HEADER",
    "ORIGIN_ROUTING_KEY_HEADER",
    "RETRIES_HEADER",
    "RETRY_AT_HEADER",
    "Inbound",
    "bounded_copy",
    "check",
    "raw_body",
    "summary",
]

#: Retries already made, on a retry the worker published (an AMQP integer header).
RETRIES_HEADER = "x-retries"
#: When a retry is due, in seconds since the epoch (classic queues: the worker holds it).
RETRY_AT_HEADER = "x-retry-at"
#: Where a retried or replayed event was first published: exchange and routing key.
ORIGIN_EXCHANGE_HEADER = "x-original-exchange"
ORIGIN_ROUTING_KEY_HEADER = "x-original-routing-key"
#: The AMQP properties an event keeps through retries, dead letters and replays.
KEPT_PROPERTIES = ("message_id", "type", "timestamp", "app_id", "correlation_id", "priority")
#: Prefix of the exchanges of RabbitMQ native delayed delivery (quorum-queue retries).
DELAYED_EXCHANGE_PREFIX = "celery_delayed_"
#: Deepest nesting of AMQP tables and arrays in application headers.
MAX_HEADER_DEPTH = 8
_MAX_RETRIES = 1_000_000
_MAX_DIGITS = 9
# Untrusted text shown in Flower and logs is cut to this many characters.
_SHOWN = 120


# Not frozen: a frozen dataclass sets each field through object.__setattr__, and one is made
# for every delivery. Nothing changes an Inbound once check() returned it.
@dataclass(slots=True)
class Inbound:
    """A delivery that passed the main-thread checks; the pool validates the rest."""

    #: The structured envelope as text (UTF-8 JSON): the body, or a binary-mode event's
    #: attributes and data.
    text: str
    #: The CloudEvents ``id``: the delivery's identity (task ids derive from it).
    event_id: str
    #: The CloudEvents ``type``.
    event_type: str
    #: The ``eventversion`` extension as sent (unvalidated; for display only).
    version: Any
    #: The CloudEvents ``source`` (unvalidated; for display only).
    source: Any
    #: Retries already made (0 unless this is one of our retries).
    retries: int
    #: When the attempt is due (epoch seconds), if it is a delayed retry still in the future.
    due: float | None
    #: The exchange and routing key the event was first published with.
    exchange: str
    routing_key: str
    #: The application headers, copied (bounded depth).
    headers: dict[str, Any]
    #: A binary-mode event's original body (its data) as text; None in structured mode,
    #: where :attr:`text` is the body.
    body: str | None = None
    #: The JSON object :attr:`text` parses to, in structured mode (None in binary mode).
    parsed: dict[str, Any] | None = None


def raw_body(body: Any, content_encoding: str | None) -> bytes:
    """Return a message body as the bytes that were on the wire.

    py-amqp decodes a body to ``str`` when its ``content_encoding`` names a codec; encoding it
    back with the same codec restores the exact bytes. A codec Python does not know leaves
    the body as bytes.
    """
    if isinstance(body, str):
        try:
            return body.encode(content_encoding or "utf-8")
        except (LookupError, UnicodeError):  # an unknown codec, or one that cannot round-trip
            return body.encode("utf-8", "surrogatepass")
    return bytes(body or b"")


def _media_type(content_type: Any) -> str:
    if not isinstance(content_type, str):
        return ""
    media, *params = content_type.split(";")
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in (
            "utf-8",
            "utf8",
        ):
            return content_type  # a charset other than UTF-8 is not JSON as RFC 8259 defines it
    return media.strip().lower()


def _text(message: Message, max_bytes: int, *, structured: bool = True) -> str:
    content_type = message.content_type
    media = content_type if content_type in JSON_CONTENT_TYPES else _media_type(content_type)
    if structured and media not in JSON_CONTENT_TYPES:
        raise EventDecodeError(
            f"content type {str(message.content_type)[:_SHOWN]!r} is not accepted; events are "
            f"JSON ({', '.join(sorted(JSON_CONTENT_TYPES))})"
        )
    body: Any = message.body
    encoding = str(message.content_encoding or "utf-8").lower()
    if isinstance(body, str) and encoding in ("utf-8", "utf8"):
        text = body
        size = len(text)  # characters; a quick bound, exact bytes below if close
        if size * 4 > max_bytes:
            size = len(text.encode("utf-8", "surrogatepass"))
    else:
        raw = raw_body(body, encoding)
        size = len(raw)
        if size <= max_bytes:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise EventDecodeError(f"body is not UTF-8: {exc}") from exc
    if size > max_bytes:
        raise EventDecodeError(
            f"body is {size} bytes, over domain_events_max_event_bytes={max_bytes}"
        )
    return text


def _structured(message: Message, max_bytes: int) -> tuple[str, dict[str, Any]]:
    text = _text(message, max_bytes)
    try:
        envelope = from_json(text, allow_inf_nan=False)
    except (ValueError, TypeError) as exc:  # TypeError: a str with a lone surrogate
        raise EventDecodeError(json_error(text, exc)) from exc
    if not isinstance(envelope, dict):
        raise EventDecodeError(f"body must be a JSON object, got {type(envelope).__name__}")
    event_id = envelope.get("id")
    event_type = envelope.get("type")
    if not isinstance(event_id, str) or not event_id:
        raise EventDecodeError("not a CloudEvents envelope: 'id' must be a non-empty string")
    if not isinstance(event_type, str) or not event_type:
        raise EventDecodeError("not a CloudEvents envelope: 'type' must be a non-empty string")
    return text, envelope


def bounded_copy(value: Any, depth: int = 0) -> Any:
    """Copy an AMQP table or array, refusing one nested :data:`MAX_HEADER_DEPTH` deep.

    Raises:
        EventDecodeError: ``value`` nests too deep.
    """
    if isinstance(value, Mapping):
        if depth >= MAX_HEADER_DEPTH:
            raise EventDecodeError(f"headers nest deeper than {MAX_HEADER_DEPTH} levels")
        return {str(k): bounded_copy(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        if depth >= MAX_HEADER_DEPTH:
            raise EventDecodeError(f"headers nest deeper than {MAX_HEADER_DEPTH} levels")
        return [bounded_copy(v, depth + 1) for v in value]
    return value


def _trusted(exchange: str, retry_exchanges: Collection[str]) -> bool:
    return exchange in retry_exchanges or exchange.startswith(DELAYED_EXCHANGE_PREFIX)


def _retry_state(headers: Mapping[str, Any], max_delay: float) -> tuple[int, float | None]:
    retries = headers.get(RETRIES_HEADER, 0)
    retries = retries if type(retries) is int and 0 <= retries <= _MAX_RETRIES else 0
    due = headers.get(RETRY_AT_HEADER)
    if not isinstance(due, int | float) or isinstance(due, bool) or not math.isfinite(due):
        return retries, None
    now = time.time()
    if due <= now:
        return retries, None
    # Never hold a delivery longer than the handler's own policy could have asked for.
    return retries, min(float(due), now + max_delay)


def check(
    message: Message,
    *,
    max_bytes: int,
    retry_exchanges: Collection[str] = (),
    max_delay: float = 0.0,
) -> Inbound:
    """Check one delivery from a handler queue; see the module docstring.

    Args:
        message: the delivery.
        max_bytes: the largest body accepted.
        retry_exchanges: exchanges whose deliveries are our own retries and replays.
        max_delay: the longest retry delay the handler's policy allows, in seconds.

    Raises:
        EventDecodeError: the delivery is poison; the message says why.
    """
    raw_headers = message.headers or {}
    if "task" in raw_headers:
        raise EventDecodeError(
            f"a Celery task message (task {str(raw_headers['task'])[:_SHOWN]!r}) on an event "
            "queue; handler queues take CloudEvents only and never run a task from a message"
        )
    if UNDECODABLE_HEADER in raw_headers:
        raise EventDecodeError(
            f"AMQP headers could not be decoded: {str(raw_headers[UNDECODABLE_HEADER])[:_SHOWN]}"
        )
    headers = bounded_copy(raw_headers) if raw_headers else {}
    body: str | None = None
    parsed: dict[str, Any] | None = None
    if binary.is_binary(message.content_type, headers):
        body = _text(message, max_bytes, structured=False)
        text, envelope = binary.to_structured(body, message.content_type, headers)
    else:
        try:
            text, envelope = _structured(message, max_bytes)
        except EventDecodeError as exc:
            if binary.has_attribute_headers(headers):
                raise EventDecodeError(
                    f"{exc} (its ce- headers have no ce-specversion, so it is not read as a "
                    "binary-mode CloudEvent)"
                ) from exc
            raise
        parsed = envelope
    event_id = envelope["id"]
    event_type = envelope["type"]
    delivery_info = message.delivery_info or {}
    exchange = str(delivery_info.get("exchange") or "")
    routing_key = str(delivery_info.get("routing_key") or "")
    retries, due = 0, None
    if _trusted(exchange, retry_exchanges):
        retries, due = _retry_state(headers, max_delay)
        exchange = str(headers.get(ORIGIN_EXCHANGE_HEADER, exchange))
        routing_key = str(headers.get(ORIGIN_ROUTING_KEY_HEADER, routing_key))
    return Inbound(
        text=text,
        event_id=event_id,
        event_type=event_type,
        version=_version(envelope.get("eventversion", 1)),
        source=envelope.get("source"),
        retries=retries,
        due=due,
        exchange=exchange,
        routing_key=routing_key,
        headers=headers,
        body=body,
        parsed=parsed,
    )


def _version(value: Any) -> Any:
    # Binary mode carries every attribute as a string: show ce-eventversion "2" as 2.
    if (
        isinstance(value, str)
        and 0 < len(value) <= _MAX_DIGITS
        and value.isascii()
        and value.isdigit()
    ):
        return int(value)
    return value


def summary(inbound: Inbound) -> str:
    """What Flower and ``celery events`` show of a handler run: never the event's data."""
    # repr() of {"event": ..., "version": ..., "id": ..., "source": ...}, without the dict.
    version = inbound.version if type(inbound.version) is int else 1
    return (
        f"{{'event': {inbound.event_type[:_SHOWN]!r}, 'version': {version!r}, "
        f"'id': {inbound.event_id[:_SHOWN]!r}, 'source': {str(inbound.source)[:_SHOWN]!r}}}"
    )
