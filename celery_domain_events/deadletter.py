"""Dead letters: the original event body plus a failure record in AMQP headers.

::

    billing.on_user_created ──(retries spent / poison / RejectEvent)──► billing.on_user_created.dlq
      body:    the event exactly as published (byte-identical)
      headers: x-failure-reason, -exception, -message, -traceback, -attempts, -handler,
               -queue, -exchange, -routing-key, -time, -task-id   (all under 16 KiB)

The record is published with a publisher confirm *before* the original delivery is acked, so a
crash in between can only duplicate a dead letter, never lose the event. Retries are counted by
Celery (``request.retries``), never from ``x-death``.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from kombu import Connection
from kombu.common import ignore_errors

from .bridge import raw_body
from .confirm import OutboundMessage, publish_confirmed
from .serialization import CONTENT_TYPE
from .topology import DLQ_SUFFIX, RETRY_SUFFIX

if TYPE_CHECKING:
    from .extension import DomainEvents

__all__ = [
    "HEADER_PREFIX",
    "MAX_HEADERS_BYTES",
    "DeadLetter",
    "FailureReason",
    "dead_letter_message",
    "depth",
    "process",
    "replay",
    "send",
]

log = logging.getLogger(__name__)

#: Prefix of the failure-record headers.
HEADER_PREFIX = "x-failure-"
#: Upper bound of all failure headers together; RabbitMQ's frame limits make larger ones risky.
MAX_HEADERS_BYTES = 16 * 1024
_MAX_MESSAGE = 2 * 1024
_MAX_TRACEBACK = 10 * 1024
_SHORT = 1024


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
        "message": _truncate(str(exc), _MAX_MESSAGE),
        "traceback": _truncate(traceback, _MAX_TRACEBACK),
        "attempts": attempts,
        "handler": handler,
        "queue": queue,
        "exchange": exchange,
        "routing-key": routing_key,
        "time": datetime.now(timezone.utc).isoformat(),
        "task-id": task_id or "",
    }
    failure = {HEADER_PREFIX + k: v for k, v in record.items()}
    # The publisher's own headers survive (ours send none), minus an older failure record.
    kept = {k: v for k, v in (headers or {}).items() if not str(k).startswith(HEADER_PREFIX)}
    size = sum(len(str(k)) + len(str(v)) for k, v in {**kept, **failure}.items())
    if size > MAX_HEADERS_BYTES:
        failure[HEADER_PREFIX + "traceback"] = _truncate(traceback, _SHORT)
        kept = {k: v for k, v in kept.items() if len(str(v)) < _SHORT}
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


def send(ext: DomainEvents, message: OutboundMessage) -> None:
    """Publish a dead letter and wait for its confirm (declaring the DLQ if needed).

    Raises:
        PublishError: the broker did not confirm within the publish retry policy.
    """
    spec = ext.handler_for_queue(message.routing_key.removesuffix(DLQ_SUFFIX))
    declare = [ext.dead_letter_queue(spec)] if spec is not None else []
    ext.publish([message], declare=declare)
    log.warning(
        "Dead-lettered event %s to %s: %s %s",
        message.properties.get("message_id", "?"),
        message.routing_key,
        message.headers.get(HEADER_PREFIX + "reason"),
        message.headers.get(HEADER_PREFIX + "exception"),
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

    @property
    def handler_queue(self) -> str:
        """The handler queue a replay goes back to."""
        return self.queue.removesuffix(DLQ_SUFFIX)

    def failure(self, key: str, default: Any = None) -> Any:
        """Return the ``x-failure-<key>`` header."""
        return self.headers.get(HEADER_PREFIX + key, default)

    @property
    def event_id(self) -> str:
        """The event id (``message_id``), or ``?`` if the publisher set none."""
        return str(self.properties.get("message_id") or "?")

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
            if not str(k).startswith(HEADER_PREFIX) and k != "x-death"
        }
        headers["x-replayed"] = int(self.headers.get("x-replayed", 0)) + 1
        return OutboundMessage(
            body=self.body,
            exchange=retry_exchange,
            routing_key=self.handler_queue,
            content_type=self.content_type or "application/octet-stream",
            content_encoding=self.content_encoding or "binary",
            properties={k: v for k, v in self.properties.items() if k in _REPLAYED_PROPERTIES},
            headers=headers,
            mandatory=True,
            must_route=True,
        )


_REPLAYED_PROPERTIES = ("message_id", "type", "timestamp", "app_id", "correlation_id", "priority")


def _letter(queue: str, raw: Any) -> DeadLetter:
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


def depth(conn: Connection, queue: str) -> int | None:
    """Return the number of messages in ``queue``, or None if it does not exist."""
    channel: Any = conn.channel()  # transport channel: the stubs only know StdChannel
    try:
        _, count, _ = channel.queue_declare(queue, passive=True)
        return int(count)
    except conn.channel_errors:
        return None
    finally:
        ignore_errors(conn, channel.close)


def process(
    conn: Connection,
    queue: str,
    select: Callable[[DeadLetter], bool] = lambda _: True,
    act: Callable[[DeadLetter], None] | None = None,
    *,
    limit: int | None = None,
) -> list[DeadLetter]:
    """Read the dead letters of ``queue``; ``act`` on the selected ones, then ack them.

    Messages are fetched unacked; those not selected (or all of them, when ``act`` is None,
    as for ``list`` and dry runs) return to the queue in their order when the channel closes.
    If ``act`` raises, the message it failed on is not acked and stays dead-lettered.

    Returns:
        The selected dead letters (at most ``limit``).
    """
    channel: Any = conn.channel()  # transport channel: the stubs only know StdChannel
    selected: list[DeadLetter] = []
    try:
        _, count, _ = channel.queue_declare(queue, passive=True)
        for _ in range(count):
            if limit is not None and len(selected) >= limit:
                break
            raw = channel.basic_get(queue, no_ack=False)
            if raw is None:
                break
            letter = _letter(queue, raw)
            if not select(letter):
                continue
            selected.append(letter)
            if act is not None:
                act(letter)
                channel.basic_ack(raw.delivery_tag)
    finally:
        ignore_errors(conn, channel.close)
    return selected


def replay(ext: DomainEvents, conn: Connection, letter: DeadLetter) -> None:
    """Publish ``letter`` back to its handler queue (confirmed) through the retry exchange."""
    publish_confirmed(
        lambda: nullcontext(conn),
        [letter.replay_message(ext.settings.exchange + RETRY_SUFFIX)],
        timeout=ext.settings.confirm_timeout,
        policy=ext.settings.publish_retry_policy,
    )
    log.info("Replayed event %s to %s", letter.event_id, letter.handler_queue)
