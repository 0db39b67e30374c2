"""Dead letters: the original event body plus a failure record in AMQP headers.

::

    billing.on_user_created ──(retries spent / poison / RejectEvent)──► billing.on_user_created.dlq
      body:    the event exactly as published (byte-identical)
      headers: the publisher's own (up to 64 KiB; larger ones named in -dropped-headers), and
               x-failure-reason, -exception, -message, -traceback, -attempts, -handler,
               -queue, -exchange, -routing-key, -time, -task-id, -key   (under 16 KiB)

The record is published with a publisher confirm *before* the original delivery is acked, so a
crash in between, or a confirm that times out (the delivery is then requeued and dead-lettered
again), can only duplicate a dead letter, never lose the event. Copies of one failure share
``x-failure-key`` (handler queue, event id, attempt): the CLI lists them once and a replay or
purge removes them together. The headers are
bounded so a dead letter always fits one AMQP frame: a message is never dropped because its
failure record would not fit. Retries are counted from the worker's own retry header
(``x-retries``, trusted only on the retry exchange), never from ``x-death``.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from celery_domain_events._compat import encoded_table_size

from . import binary
from .envelope import CONTENT_TYPE, peek_id
from .inbound import (
    KEPT_PROPERTIES,
    ORIGIN_EXCHANGE_HEADER,
    ORIGIN_ROUTING_KEY_HEADER,
    RETRIES_HEADER,
    RETRY_AT_HEADER,
    bounded_copy,
    raw_body,
)
from .message import OutboundMessage
from .topology import DLQ_SUFFIX

__all__ = [
    "HEADER_PREFIX",
    "MAX_HEADERS_BYTES",
    "MAX_KEPT_HEADERS_BYTES",
    "DeadLetter",
    "FailureReason",
    "dead_letter_message",
    "failure_key",
    "letter_from",
]

#: Prefix of the failure-record headers.
HEADER_PREFIX = "x-failure-"
#: Upper bound of all failure headers together; RabbitMQ's frame limits make larger ones risky.
MAX_HEADERS_BYTES = 16 * 1024
#: Upper bound of the publisher's own headers a dead letter keeps (larger ones are dropped
#: and named in ``x-failure-dropped-headers``).
MAX_KEPT_HEADERS_BYTES = 64 * 1024
_SHOW_NAME = 64
_RETRY_HEADERS = frozenset(
    {RETRIES_HEADER, RETRY_AT_HEADER, ORIGIN_EXCHANGE_HEADER, ORIGIN_ROUTING_KEY_HEADER}
)
_MAX_MESSAGE = 2 * 1024
_MAX_TRACEBACK = 10 * 1024
_SHORT = 1024
# Bodies larger than this are not parsed just to find their id (a dead letter may be huge).
_PEEK_BYTES = 4 * 1024 * 1024


@enum.unique
class FailureReason(str, enum.Enum):
    """Why an event was dead-lettered."""

    #: The handler kept failing until its retry policy ran out.
    RETRIES_EXHAUSTED = "retries-exhausted"
    #: The handler raised an error that is never retried (or ``RejectEvent``).
    REJECTED = "rejected"
    #: The message is not a valid event (bad JSON, content type, schema, version).
    POISON = "poison"


def _truncate(text: str, limit: int) -> str:
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    # Keep the tail of tracebacks: the innermost frames say where it failed.
    return "...[truncated]..." + data[-limit:].decode("utf-8", "ignore")


def _text_of(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a handler's exception whose __str__ fails must not lose the event
        return f"<{type(exc).__name__}: str() failed>"


def _header_size(key: str, value: Any) -> int | None:
    # None: the header cannot travel again (nested deeper than a handler queue accepts, or not
    # encodable).
    try:
        bounded_copy({key: value})
        return encoded_table_size({key: value})
    except Exception:
        return None


def _kept_headers(headers: Mapping[Any, Any]) -> tuple[dict[str, Any], list[str]]:
    """Return the publisher's headers a dead letter keeps, and the names of those dropped.

    A dead letter must always be publishable: the headers it keeps stay under
    :data:`MAX_KEPT_HEADERS_BYTES`, so that with the failure record they fit in one AMQP frame
    (RabbitMQ's ``frame_max`` is 128 KiB by default). Larger headers go first.
    """
    if not headers:
        return {}, []
    sized: list[tuple[int, str, Any]] = []
    dropped: list[str] = []
    for key, value in headers.items():
        name = str(key)
        if name.startswith(HEADER_PREFIX) or name in _RETRY_HEADERS:
            continue  # an older failure record; retry bookkeeping (a replay starts afresh)
        size = _header_size(name, value)
        if size is None:
            dropped.append(name)
        else:
            sized.append((size, name, value))
    total = sum(size for size, _, _ in sized)
    for size, name, _ in sorted(sized, key=lambda item: item[0], reverse=True):
        if total <= MAX_KEPT_HEADERS_BYTES:
            break
        total -= size
        dropped.append(name)
    gone = set(dropped)
    kept = {name: value for _, name, value in sized if name not in gone}
    return kept, [name[:_SHOW_NAME] for name in dropped]


def failure_key(queue: str, event_id: str, attempts: int) -> str:
    """The key copies of one failure share: the same event, handler queue and attempt."""
    text = f"{queue}\0{event_id}\0{attempts}".encode("utf-8", "surrogatepass")
    return hashlib.blake2b(text, digest_size=16).hexdigest()


def _id_of(
    properties: Mapping[str, Any] | None,
    body: bytes,
    content_type: str | None = None,
    headers: Mapping[str, Any] | None = None,
) -> str:
    message_id = (properties or {}).get("message_id")
    if isinstance(message_id, str) and message_id:
        return message_id
    found = _body_id(body, content_type, headers)
    return found or "sha256:" + hashlib.sha256(body).hexdigest()


def _body_id(
    body: bytes, content_type: str | None, headers: Mapping[str, Any] | None
) -> str | None:
    # A binary-mode event's id is its ce-id header: its body is the data, whose "id" is not it.
    if headers and binary.is_binary(content_type, headers):
        return binary.event_id(headers)
    return peek_id(body) if len(body) <= _PEEK_BYTES else None


def dead_letter_message(
    *,
    body: bytes,
    queue: str,
    handler: str,
    reason: FailureReason,
    exc: BaseException,
    traceback: str = "",
    attempts: int = 1,
    exchange: str = "",
    routing_key: str = "",
    task_id: str | None = None,
    content_type: str | None = CONTENT_TYPE,
    content_encoding: str | None = "utf-8",
    properties: Mapping[str, Any] | None = None,
    headers: Mapping[str, Any] | None = None,
) -> OutboundMessage:
    """Build the dead letter of one event for ``<queue>.dlq``; the body is left untouched."""
    record: dict[str, Any] = {
        "reason": reason.value,
        "exception": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": _truncate(_text_of(exc), _MAX_MESSAGE),
        "traceback": _truncate(traceback, _MAX_TRACEBACK),
        "attempts": attempts,
        "handler": handler,
        "queue": queue,
        "exchange": exchange,
        "routing-key": routing_key,
        "time": datetime.now(timezone.utc).isoformat(),
        "task-id": task_id or "",
        "key": failure_key(queue, _id_of(properties, body, content_type, headers), attempts),
    }
    failure = {HEADER_PREFIX + k: v for k, v in record.items()}
    kept, dropped = _kept_headers(headers or {})
    if dropped:
        failure[HEADER_PREFIX + "dropped-headers"] = _truncate(", ".join(dropped), _SHORT)
    props = {k: v for k, v in (properties or {}).items() if v is not None}
    return OutboundMessage(
        body=body,
        exchange="",
        routing_key=queue + DLQ_SUFFIX,
        content_type=content_type or "application/octet-stream",
        content_encoding=content_encoding or "binary",
        properties=props,
        headers={**kept, **failure},
        mandatory=True,
        must_route=True,
    )


@dataclass(frozen=True)
class DeadLetter:
    """One message of a dead-letter queue, as the CLI lists, shows and replays it."""

    #: The dead-letter queue it was read from (``<handler queue>.dlq``).
    queue: str
    body: bytes
    content_type: str | None
    content_encoding: str | None
    properties: dict[str, Any]
    headers: dict[str, Any]
    #: How many messages of the queue are copies of this failure (same ``x-failure-key``).
    copies: int = field(default=1, compare=False)

    @property
    def key(self) -> str | None:
        """The failure key its copies share; None for the broker's own dead letters."""
        key = self.failure("key")
        return str(key) if key else None

    @property
    def handler_queue(self) -> str:
        """The handler queue a replay goes back to."""
        return self.queue.removesuffix(DLQ_SUFFIX)

    def failure(self, key: str, default: Any = None) -> Any:
        """Return the ``x-failure-<key>`` header."""
        return self.headers.get(HEADER_PREFIX + key, default)

    @property
    def event_id(self) -> str:
        """The event id: the CloudEvents ``id`` (``message_id``, else the body's or ``ce-id``)."""
        message_id = self.properties.get("message_id")
        if message_id:
            return str(message_id)
        return _body_id(self.body, self.content_type, self.headers) or "?"

    @property
    def event_name(self) -> str:
        """The event's name (its routing key, unless keys are petisco-style)."""
        death = (self.headers.get("x-death") or [{}])[0]
        keys = death.get("routing-keys") or [None]
        return str(self.properties.get("type") or self.failure("routing-key") or keys[0] or "?")

    @property
    def reason(self) -> str:
        """Why it was dead-lettered; broker dead letters (delivery limit) say ``broker:<why>``."""
        if self.failure("reason"):
            return str(self.failure("reason"))
        death = (self.headers.get("x-death") or [{}])[0]
        return f"broker:{death.get('reason', '?')}"

    def replay_message(self, retry_exchange: str) -> OutboundMessage:
        """Build the message that sends this event back to its handler queue, and only there."""
        headers = {
            k: v
            for k, v in self.headers.items()
            if not str(k).startswith(HEADER_PREFIX) and k != "x-death" and k not in _RETRY_HEADERS
        }
        headers["x-replayed"] = int(self.headers.get("x-replayed", 0)) + 1
        headers[ORIGIN_EXCHANGE_HEADER] = str(self.failure("exchange") or "")
        headers[ORIGIN_ROUTING_KEY_HEADER] = str(self.failure("routing-key") or self.event_name)
        return OutboundMessage(
            body=self.body,
            exchange=retry_exchange,
            routing_key=self.handler_queue,
            content_type=self.content_type or "application/octet-stream",
            content_encoding=self.content_encoding or "binary",
            properties={k: v for k, v in self.properties.items() if k in KEPT_PROPERTIES},
            headers=headers,
            mandatory=True,
            must_route=True,
        )


def letter_from(queue: str, raw: Any) -> DeadLetter:
    """Read a message fetched from dead-letter queue ``queue`` (py-amqp's ``basic_get``)."""
    props = dict(raw.properties)
    headers = dict(props.pop("application_headers", None) or {})
    encoding = props.pop("content_encoding", None)
    return DeadLetter(
        queue=queue,
        body=raw_body(raw.body, encoding),
        content_type=props.pop("content_type", None),
        content_encoding=encoding,
        properties=props,
        headers=headers,
    )
