"""Turn a checked event delivery into a Celery task message, in the worker, without a broker hop.

Everything on a handler queue is a CloudEvent (first deliveries, retries and replays alike),
checked by :mod:`..wire.inbound`. The worker wraps each one into a protocol-2 task message for that
handler's task, built here from trusted values only, and hands it to Celery's own task handler
(``Consumer.create_task_handler``). The wrapper shares the delivery's channel and delivery tag,
so acking the task acks the event: one message on the wire, one ack. No field of a message on
the queue becomes a task name, a callback, a chain or a chord.

The task id is ``uuid5(event id, handler)`` from the CloudEvents ``id``: the same event and
handler always give the same id, which handlers can use as an idempotency key (redeliveries,
retries and replays keep it).

The wrapper's body is already Python (``content_type`` None), which Celery's tracer takes as
decoded: nothing is serialized to JSON and parsed back on the way to the pool (prefork pickles
the request to its child process, as it does for every task). This runs once per delivery on
the worker's main thread, so it avoids per-call allocations where it can.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from kombu.message import Message

from celery_domain_events import _compat
from celery_domain_events.registry import HandlerSpec
from celery_domain_events.wire.envelope import parsed_text
from celery_domain_events.wire.inbound import KEPT_PROPERTIES, Inbound, summary

__all__ = [
    "TASK_ID_NAMESPACE",
    "task_id_for",
    "task_meta",
    "to_batch_task_message",
    "to_task_message",
]

#: Namespace of the deterministic handler task ids.
TASK_ID_NAMESPACE = uuid.UUID("6f1c1f0e-5a2b-4c69-9d51-6b8cf1f2a0de")
_NAMESPACE_BYTES = TASK_ID_NAMESPACE.bytes


def task_id_for(event_id: str, handler: str) -> str:
    """Return the task id of ``handler`` running event ``event_id``.

    This is ``str(uuid.uuid5(TASK_ID_NAMESPACE, f"{event_id}/{handler}"))``, built without
    the ``UUID`` object, which costs more than the hash on every delivery, and hashed by
    CPython's own SHA-1 (:func:`~celery_domain_events._compat.sha1`).
    """
    digest = bytearray(_compat.sha1(_NAMESPACE_BYTES + _utf8(f"{event_id}/{handler}")).digest())
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest[:16].hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _utf8(text: str) -> bytes:
    # Any str hashes, even one a non-UTF-8 source left a lone surrogate in.
    return text.encode("utf-8", "surrogatepass")


def _plain(value: Any) -> Any:
    # AMQP properties as a publish takes them back (a timestamp must be an int).
    if isinstance(value, datetime):
        return int(value.replace(tzinfo=value.tzinfo or timezone.utc).timestamp())
    return value


def task_meta(
    *,
    queue: str,
    exchange: str,
    routing_key: str,
    content_type: str | None,
    content_encoding: str | None,
    properties: Mapping[str, Any],
    headers: Mapping[str, Any],
    body: str | None = None,
) -> dict[str, Any]:
    """Return the ``meta`` task kwarg: what a retry or dead letter needs to rebuild the delivery.

    ``body`` is a binary-mode event's original body (``raw_event`` is then the structured
    envelope made of it): retries and dead letters re-publish it, not ``raw_event``. It
    reaches the pool in-process (pickled by prefork), never through the broker.
    """
    meta = {
        "queue": queue,
        "exchange": exchange,
        "routing_key": routing_key,
        "content_type": content_type,
        "content_encoding": content_encoding,
        "properties": {k: _plain(properties[k]) for k in KEPT_PROPERTIES if k in properties},
        "headers": dict(headers),
    }
    if body is not None:
        meta["body"] = body
    return meta


def _meta(message: Message, inbound: Inbound, queue: str) -> dict[str, Any]:
    return task_meta(
        queue=queue,
        exchange=inbound.exchange,
        routing_key=inbound.routing_key,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        properties=message.properties or {},
        headers=inbound.headers,
        body=inbound.body,
    )


def _task_headers(
    spec: HandlerSpec, task_id: str, inbound: Inbound, properties: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "lang": "py",
        "task": spec.task_name,
        "id": task_id,
        "shadow": None,
        "eta": None
        if inbound.due is None
        else datetime.fromtimestamp(inbound.due, timezone.utc).isoformat(),
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": inbound.retries,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "()",
        "kwargsrepr": summary(inbound),
        "origin": str(properties.get("app_id") or inbound.source or "?")[:120],
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }


def _task_properties(task_id: str, properties: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "correlation_id": task_id,
        "reply_to": "",
        **({"priority": properties["priority"]} if "priority" in properties else {}),
    }


def to_task_message(
    message: Message, inbound: Inbound, spec: HandlerSpec, queue: str, *, in_process: bool = False
) -> Message:
    """Wrap a checked event delivery on ``queue`` into a task message for ``spec``'s task.

    ``in_process``: the pool runs tasks in this process, so ``raw_event`` also carries the
    object the main thread parsed (:class:`~..wire.envelope.ParsedText`) and is not parsed
    again; not for a delayed retry, which the worker holds until it is due.
    """
    properties = message.properties or {}
    task_id = task_id_for(inbound.event_id, spec.name)
    parsed = inbound.parsed
    raw_event = (
        parsed_text(inbound.text, parsed)
        if in_process and parsed is not None and inbound.due is None
        else inbound.text
    )
    return _compat.decoded_task_message(
        message,
        ([], {"raw_event": raw_event, "meta": _meta(message, inbound, queue)}, _NO_CANVAS),
        _task_headers(spec, task_id, inbound, properties),
        _task_properties(task_id, properties),
    )


def to_batch_task_message(
    deliveries: Sequence[tuple[Message, Inbound]], spec: HandlerSpec, queue: str
) -> Message:
    """Wrap checked deliveries on ``queue`` into one task message for a batch handler's task.

    The task id derives from the events' ids (a redelivered batch of the same events keeps
    it); acking the task acks every delivery. Flower shows the batch's size and its events'
    names and first and last ids, never their data.
    """
    first_message, first = deliveries[0]
    last = deliveries[-1][1]
    task_id = task_id_for("\x00".join(inbound.event_id for _, inbound in deliveries), spec.name)
    items = [
        {
            "raw_event": inbound.text,
            "meta": _meta(message, inbound, queue),
            "retries": inbound.retries,
            "event_id": inbound.event_id,
        }
        for message, inbound in deliveries
    ]
    headers = _task_headers(spec, task_id, first, first_message.properties or {})
    headers["eta"] = None
    headers["retries"] = 0
    headers["kwargsrepr"] = repr(
        {
            "batch": len(deliveries),
            "events": sorted({inbound.event_type[:120] for _, inbound in deliveries})[:10],
            "first_id": first.event_id[:120],
            "last_id": last.event_id[:120],
        }
    )
    return _compat.batch_task_message(
        [message for message, _ in deliveries],
        ([], {"batch": items}, _NO_CANVAS),
        headers,
        _task_properties(task_id, {}),
    )


# Never taken from a message: handler runs have no callbacks, errbacks, chain or chord.
_NO_CANVAS = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
