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

import uuid
from datetime import datetime, timezone
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from .routing import validate_event_name

__all__ = ["DomainEvent", "GenericEvent", "utcnow"]

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
        from .registry import default_events  # noqa: PLC0415 (registry imports this module)

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


#: What ``emit()`` accepts and what a handler receives.
AnyEvent = DomainEvent | GenericEvent
