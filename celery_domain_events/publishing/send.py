"""From events to AMQP messages, published with confirms through the app's transport."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError, from_json, to_json

from celery_domain_events import metrics, tracing
from celery_domain_events.config import ContentMode, KeyFormat
from celery_domain_events.events import (
    AnyEvent,
    DomainEvent,
    GenericEvent,
    default_events,
    readable,
    validation_summary,
)
from celery_domain_events.exceptions import EventDefinitionError, PublishError
from celery_domain_events.extension import DomainEvents
from celery_domain_events.routing import validate_event_name
from celery_domain_events.wire import binary, envelope
from celery_domain_events.wire.message import OutboundMessage

from . import spans

__all__ = [
    "as_event",
    "log_unpublished",
    "outbound_messages",
    "publish_events",
    "publish_events_async",
]

log = logging.getLogger(__name__)


def as_event(
    event: AnyEvent | str,
    data: Mapping[str, Any] | None = None,
    *,
    version: int = 1,
) -> AnyEvent:
    """Return ``event``, or build the ``GenericEvent`` that ``emit(name, data)`` means.

    Raises:
        InvalidRoutingPattern: an untyped event name is not dotted words.
        TypeError: ``data`` was given with a typed event, or ``event`` is not an event.
        EventDefinitionError: the event's class has no ``event_name``; or an untyped event's
            version is not a positive integer, its data is not a mapping, holds a value JSON
            cannot carry, or fails the model this process declares for its name and version.
    """
    if isinstance(event, str):
        name = validate_event_name(event)
        if type(version) is not int or version < 1:
            raise EventDefinitionError(
                f"emit({name!r}, version={version!r}): a version is a positive integer"
            )
        if data is not None and not isinstance(data, Mapping):
            raise EventDefinitionError(
                f"emit({name!r}, data): data is a mapping (a JSON object), not "
                f"{type(data).__name__}"
            )
        generic = GenericEvent(event_name=name, event_version=version, data=dict(data or {}))
        _check_json(generic)
        _check_declared(generic)
        return generic
    if data is not None:
        raise TypeError("data= is only for untyped events: emit('name', {...})")
    if isinstance(event, GenericEvent):
        _check_json(event)
        return event
    if not isinstance(event, DomainEvent):
        raise TypeError(f"emit() takes a DomainEvent or an event name, not {type(event).__name__}")
    if not isinstance(getattr(type(event), "event_name", None), str):
        raise EventDefinitionError(
            f"{type(event).__qualname__} has no event_name, so it cannot be published; "
            'declare one: event_name: ClassVar[str] = "thing.happened"'
        )
    return event


def _check_declared(event: GenericEvent) -> None:
    # A model of this process declares the name and version: consumers that share it would
    # dead-letter data it refuses, so refuse it here, where the mistake is made.
    model = default_events.get(event.event_name, event.event_version)
    if model is None:
        return
    # As a consumer reads it: the JSON the data becomes (a UUID is a string there), and only
    # the keys the model reads (a producer may add fields before its consumers know them).
    read = readable(model, from_json(to_json(event.data)))
    try:
        model.__pydantic_validator__.validate_python(read)
    except ValidationError as exc:
        # Not chained: pydantic's own text repeats the data's values.
        raise EventDefinitionError(
            f"emit({event.event_name!r}, data, version={event.event_version}): "
            f"{model.__module__}.{model.__qualname__} declares that event, and the data fails "
            f"it: {validation_summary(exc)}; emit {model.__qualname__}(...) instead"
        ) from None


def _check_json(event: GenericEvent) -> None:
    # Found now, not at transmit(), where the bad event would stay in the buffer.
    try:
        to_json(event.data)
    except PydanticSerializationError as exc:
        raise EventDefinitionError(
            f"the data of {event.event_name!r} cannot be sent as JSON: {exc}"
        ) from exc


def outbound_messages(
    ext: DomainEvents, events: list[AnyEvent], traceparent: str | None = None
) -> list[OutboundMessage]:
    """Return the AMQP messages that publish ``events`` (docs/design/wire-format.md).

    Structured CloudEvents: every attribute (``eventversion`` and ``traceparent`` included)
    is in the body; the AMQP properties repeat only what brokers and tools show without
    parsing it (id, name, time and the producing service). No application headers: they
    would only repeat the body, and an AMQP header table is the most expensive part of a
    publish to encode, on the client and on the broker. With ``domain_events_content_mode =
    "binary"``, the attributes are ``ce-`` headers and the body is the data alone.
    """
    settings = ext.settings
    service = settings.service
    exchange = settings.exchange
    mandatory = settings.unrouted_queue is None
    # Plain keys are the event names; only other formats need the per-event call.
    routing_key = None if settings.key_format is KeyFormat.PLAIN else ext.topology.routing_key
    if settings.content_mode is ContentMode.BINARY:
        return _binary_messages(ext, events, traceparent, routing_key)
    encode = envelope.encoder(service, traceparent=traceparent)
    content_type = envelope.CONTENT_TYPE
    messages = []
    for event in events:
        body, event_id = encode(event)
        name = event.event_name
        messages.append(
            OutboundMessage(
                body,
                exchange,
                name if routing_key is None else routing_key(event),
                content_type,
                properties={
                    "message_id": event_id,
                    "type": name,
                    "timestamp": int(event.occurred_at.timestamp()),
                    "app_id": service,
                },
                mandatory=mandatory,
                source=event,
            )
        )
    return messages


def _binary_messages(
    ext: DomainEvents,
    events: list[AnyEvent],
    traceparent: str | None,
    routing_key: Any,
) -> list[OutboundMessage]:
    settings = ext.settings
    encode = binary.encoder(settings.service, traceparent=traceparent)
    messages = []
    for event in events:
        headers, body, event_id = encode(event)
        name = event.event_name
        messages.append(
            OutboundMessage(
                body,
                settings.exchange,
                name if routing_key is None else routing_key(event),
                binary.DATA_CONTENT_TYPE,
                properties={
                    "message_id": event_id,
                    "type": name,
                    "timestamp": int(event.occurred_at.timestamp()),
                    "app_id": settings.service,
                },
                headers=headers,
                mandatory=settings.unrouted_queue is None,
                source=event,
            )
        )
    return messages


def log_unpublished(ext: DomainEvents, exc: PublishError, what: str) -> None:
    """Log, at ERROR and in full, events that could not be published after ``what`` happened.

    For callers that cannot hand the events back (after a commit, after a task succeeded):
    the log is then the only place they survive, so each envelope is logged whole.
    """
    source = ext.settings.service
    log.error(
        "%s but %d event(s) could not be published (%s); ids: %s; events: %s",
        what,
        len(exc.events),
        exc,
        ", ".join(str(e.event_id) for e in exc.events),
        [envelope.encode(e, source).decode() for e in exc.events],
    )


def publish_events(ext: DomainEvents, events: list[AnyEvent]) -> None:
    """Publish ``events`` through ``ext``'s exchange with batched publisher confirms.

    The events carry the current trace context (a new trace if there is none).

    Raises:
        PublishError: as for :func:`transmit`.
    """
    ext.check_broker()
    with _publish_span(ext, events) as traceparent:
        messages = outbound_messages(ext, events, traceparent)
        with metrics.publishing(ext.settings, messages):
            ext.publish(messages, declare=ext.topology.publisher_entities())
    _log_emitted(ext, events, traceparent)


async def publish_events_async(ext: DomainEvents, events: list[AnyEvent]) -> None:
    """:func:`publish_events` from asyncio: the event loop keeps running while it waits.

    Raises:
        PublishError: as for :func:`transmit_async`.
        ConfigurationError: aio-pika is not installed.
    """
    ext.check_broker()
    with _publish_span(ext, events) as traceparent:
        messages = outbound_messages(ext, events, traceparent)
        with metrics.publishing(ext.settings, messages):
            await ext.publish_async(messages, declare=ext.topology.publisher_entities())
    _log_emitted(ext, events, traceparent)


def _publish_span(ext: DomainEvents, events: list[AnyEvent]) -> AbstractContextManager[str]:
    # The batch's PRODUCER span when OpenTelemetry records (its context is the events'
    # traceparent), else the current trace context or a new trace.
    settings = ext.settings
    return spans.publish(settings.exchange, settings.service, events, ext.topology.routing_key)


def _log_emitted(ext: DomainEvents, events: list[AnyEvent], traceparent: str) -> None:
    if not tracing.event_log.isEnabledFor(logging.INFO):
        return  # skip building the structured fields of a few thousand records nobody keeps
    trace = tracing.trace_id(traceparent)
    for event in events:
        tracing.event_log.info(
            "Emitted %s v%d id=%s",
            event.event_name,
            event.event_version,
            event.event_id,
            extra={
                "event_id": str(event.event_id),
                "event_name": event.event_name,
                "event_version": event.event_version,
                "trace_id": trace,
                "service": ext.settings.service,
                "outcome": "emitted",
            },
        )
