"""The wire format: CloudEvents 1.0 structured JSON.

A message body is one JSON object (``application/cloudevents+json``)::

    {"specversion": "1.0", "id": "<uuid>", "source": "billing", "type": "user.created",
     "time": "2026-11-23T20:00:00+00:00", "datacontenttype": "application/json",
     "eventversion": 1, "data": {"user_id": 1}}

Any AMQP client can publish or consume it. Decoding never executes anything: bodies are JSON or
they are rejected as poison (:class:`~celery_domain_events.exceptions.EventDecodeError`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import to_json

from .events import METADATA_FIELDS, AnyEvent, DomainEvent, GenericEvent
from .exceptions import EventDecodeError, EventValidationError, UnknownEventError
from .registry import EventRegistry, default_events
from .routing import validate_event_name

__all__ = [
    "CONTENT_TYPE",
    "JSON_CONTENT_TYPES",
    "Envelope",
    "decode",
    "encode",
    "encoder",
    "to_event",
]

#: The content type of a structured CloudEvent.
CONTENT_TYPE = "application/cloudevents+json"
#: Content types a worker accepts; anything else (pickle, yaml, ...) is poison.
JSON_CONTENT_TYPES = frozenset({CONTENT_TYPE, "application/json"})


class Envelope(BaseModel):
    """A decoded CloudEvents envelope; unknown extension attributes are kept."""

    model_config = ConfigDict(frozen=True, extra="allow")

    specversion: str = "1.0"
    id: str = Field(min_length=1)
    source: str = Field(min_length=1)
    type: str = Field(min_length=1)
    time: datetime | None = None
    datacontenttype: str = "application/json"
    eventversion: int = Field(default=1, ge=1)
    traceparent: str | None = None
    data: dict[str, Any] | None = None


# Metadata travels in the envelope (id, time), not in "data".
_NOT_DATA = set(METADATA_FIELDS)


def encode(event: AnyEvent, source: str, **extensions: Any) -> bytes:
    """Serialize ``event`` as a CloudEvents JSON body published by service ``source``.

    Raises:
        PydanticSerializationError: an untyped event's data holds a value JSON cannot carry.
    """
    body, _ = encoder(source, **extensions)(event)
    return body


def encoder(source: str, **extensions: Any) -> Callable[[AnyEvent], tuple[bytes, str]]:
    """Return ``encode`` for a batch: ``event -> (body, the event id as text)``.

    ``transmit()`` encodes thousands of events with the same source and trace context: the
    shared parts are encoded once, each event type's once, and pydantic-core writes the rest
    (several times faster than the json module). The id text is what ``message_id`` carries.
    """
    shared = b"".join(
        b',"%s":%s' % (key.encode(), to_json(value))
        for key, value in extensions.items()
        if value is not None
    )
    source_json = to_json(source)
    kinds: dict[tuple[str, int], bytes] = {}

    def encode_event(event: AnyEvent) -> tuple[bytes, str]:
        kind = (event.event_name, event.event_version)
        head = kinds.get(kind)
        if head is None:
            head = kinds[kind] = b'"type":%s,"eventversion":%d' % (to_json(kind[0]), kind[1])
        if isinstance(event, GenericEvent):
            data = to_json(event.data)
        else:
            data = type(event).__pydantic_serializer__.to_json(event, exclude=_NOT_DATA)
        event_id = to_json(event.event_id)  # '"<uuid>"': cheaper than str(UUID)
        body = _ENVELOPE % (
            event_id,
            source_json,
            head,
            to_json(event.occurred_at),
            shared,
            data,
        )
        return body, event_id[1:-1].decode()

    return encode_event


_ENVELOPE = (
    b'{"specversion":"1.0","id":%s,"source":%s,%s,"time":%s,'
    b'"datacontenttype":"application/json"%s,"data":%s}'
)


def decode(body: bytes | str) -> Envelope:
    """Parse a message body into an :class:`Envelope`.

    Raises:
        EventDecodeError: the body is not UTF-8 JSON or not a CloudEvents envelope.
    """
    try:
        # One pass in pydantic's own JSON parser: this runs for every delivery.
        envelope = Envelope.model_validate_json(body)
    except ValidationError as exc:
        raise EventDecodeError(_decode_error(body, exc)) from exc
    if not envelope.specversion.startswith("1."):
        raise EventDecodeError(f"unsupported CloudEvents specversion {envelope.specversion!r}")
    try:
        _validate_type(envelope.type)
    except ValueError as exc:
        raise EventDecodeError(str(exc)) from exc
    return envelope


@functools.lru_cache(maxsize=1024)
def _validate_type(name: str) -> None:
    # A service sees a few event names over and over; a failure is not cached (it raises).
    validate_event_name(name)


def _decode_error(body: bytes | str, exc: ValidationError) -> str:
    first = exc.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        if isinstance(body, bytes):
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as utf8_error:
                return f"body is not valid UTF-8 JSON: {utf8_error}"
        return f"body is not valid UTF-8 JSON: {first['msg']}"
    if first["type"] == "model_type" and not first["loc"]:
        try:
            kind = type(json.loads(body)).__name__
        except ValueError:
            kind = "something else"
        return f"body must be a JSON object, got {kind}"
    return f"not a CloudEvents envelope: {_summary(exc)}"


def to_event(envelope: Envelope, registry: EventRegistry = default_events) -> AnyEvent:
    """Build the typed event an envelope carries.

    Raises:
        UnknownEventError: models exist for the name, but none for this version.
        EventValidationError: the data does not validate against the model.
    """
    metadata: dict[str, Any] = {"event_id": envelope.id}
    if envelope.time is not None:
        metadata["occurred_at"] = envelope.time
    model = registry.get(envelope.type, envelope.eventversion)
    if model is None:
        known = registry.versions(envelope.type)
        if known:
            raise UnknownEventError(
                f"{envelope.type!r} v{envelope.eventversion} is unknown here "
                f"(known versions: {', '.join(map(str, known))})"
            )
        return _validated(
            GenericEvent,
            {
                **metadata,
                "event_name": envelope.type,
                "event_version": envelope.eventversion,
                "data": envelope.data or {},
            },
            envelope,
        )
    return _validated(model, {**(envelope.data or {}), **metadata}, envelope)


def _validated(model: type[DomainEvent] | type[GenericEvent], data: Any, env: Envelope) -> AnyEvent:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise EventValidationError(
            f"{env.type!r} v{env.eventversion} (id {env.id}) fails validation: {_summary(exc)}"
        ) from exc


def _summary(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()[:5]
    )
