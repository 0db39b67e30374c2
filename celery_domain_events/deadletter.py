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
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .confirm import OutboundMessage, publish_confirmed
from .serialization import CONTENT_TYPE

if TYPE_CHECKING:
    from .extension import DomainEvents

__all__ = ["HEADER_PREFIX", "MAX_HEADERS_BYTES", "FailureReason", "dead_letter_message", "send"]

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
    # Original headers survive (eventversion, traceparent, ...), minus an older failure record.
    kept = {k: v for k, v in (headers or {}).items() if not str(k).startswith(HEADER_PREFIX)}
    size = sum(len(str(k)) + len(str(v)) for k, v in {**kept, **failure}.items())
    if size > MAX_HEADERS_BYTES:
        failure[HEADER_PREFIX + "traceback"] = _truncate(traceback, _SHORT)
        kept = {k: v for k, v in kept.items() if len(str(v)) < _SHORT}
    props = {k: v for k, v in (properties or {}).items() if v is not None}
    return OutboundMessage(
        body=body,
        exchange="",
        routing_key=queue + ".dlq",
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
    spec = ext.handler_for_queue(message.routing_key.removesuffix(".dlq"))
    declare = [ext.dead_letter_queue(spec)] if spec is not None else []
    publish_confirmed(
        lambda: ext.app.pool.acquire(block=True),
        [message],
        timeout=ext.settings.confirm_timeout,
        policy=ext.settings.publish_retry_policy,
        declare=declare,
    )
    log.warning(
        "Dead-lettered event %s to %s: %s %s",
        message.properties.get("message_id", "?"),
        message.routing_key,
        message.headers.get(HEADER_PREFIX + "reason"),
        message.headers.get(HEADER_PREFIX + "exception"),
    )
