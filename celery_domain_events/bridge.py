"""Turn a raw event delivery into a Celery task message, in the worker, without a broker hop.

Events arrive on a handler queue as plain CloudEvents JSON, with no Celery headers. The worker
wraps each one into a protocol-2 task message for that handler's task and hands it to Celery's
own task handler (``Consumer.create_task_handler``). The wrapper shares the delivery's channel and
delivery tag, so acking the task acks the event: one message on the wire, one ack.

The task id is ``uuid5(event id, handler)``: the same event and handler always give the same
id, which handlers can use as an idempotency key (redeliveries keep it; Celery retries too).

The wrapper's body is already Python (``content_type`` None), which Celery's tracer takes as
decoded: nothing is serialized to JSON and parsed back on the way to the pool (prefork pickles
the request to its child process, as it does for every task). This runs once per delivery on
the worker's main thread, so it avoids per-call allocations where it can.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from kombu.message import Message

from .exceptions import EventDecodeError
from .registry import HandlerSpec
from .serialization import JSON_CONTENT_TYPES

__all__ = [
    "TASK_ID_NAMESPACE",
    "event_text",
    "raw_body",
    "task_id_for",
    "task_meta",
    "to_task_message",
]

#: Namespace of the deterministic handler task ids.
TASK_ID_NAMESPACE = uuid.UUID("6f1c1f0e-5a2b-4c69-9d51-6b8cf1f2a0de")
_NAMESPACE_BYTES = TASK_ID_NAMESPACE.bytes
_KEPT_PROPERTIES = ("message_id", "type", "timestamp", "app_id", "correlation_id", "priority")
# Values that JSON (a retry re-publishes the kwargs) and pickle (prefork) both take as they are.
_PLAIN = frozenset({str, int, float, bool, type(None)})


def task_id_for(event_id: str, handler: str) -> str:
    """Return the task id of ``handler`` running event ``event_id``.

    This is ``str(uuid.uuid5(TASK_ID_NAMESPACE, f"{event_id}/{handler}"))``, built without
    the ``UUID`` object, which costs more than the hash on every delivery.
    """
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + f"{event_id}/{handler}".encode()).digest())
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest[:16].hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _json_safe(value: Any) -> Any:
    if type(value) in _PLAIN:
        return value
    if isinstance(value, datetime):
        return int(value.timestamp())
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return str(value)  # Decimal and whatever else an AMQP table may carry


class _DecodedTaskMessage(Message):
    """A task message whose body is the ``(args, kwargs, embed)`` tuple itself."""

    def _decode(self) -> Any:
        return self.body


def _peek_event_id(text: str) -> str:
    # Publishers other than ours may leave message_id unset; the envelope always has an id.
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise EventDecodeError(f"body is not valid JSON: {exc}") from exc
    event_id = raw.get("id") if isinstance(raw, dict) else None
    if not isinstance(event_id, str) or not event_id:
        raise EventDecodeError("the envelope has no 'id'")
    return event_id


def raw_body(body: Any, content_encoding: str | None) -> bytes:
    """Return a message body as the bytes that were on the wire.

    py-amqp decodes a body to ``str`` when its ``content_encoding`` names a codec; encoding it
    back with the same codec restores the exact bytes.
    """
    if isinstance(body, str):
        return body.encode(content_encoding or "utf-8")
    return bytes(body or b"")


def event_text(message: Message) -> str:
    """Return the body of an event delivery as text.

    Raises:
        EventDecodeError: the content type is not JSON (pickle is never decoded) or the body
            is not UTF-8.
    """
    content_type = message.content_type
    if content_type not in JSON_CONTENT_TYPES:
        raise EventDecodeError(
            f"content type {content_type!r} is not accepted; events are JSON "
            f"({', '.join(sorted(JSON_CONTENT_TYPES))})"
        )
    body: Any = message.body
    encoding = (message.content_encoding or "utf-8").lower()
    if isinstance(body, str) and encoding in ("utf-8", "utf8"):
        return body
    try:
        return raw_body(body, encoding).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EventDecodeError(f"body is not UTF-8: {exc}") from exc


def task_meta(
    *,
    queue: str,
    exchange: str,
    routing_key: str,
    content_type: str | None,
    content_encoding: str | None,
    properties: Mapping[str, Any],
    headers: Mapping[Any, Any],
) -> dict[str, Any]:
    """Return the ``meta`` task kwarg: what a dead letter needs to rebuild the delivery.

    Every value is JSON-safe: a retry re-publishes the task's kwargs as JSON.
    """
    return {
        "queue": queue,
        "exchange": exchange,
        "routing_key": routing_key,
        "content_type": content_type,
        "content_encoding": content_encoding,
        "properties": {k: _json_safe(properties[k]) for k in _KEPT_PROPERTIES if k in properties},
        "headers": {str(k): _json_safe(v) for k, v in headers.items()},
    }


def to_task_message(message: Message, spec: HandlerSpec, queue: str) -> Message:
    """Wrap an event delivery on ``queue`` into a task message for ``spec``'s task.

    Raises:
        EventDecodeError: the delivery cannot be an event (see :func:`event_text`).
    """
    text = event_text(message)
    properties = message.properties or {}
    delivery_info = message.delivery_info or {}
    event_id = properties.get("message_id") or _peek_event_id(text)
    routing_key = delivery_info.get("routing_key", "")
    task_id = task_id_for(str(event_id), spec.name)
    headers = message.headers or {}
    meta = task_meta(
        queue=queue,
        exchange=delivery_info.get("exchange", ""),
        routing_key=routing_key,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        properties=properties,
        headers=headers,
    )
    source = properties.get("app_id") or "?"
    summary = f"{{'event': {routing_key!r}, 'id': {str(event_id)!r}, 'source': {source!r}}}"
    task_headers: dict[str, Any] = {
        "lang": "py",
        "task": spec.task_name,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "()",
        "kwargsrepr": summary,
        "origin": source,
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    return _DecodedTaskMessage(
        body=([], {"raw_event": text, "meta": meta}, embed),  # type: ignore[arg-type]
        delivery_tag=message.delivery_tag,
        # None tells Celery's tracer the body is decoded (celery.app.trace.fast_trace_task).
        content_type=None,
        content_encoding=None,
        delivery_info=delivery_info,
        properties={
            "correlation_id": task_id,
            "reply_to": "",
            **({"priority": properties["priority"]} if "priority" in properties else {}),
        },
        headers=task_headers,
        channel=message.channel,
    )
