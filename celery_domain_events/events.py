"""Typed domain events.

Declare an event by subclassing :class:`DomainEvent` and naming it::

    class UserCreated(DomainEvent):
        event_name: ClassVar[str] = "user.created"
        event_version: ClassVar[int] = 1

        user_id: int
        email: str

Defining the class registers ``(event_name, event_version)`` in the default
:class:`~celery_domain_events.registry.EventRegistry`, which is how a worker turns the JSON it
receives back into ``UserCreated``. Events whose name no model declares reach handlers as a
:class:`GenericEvent`.
"""

from __future__ import annotations

import functools
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .exceptions import RegistrationError
from .routing import validate_event_name

__all__ = [
    "DomainEvent",
    "EventRegistry",
    "GenericEvent",
    "default_events",
    "input_keys",
    "readable",
    "utcnow",
    "validation_summary",
]

#: Metadata fields every event carries; they travel in the envelope, not in ``data``.
METADATA_FIELDS = frozenset({"event_id", "occurred_at"})


def _new_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(timezone.utc)


class DomainEvent(BaseModel):
    """Base class of typed events: a frozen pydantic model with a name and a version."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Routing key and CloudEvents ``type``: dotted words such as ``"user.created"``.
    event_name: ClassVar[str]
    #: Schema version, sent as the ``eventversion`` extension attribute.
    event_version: ClassVar[int] = 1

    #: The CloudEvents ``id``: any non-empty string (a new UUID unless given).
    event_id: str = Field(default_factory=_new_id, min_length=1)
    occurred_at: datetime = Field(default_factory=utcnow)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if "event_name" not in cls.__dict__:
            return  # an abstract intermediate base class
        validate_event_name(cls.event_name)
        if not isinstance(cls.event_version, int) or cls.event_version < 1:
            raise TypeError(f"{cls.__name__}.event_version must be a positive int")
        default_events.register(cls)

    def event_data(self) -> dict[str, Any]:
        """Return the payload as JSON-ready data, without the metadata fields."""
        return self.model_dump(mode="json", exclude=set(METADATA_FIELDS))


class GenericEvent(BaseModel):
    """An event whose name no :class:`DomainEvent` subclass declares: untyped ``data``.

    ``data`` is whatever JSON value the event carries (usually an object; CloudEvents allows
    any), or ``bytes`` for a ``data_base64`` event whose content type is not JSON.
    """

    model_config = ConfigDict(frozen=True)

    event_name: str
    event_version: int = 1
    data: Any = Field(default_factory=dict)
    event_id: str = Field(default_factory=_new_id, min_length=1)
    occurred_at: datetime = Field(default_factory=utcnow)

    def event_data(self) -> Any:
        """Return the payload as JSON-ready data."""
        return dict(self.data) if isinstance(self.data, dict) else self.data


@functools.lru_cache(maxsize=1024)
def input_keys(model: type[DomainEvent]) -> frozenset[str]:
    """What ``model`` reads from an event's ``data``: field names and their string aliases.

    Never the metadata fields, which come from the envelope. Readers keep only these keys of
    ``data`` (tolerant readers: a producer may add fields before its consumers know them).
    """
    keys: set[str] = set()
    for name, info in model.model_fields.items():
        keys.add(name)
        for alias in (info.alias, info.validation_alias):
            if isinstance(alias, str):
                keys.add(alias)
    return frozenset(keys - METADATA_FIELDS)


def readable(model: type[DomainEvent], data: Mapping[str, Any]) -> dict[str, Any]:
    """Return the part of an event's ``data`` that ``model`` reads (:func:`input_keys`).

    What every reader keeps: the rest is ignored, not refused.
    """
    keys = input_keys(model)
    return {k: v for k, v in data.items() if k in keys}


def validation_summary(exc: ValidationError) -> str:
    """Where and why ``exc`` failed, in one line, without the input values.

    The values are the event's data (personal data, secrets), and this text reaches logs,
    Flower and the dead letter's failure record.
    """
    return "; ".join(
        f"{'.'.join(map(str, e['loc']))[:80] or '<root>'}: {e['msg'][:200]}"
        for e in exc.errors(include_url=False, include_input=False)[:5]
    )


#: What ``emit()`` accepts and what a handler receives.
AnyEvent = DomainEvent | GenericEvent


class EventRegistry:
    """Maps ``(event_name, event_version)`` to the ``DomainEvent`` model that parses it."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, int], type[DomainEvent]] = {}
        self._lock = threading.Lock()

    def register(self, model: type[DomainEvent]) -> None:
        """Register ``model``; re-registering the same class (a module reload) is allowed.

        Raises:
            RegistrationError: another class already claims the same name and version.
        """
        key = (model.event_name, model.event_version)
        with self._lock:
            existing = self._models.get(key)
            if existing is not None and _qualified(existing) != _qualified(model):
                raise RegistrationError(
                    f"event {key[0]!r} v{key[1]} is declared by both "
                    f"{_qualified(existing)} and {_qualified(model)}"
                )
            self._models[key] = model

    def get(self, name: str, version: int) -> type[DomainEvent] | None:
        """Return the model for ``name`` and ``version``, or None."""
        return self._models.get((name, version))

    def versions(self, name: str) -> list[int]:
        """Return the registered versions of ``name``, ascending."""
        return sorted(v for (n, v) in self._models if n == name)

    def all(self) -> list[type[DomainEvent]]:
        """Return every registered model, ordered by name and version."""
        return [self._models[k] for k in sorted(self._models)]

    def clear(self) -> None:
        """Forget every model."""
        with self._lock:
            self._models.clear()

    @contextmanager
    def isolated(self) -> Iterator[EventRegistry]:
        """Run a block with an empty registry and restore the previous content afterwards."""
        saved = dict(self._models)
        self.clear()
        try:
            yield self
        finally:
            with self._lock:
                self._models = saved


def _qualified(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


#: The registry ``DomainEvent`` subclasses add themselves to.
default_events = EventRegistry()
