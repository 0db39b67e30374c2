"""emit(), transmit() and discard(): a context-local buffer of events, sent after commit.

::

    emit(UserCreated(user_id=1))     # buffered in this context (thread / asyncio task)
    emit("user.disabled", {"user_id": 2})
    db.commit()
    transmit()                       # one channel, batched publisher confirms
    # or, on rollback:
    discard()

``transmit()`` returns only when RabbitMQ has confirmed every event. If it cannot by the
deadline (``domain_events_publish_timeout``), it raises
:class:`~celery_domain_events.exceptions.PublishError` with exactly the unconfirmed events
attached and left in the buffer, so the caller can retry or store them: nothing is dropped
silently, and nothing confirmed is sent twice.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from celery import Celery
from celery import current_app as _current_app
from pydantic_core import PydanticSerializationError, to_json

from . import serialization, taskscope, tracing
from .config import KeyFormat
from .confirm import OutboundMessage
from .events import AnyEvent, DomainEvent, GenericEvent
from .exceptions import ConfigurationError, EventDefinitionError, NoActiveScope, PublishError
from .extension import DomainEvents
from .routing import validate_event_name

__all__ = [
    "Scope",
    "as_event",
    "buffered",
    "close_buffer",
    "discard",
    "emit",
    "log_unpublished",
    "open_buffer",
    "outbound_messages",
    "publish_events",
    "scope",
    "transmit",
]

log = logging.getLogger(__name__)


class _Buffer(list[AnyEvent]):
    """Buffered events, and the task run they belong to (see :mod:`.taskscope`)."""

    __slots__ = ("owner",)

    #: The Celery request of the task run that opened this buffer, if any.
    owner: Any


def _new_buffer(owner: Any = None) -> _Buffer:
    # Not an __init__ override: list's own is C, and every handler run opens a buffer.
    buffer = _Buffer()
    buffer.owner = owner
    return buffer


# A fresh list per context: the default must not be a shared mutable object.
_buffer: contextvars.ContextVar[_Buffer | None] = contextvars.ContextVar(
    "celery_domain_events_buffer", default=None
)


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
        EventDefinitionError: the event's class has no ``event_name``, or an untyped event's
            data holds a value JSON cannot carry.
    """
    if isinstance(event, str):
        generic = GenericEvent(
            event_name=validate_event_name(event), event_version=version, data=dict(data or {})
        )
        _check_json(generic)
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


def _check_json(event: GenericEvent) -> None:
    # Found now, not at transmit(), where the bad event would stay in the buffer.
    try:
        to_json(event.data)
    except PydanticSerializationError as exc:
        raise EventDefinitionError(
            f"the data of {event.event_name!r} cannot be sent as JSON: {exc}"
        ) from exc


def emit(
    event: AnyEvent | str,
    data: Mapping[str, Any] | None = None,
    *,
    version: int = 1,
) -> AnyEvent:
    """Buffer an event until :func:`transmit`.

    Args:
        event: a :class:`DomainEvent` instance, or an event name for an untyped event.
        data: the payload of an untyped event.
        version: the version of an untyped event.

    Returns:
        The buffered event (a ``GenericEvent`` for untyped ones).

    Raises:
        InvalidRoutingPattern: an untyped event name is not dotted words.
        TypeError: ``data`` was given with a typed event.
        EventDefinitionError: the event cannot be published as it is (see :func:`as_event`);
            nothing is buffered.
        NoActiveScope: the current app sets ``domain_events_require_scope`` and no scope is
            open here.
    """
    event = as_event(event, data, version=version)
    pending = _buffer.get()
    run = taskscope.current_run()
    if run is not None and (pending is None or pending.owner is not run):
        # The run's first emit outside a scope of its own: its events leave with the run.
        pending = _new_buffer(run)
        taskscope.track(run, _buffer.set(pending))
    elif pending is None:
        if _scope_required():
            raise NoActiveScope(
                f"emit({event.event_name!r}) outside a scope: open one with scope(), or emit "
                "from a Celery task, a handler or a request with DomainEventsMiddleware"
            )
        pending = _new_buffer()
        _buffer.set(pending)
    pending.append(event)
    return event


def scope(app: Celery | None = None, *, transmit_on_exit: bool = True) -> Scope:
    """Run a unit of work with its own buffer: transmit it if the block succeeds, else discard.

    ::

        with scope(app):            # a request, a task, a message handler
            do_work()               # emit() here buffers into this scope only
        # transmitted here, after the block (and its transaction) finished

    Raises:
        PublishError: as for :func:`transmit`, when the block succeeded.
    """
    return Scope(app, transmit_on_exit)


class Scope:
    """The context manager :func:`scope` returns (a class: every handler run enters one)."""

    __slots__ = ("_token", "app", "transmit_on_exit")

    def __init__(self, app: Celery | None, transmit_on_exit: bool) -> None:
        self.app = app
        self.transmit_on_exit = transmit_on_exit

    def __enter__(self) -> None:
        self._token = open_buffer()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                if self.transmit_on_exit:
                    transmit(self.app)
            else:
                discard()
        except BaseException:
            discard()
            raise
        finally:
            close_buffer(self._token)


def open_buffer(*, owner: Any = ...) -> contextvars.Token[_Buffer | None]:
    """Start a fresh, empty buffer in this context (for integrations); see :func:`scope`.

    ``owner`` is the task run it belongs to; by default, the run of the task executing here.
    """
    if owner is ...:
        owner = taskscope.current_run()
    return _buffer.set(_new_buffer(owner))


def close_buffer(token: contextvars.Token[_Buffer | None]) -> None:
    """Restore the buffer that was current before :func:`open_buffer` returned ``token``."""
    _buffer.reset(token)


def _scope_required() -> bool:
    try:
        return DomainEvents.of(_current_app).settings.require_scope
    except ConfigurationError:
        return False


def buffered() -> list[AnyEvent]:
    """Return a copy of the events emitted in this context and not yet transmitted."""
    return list(_buffer.get() or ())


def discard() -> list[AnyEvent]:
    """Drop the buffered events (on rollback) and return them."""
    pending: list[AnyEvent] = _buffer.get() or []
    _buffer.set(None)
    return list(pending)


def transmit(app: Celery | None = None) -> list[AnyEvent]:
    """Publish the buffered events and wait for the broker to confirm them.

    Args:
        app: the Celery app whose ``DomainEvents`` settings and broker to use
            (default: the current app).

    Returns:
        The events published, in emit order.

    Raises:
        PublishError: the broker stayed unreachable until ``domain_events_publish_timeout``,
            refused the connection, or did not confirm. Exactly the unconfirmed events stay
            buffered and are attached to the error; those RabbitMQ confirmed leave the buffer,
            so transmitting again never sends them twice.
        ConfigurationError: the app has no ``DomainEvents``.
    """
    pending = _buffer.get()
    if not pending:
        return []
    ext = DomainEvents.of(app or _current_app)
    batch = list(pending)
    try:
        publish_events(ext, batch)
    except PublishError as exc:
        unconfirmed = {id(event) for event in exc.events}
        # Keep whatever was emitted meanwhile (by a callback during the wait, say).
        pending[: len(batch)] = [event for event in batch if id(event) in unconfirmed]
        raise
    del pending[: len(batch)]
    return batch


def outbound_messages(
    ext: DomainEvents, events: list[AnyEvent], traceparent: str | None = None
) -> list[OutboundMessage]:
    """Return the AMQP messages that publish ``events`` (the README's "Wire format").

    Structured CloudEvents: every attribute (``eventversion`` and ``traceparent`` included)
    is in the body; the AMQP properties repeat only what brokers and tools show without
    parsing it (id, name, time and the producing service). No application headers: they
    would only repeat the body, and an AMQP header table is the most expensive part of a
    publish to encode, on the client and on the broker.
    """
    settings = ext.settings
    service = settings.service
    exchange = settings.exchange
    mandatory = settings.unrouted_queue is None
    # Plain keys are the event names; only other formats need the per-event call.
    routing_key = None if settings.key_format is KeyFormat.PLAIN else ext.routing_key
    encode = serialization.encoder(service, traceparent=traceparent)
    content_type = serialization.CONTENT_TYPE
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
        [serialization.encode(e, source).decode() for e in exc.events],
    )


def publish_events(ext: DomainEvents, events: list[AnyEvent]) -> None:
    """Publish ``events`` through ``ext``'s exchange with batched publisher confirms.

    The events carry the current trace context (a new trace if there is none).

    Raises:
        PublishError: as for :func:`transmit`.
    """
    ext.check_broker()
    traceparent = tracing.current_traceparent() or tracing.new_traceparent()
    messages = outbound_messages(ext, events, traceparent)
    ext.publish(messages, declare=ext.publisher_entities())
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
