"""Errors raised by celery-domain-events.

Every error derives from :class:`DomainEventsError`::

    DomainEventsError(Exception)
    ├── ConfigurationError(DomainEventsError, ValueError)     bad setting or broker URL
    │   └── InvalidRoutingPattern                             not dotted words / * / #
    ├── RegistrationError(DomainEventsError)                  duplicate event or handler
    ├── CatalogueError(DomainEventsError, ValueError)         an unreadable catalogue document
    ├── EventDefinitionError(DomainEventsError, TypeError)    event class or handler defined wrong
    ├── PublishError(DomainEventsError)                       unreachable or unconfirmed publish
    ├── InboxBusy(DomainEventsError)                          event held by another delivery: retry
    ├── BatchItemsFailed(DomainEventsError)                   a batch handler names failed events
    ├── NoActiveScope(DomainEventsError, RuntimeError)        emit() with no open scope
    ├── EventDecodeError(DomainEventsError)                   malformed JSON or envelope (poison)
    │   ├── UnknownEventError(EventDecodeError, LookupError)  unregistered event version
    │   └── EventValidationError                              payload fails the event's schema
    └── RejectEvent(DomainEventsError)                        raised by a handler: dead-letter now

Each class passes all of its arguments to ``super().__init__`` so that Celery can pickle it
between pool processes (celery/celery#6990).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "NON_RETRYABLE",
    "BatchItemsFailed",
    "CatalogueError",
    "ConfigurationError",
    "DomainEventsError",
    "EventDecodeError",
    "EventDefinitionError",
    "EventValidationError",
    "InboxBusy",
    "InvalidRoutingPattern",
    "NoActiveScope",
    "PublishError",
    "RegistrationError",
    "RejectEvent",
    "UnknownEventError",
]


class DomainEventsError(Exception):
    """Base class of every error raised by this library."""


class ConfigurationError(DomainEventsError, ValueError):
    """A setting, broker URL or handler option is invalid."""


class InvalidRoutingPattern(ConfigurationError):
    """A routing key or binding pattern is not made of dotted words, ``*`` and ``#``."""


class RegistrationError(DomainEventsError):
    """An event type or handler is registered twice under the same name."""


class CatalogueError(DomainEventsError, ValueError):
    """A catalogue (an AsyncAPI document) cannot be read: not JSON, not AsyncAPI, or malformed."""


class EventDefinitionError(DomainEventsError, TypeError):
    """An event class or handler is defined wrongly; raised where the mistake is used first.

    An event class without ``event_name`` at ``emit()``, untyped data JSON cannot carry at
    ``emit()``, a handler whose parameter is not an event type at decoration.
    """


class PublishError(DomainEventsError):
    """Events could not be published and confirmed by the broker.

    Attributes:
        events: the events that were not confirmed; nothing else was lost.
    """

    def __init__(self, message: str, events: Sequence[Any] = ()) -> None:
        super().__init__(message, tuple(events))
        self.events = tuple(events)

    def __str__(self) -> str:
        return str(self.args[0])


class InboxBusy(DomainEventsError):
    """An inbox saw the event claimed by a delivery that has not finished: retry later.

    Raised by :class:`~celery_domain_events.contrib.redis_inbox.RedisInbox` when the event's key
    says ``"processing"``: another delivery is running the handler, or one crashed in it and
    its lease has not expired yet. The handler's task retries after ``retry_after`` seconds
    (when the lease is gone), whatever its backoff. Each such retry counts against
    ``max_retries``: once they are spent (or with ``retry=None``) the event is dead-lettered
    like any other failure, so give a Redis-idempotent handler retries.

    Attributes:
        retry_after: seconds until the lease expires.
    """

    def __init__(self, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message, retry_after)
        self.retry_after = float(retry_after)

    def __str__(self) -> str:
        return str(self.args[0])


class BatchItemsFailed(DomainEventsError):
    """Raised by a batch handler: the events it names failed, every other one is done.

    Each failed event is retried alone (to the handler's own queue, under its retry policy) or
    dead-lettered alone with its own error; the others are acked. Events the handler emitted
    are published, as for a run that succeeded.

    Args:
        failures: ``{event id: exception}``, or ``(event or event id, exception)`` pairs.
    """

    def __init__(
        self, failures: Mapping[str, BaseException] | Iterable[tuple[Any, BaseException]]
    ) -> None:
        pairs = failures.items() if isinstance(failures, Mapping) else failures
        self.failures: dict[str, BaseException] = {}
        for key, exc in pairs:
            event_id = key if isinstance(key, str) else getattr(key, "event_id", None)
            if not isinstance(event_id, str) or not isinstance(exc, BaseException):
                raise TypeError(
                    "BatchItemsFailed takes {event id: exception} or (event, exception) pairs, "
                    f"got {key!r}: {exc!r}"
                )
            self.failures[event_id] = exc
        super().__init__(self.failures)

    def __str__(self) -> str:
        return f"{len(self.failures)} event(s) of the batch failed"


class NoActiveScope(DomainEventsError, RuntimeError):
    """``emit()`` was called where a scope is required and none is open (a usage error).

    Not a :class:`PublishError`: nothing was published or lost, and ``except PublishError``
    around a transmit must not catch it.
    """


class EventDecodeError(DomainEventsError):
    """A message is not a valid event envelope; it is dead-lettered, never retried."""


class UnknownEventError(EventDecodeError, LookupError):
    """The event's name is known but not the version it was published with."""


class EventValidationError(EventDecodeError):
    """The event's data does not validate against its model (the cause is chained)."""


class RejectEvent(DomainEventsError):
    """Raise from a handler to dead-letter the event at once, without retries."""


#: Errors that are never retried: the event goes straight to the dead-letter queue.
NON_RETRYABLE: tuple[type[DomainEventsError], ...] = (EventDecodeError, RejectEvent)
