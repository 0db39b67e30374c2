"""The wire format: CloudEvents 1.0 structured JSON.

A message body is one JSON object (``application/cloudevents+json``)::

    {"specversion": "1.0", "id": "<uuid>", "source": "billing", "type": "user.created",
     "time": "2026-11-23T20:00:00+00:00", "datacontenttype": "application/json",
     "eventversion": 1, "data": {"user_id": 1}}

Any AMQP client can publish or consume it. Decoding never executes anything: bodies are JSON or
they are rejected as poison (:class:`~celery_domain_events.exceptions.EventDecodeError`).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, ValidationError
from pydantic_core import core_schema, from_json, to_json

from celery_domain_events.events import (
    METADATA_FIELDS,
    AnyEvent,
    DomainEvent,
    GenericEvent,
    readable,
    validation_summary,
)
from celery_domain_events.exceptions import (
    EventDecodeError,
    EventValidationError,
    UnknownEventError,
)
from celery_domain_events.registry import EventRegistry, default_events
from celery_domain_events.upcasting import UpcasterRegistry, default_upcasters, target_version

__all__ = [
    "CONTENT_TYPE",
    "JSON_CONTENT_TYPES",
    "MAX_JSON_DEPTH",
    "Envelope",
    "ParsedText",
    "decode",
    "encode",
    "encoder",
    "is_json_media_type",
    "parsed_text",
    "peek_id",
    "to_event",
]

#: The content type of a structured CloudEvent.
CONTENT_TYPE = "application/cloudevents+json"
#: Content types a worker accepts; anything else (pickle, yaml, ...) is poison.
JSON_CONTENT_TYPES = frozenset({CONTENT_TYPE, "application/json"})


#: Deepest JSON nesting a body may have: pydantic-core's parser refuses anything deeper, so no
#: decode in this library can recurse without bound (a 20 KB body can nest 10,000 levels).
MAX_JSON_DEPTH = 200
_INT32 = (-(2**31), 2**31 - 1)
_EXTENSION_NAME = re.compile(r"[a-z0-9]+")
# Anchored: pydantic's ``pattern`` searches, it does not match the whole string.
_ABSOLUTE_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:\S*$")
_NO_SPACE = re.compile(r"^\S+$")
# pydantic-core's (Rust) regex: [0-9], not a Unicode \d; "$" is the end of the text only.
_RFC3339_ANCHORED = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})$"
)


def is_json_media_type(content_type: str | None) -> bool:
    """Whether ``content_type`` declares JSON (``*/json`` or ``*/*+json``, any parameters)."""
    if content_type is None:
        return True  # CloudEvents: absent means application/json
    media = content_type.split(";", 1)[0].strip().lower()
    return media.endswith(("/json", "+json"))


class _RFC3339Time:
    # The time attribute, checked and parsed by pydantic-core alone (a Python validator would
    # be called for every event): RFC 3339 text, then an aware datetime.
    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        # Only the text's shape gets the custom message: an RFC 3339-shaped time out of range
        # (February 30, hour 24) keeps pydantic's own reason.
        return core_schema.chain_schema(
            [
                core_schema.custom_error_schema(
                    core_schema.str_schema(pattern=_RFC3339_ANCHORED, strict=True),
                    custom_error_type="rfc3339",
                    custom_error_message=(
                        "Value error, time must be an RFC 3339 timestamp such as "
                        "2026-01-31T12:00:00Z"
                    ),
                ),
                core_schema.datetime_schema(tz_constraint="aware"),
            ]
        )


class Envelope(BaseModel):
    """A decoded CloudEvents 1.0 structured-mode envelope, validated as the spec requires.

    Required attributes must be present (``null`` counts as absent); extension attributes are
    kept in ``model_extra`` when their names and values are valid CloudEvents attributes.
    Build one with :meth:`validated` (or :func:`decode`): ``model_validate`` alone checks the
    schema, not the rules beyond it.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    specversion: Literal["1.0"]
    id: str = Field(min_length=1, strict=True)
    source: str = Field(min_length=1, pattern=_NO_SPACE.pattern, strict=True)
    type: str = Field(min_length=1, strict=True)
    datacontenttype: str | None = Field(default=None, min_length=1, strict=True)
    dataschema: str | None = Field(default=None, pattern=_ABSOLUTE_URI.pattern, strict=True)
    subject: str | None = Field(default=None, min_length=1, strict=True)
    time: Annotated[datetime, _RFC3339Time()] | None = None
    eventversion: int = Field(default=1, ge=1, le=_INT32[1])
    traceparent: str | None = Field(default=None, strict=True)
    data: Any = None
    data_base64: str | None = Field(default=None, strict=True)

    @classmethod
    def validated(cls, value: dict[str, Any]) -> Envelope:
        """Validate a parsed envelope: the schema, then the spec's rules beyond it.

        The rules run in Python only for an envelope that has extension attributes or
        ``data_base64``; pydantic-core checks the rest.

        Raises:
            ValidationError: the schema is not met.
            ValueError: a rule beyond the schema is not met; the message says which.
        """
        # "When decoding attributes and a null value is encountered, it MUST be treated as the
        # equivalent of unset or omitted." (data may be null: it is not an attribute.)
        if None in value.values():
            value = {k: v for k, v in value.items() if v is not None or k == "data"}
        # The validator itself: model_validate() adds about a microsecond per event around it.
        envelope: Envelope = cls.__pydantic_validator__.validate_python(value)
        if envelope.__pydantic_extra__ or envelope.data_base64 is not None:
            envelope._spec_rules()
        return envelope

    def _spec_rules(self) -> None:
        if self.data_base64 is not None and "data" in self.model_fields_set:
            raise ValueError("data and data_base64 are mutually exclusive")
        for name, value in (self.model_extra or {}).items():
            if not _EXTENSION_NAME.fullmatch(name):
                raise ValueError(
                    f"extension attribute {name[:40]!r} is not lower-case letters and digits"
                )
            if type(value) is int:
                if not _INT32[0] <= value <= _INT32[1]:
                    raise ValueError(f"extension attribute {name!r} is outside 32-bit range")
            elif type(value) not in (str, bool):
                raise ValueError(
                    f"extension attribute {name!r} must be a string, integer or boolean"
                )

    @property
    def extensions(self) -> dict[str, Any]:
        """Extension attributes other than ``eventversion`` and ``traceparent``."""
        return dict(self.model_extra or {})

    def payload(self) -> Any:
        """Return the event's data: ``data``, or ``data_base64`` decoded (JSON parsed).

        Raises:
            EventDecodeError: ``data_base64`` is not base64, or not the JSON it declares.
        """
        if self.data_base64 is None:
            return self.data
        try:
            raw = base64.b64decode(self.data_base64, validate=True)
        except ValueError as exc:
            raise EventDecodeError(f"data_base64 is not base64: {exc}") from exc
        if not is_json_media_type(self.datacontenttype):
            return raw
        try:
            return from_json(raw)
        except ValueError as exc:
            raise EventDecodeError(f"data_base64 is not the JSON it declares: {exc}") from exc


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
        event_id = to_json(event.event_id)
        body = _ENVELOPE % (
            event_id,
            source_json,
            head,
            to_json(event.occurred_at),
            shared,
            data,
        )
        return body, event.event_id

    return encode_event


_ENVELOPE = (
    b'{"specversion":"1.0","id":%s,"source":%s,%s,"time":%s,'
    b'"datacontenttype":"application/json"%s,"data":%s}'
)


class ParsedText(str):
    """An envelope's text that also holds the JSON object parsed from it.

    A worker's main thread parses each structured body once, to check it
    (:func:`~celery_domain_events.wire.inbound.check`); a pool that runs tasks in the same
    process (solo, threads, gevent, eventlet) receives the task's arguments as the same
    objects, and :func:`decode` then validates that object instead of parsing the text again.
    It pickles and copies as plain text: a prefork child parses the text itself.
    """

    #: The JSON object the text parses to; never changed once set.
    parsed: dict[str, Any]

    def __reduce__(self) -> tuple[type[str], tuple[str]]:
        return str, (str(self),)


def parsed_text(text: str, parsed: dict[str, Any]) -> ParsedText:
    """Return ``text`` as a :class:`ParsedText` holding ``parsed`` (what it parses to)."""
    value = ParsedText(text)
    value.parsed = parsed
    return value


def decode(body: bytes | str) -> Envelope:
    """Parse a message body into an :class:`Envelope`.

    A :class:`ParsedText` is not parsed again: its object is validated.

    Raises:
        EventDecodeError: the body is not UTF-8 JSON (``NaN`` and ``Infinity`` are not JSON),
            nests deeper than :data:`MAX_JSON_DEPTH`, or is not a valid CloudEvents 1.0
            envelope.
    """
    if type(body) is ParsedText:
        raw: Any = body.parsed
    else:
        try:
            # pydantic-core's parser: its recursion limit bounds the nesting.
            raw = from_json(body, allow_inf_nan=False)
        except (ValueError, TypeError) as exc:
            raise EventDecodeError(json_error(body, exc)) from exc
    if not isinstance(raw, dict):
        raise EventDecodeError(f"body must be a JSON object, got {type(raw).__name__}")
    try:
        return Envelope.validated(raw)
    except ValidationError as exc:
        # Not chained, as in _validated: pydantic's text repeats the input values.
        raise EventDecodeError(
            f"not a CloudEvents 1.0 envelope: {validation_summary(exc)}"
        ) from None
    except ValueError as exc:  # a rule beyond the schema; the message holds no values
        # Worded as when the rule was a pydantic validator (dead-letter reasons are read).
        raise EventDecodeError(
            f"not a CloudEvents 1.0 envelope: <root>: Value error, {exc}"
        ) from None


def peek_id(body: bytes | str) -> str | None:
    """Return the CloudEvents ``id`` of ``body`` without validating the rest, or None."""
    try:
        envelope = from_json(body)  # lenient: it only finds an id, even in poison
    except (ValueError, TypeError):
        return None
    event_id = envelope.get("id") if isinstance(envelope, dict) else None
    return event_id if isinstance(event_id, str) and event_id else None


def json_error(body: bytes | str, exc: Exception) -> str:
    """Say why ``body`` did not parse as JSON, in one line."""
    if isinstance(body, bytes):
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as utf8_error:
            return f"body is not valid UTF-8 JSON: {utf8_error}"
    if "recursion limit" in str(exc):
        return f"body nests JSON deeper than {MAX_JSON_DEPTH} levels"
    return f"body is not valid UTF-8 JSON: {str(exc)[:200]}"


def to_event(
    envelope: Envelope,
    registry: EventRegistry = default_events,
    *,
    versions: Mapping[str, frozenset[int]] | None = None,
    upcasters: UpcasterRegistry = default_upcasters,
) -> AnyEvent:
    """Build the typed event an envelope carries.

    A tolerant reader: fields the model does not declare are ignored, so a producer may add
    optional fields before its consumers know them. Only emitting is strict.

    Args:
        envelope: the decoded envelope.
        registry: the event models.
        versions: the versions of each event the receiving handler takes
            (``HandlerSpec.event_versions()``); an event of another version is upcast to the
            lowest of them above its own.
        upcasters: the upcasters to do so with.

    Raises:
        UnknownEventError: models exist for the name, but none for this version; or the
            handler takes only older versions, or no upcaster chain reaches its version.
        EventValidationError: the data does not validate against the model, or an upcaster
            failed.
        EventDecodeError: ``data_base64`` cannot be decoded.
    """
    metadata: dict[str, Any] = {"event_id": envelope.id}
    if envelope.time is not None:
        metadata["occurred_at"] = envelope.time
    version = envelope.eventversion
    via = ""
    data = envelope.payload()
    declared = versions.get(envelope.type) if versions else None
    if declared and version not in declared:
        target = target_version(declared, envelope.type, version)
        if data is not None and not isinstance(data, dict):
            raise EventValidationError(
                f"{envelope.type!r} v{version} (id {envelope.id}) cannot be upcast: "
                f"data must be a JSON object, got {type(data).__name__}"
            )
        data = upcasters.upcast(envelope.type, version, target, data or {})
        via = ", ".join(
            step.origin
            for v in range(version, target)
            if (step := upcasters.get(envelope.type, v)) is not None
        )
        version = target
    model = registry.get(envelope.type, version)
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
                "data": {} if data is None else data,
            },
            envelope,
        )
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise EventValidationError(
            f"{envelope.type!r} v{envelope.eventversion} (id {envelope.id}) fails validation: "
            f"data must be a JSON object, got {type(data).__name__}"
        )
    return _validated(model, {**readable(model, data), **metadata}, envelope, version, via)


def _validated(
    model: type[DomainEvent] | type[GenericEvent],
    data: Any,
    env: Envelope,
    version: int | None = None,
    via: str = "",
) -> AnyEvent:
    try:
        event: AnyEvent = model.__pydantic_validator__.validate_python(data)  # model_validate
        return event
    except ValidationError as exc:
        upcast = "" if version in (None, env.eventversion) else f" upcast to v{version} by {via}"
        # Not chained: pydantic's own text holds the input values, the event's data (personal
        # data, secrets), and a chained cause reaches logs and the dead letter's traceback.
        raise EventValidationError(
            f"{env.type!r} v{env.eventversion}{upcast} (id {env.id}) fails validation: "
            f"{validation_summary(exc)}"
        ) from None
