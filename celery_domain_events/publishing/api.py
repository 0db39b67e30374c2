"""emit(), transmit() and discard(): a context-local buffer of events, sent after commit.

::

    emit(UserCreated(user_id=1))     # buffered in this context (thread / asyncio task)
    emit("user.disabled", {"user_id": 2})
    db.commit()
    transmit()                       # one channel, batched publisher confirms
    # or, on rollback:
    discard()

From asyncio, ``await transmit_async()`` and ``async with scope_async():`` do the same without
blocking the event loop.

``transmit()`` returns only when RabbitMQ has confirmed every event. If it cannot by the
deadline (``domain_events_publish_timeout``), it raises
:class:`~celery_domain_events.exceptions.PublishError` with exactly the unconfirmed events
attached and left in the buffer, so the caller can retry or store them: nothing is dropped
silently, and nothing confirmed is sent twice.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from celery import Celery
from celery import current_app as _current_app

from celery_domain_events.events import AnyEvent
from celery_domain_events.exceptions import ConfigurationError, NoActiveScope
from celery_domain_events.extension import DomainEvents

from . import buffer, task_scope
from .buffer import buffered, close_buffer, discard
from .send import as_event, publish_events, publish_events_async

__all__ = [
    "AsyncScope",
    "Scope",
    "buffered",
    "close_buffer",
    "discard",
    "emit",
    "handler_scope",
    "open_buffer",
    "scope",
    "scope_async",
    "transmit",
    "transmit_async",
]


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
    pending = buffer.current()
    run = task_scope.current_run()
    if run is not None and (pending is None or pending.owner is not run):
        # The run's first emit outside a scope of its own: its events leave with the run.
        pending, token = buffer.start(run)
        task_scope.track(run, token)
    elif pending is None:
        if _scope_required():
            raise NoActiveScope(
                f"emit({event.event_name!r}) outside a scope: open one with scope(), or emit "
                "from a Celery task, a handler or a request with DomainEventsMiddleware"
            )
        pending, _ = buffer.start()
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

    __slots__ = ("_token", "app", "owner", "transmit_on_exit")

    def __init__(self, app: Celery | None, transmit_on_exit: bool, owner: Any = ...) -> None:
        self.app = app
        self.transmit_on_exit = transmit_on_exit
        self.owner = owner

    def __enter__(self) -> None:
        self._token = open_buffer(owner=self.owner)

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


def handler_scope(app: Celery) -> Scope:
    """The scope of one handler run: :func:`scope`, owned by no task run (no lookup)."""
    return Scope(app, True, owner=None)


def scope_async(app: Celery | None = None, *, transmit_on_exit: bool = True) -> AsyncScope:
    """Run a unit of work from asyncio: transmit its events if the block succeeds, else discard.

    ``async with scope_async(app):`` is :func:`scope` with :func:`transmit_async`.

    The scope belongs to the asyncio task that enters it: events emitted by other tasks
    (each has its own context) never join it.

    Raises:
        PublishError: as for :func:`transmit_async`, when the block succeeded.
    """
    return AsyncScope(app, transmit_on_exit)


class AsyncScope:
    """The async context manager :func:`scope_async` returns."""

    __slots__ = ("_token", "app", "transmit_on_exit")

    def __init__(self, app: Celery | None, transmit_on_exit: bool) -> None:
        self.app = app
        self.transmit_on_exit = transmit_on_exit

    async def __aenter__(self) -> None:
        self._token = open_buffer()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                if self.transmit_on_exit:
                    await transmit_async(self.app)
            else:
                discard()
        except BaseException:
            discard()
            raise
        finally:
            close_buffer(self._token)


def open_buffer(*, owner: Any = ...) -> contextvars.Token[buffer.Buffer | None]:
    """Start a fresh, empty buffer in this context (for integrations); see :func:`scope`.

    ``owner`` is the task run it belongs to; by default, the run of the task executing here.
    """
    if owner is ...:
        owner = task_scope.current_run()
    return buffer.open_buffer(owner)


def _scope_required() -> bool:
    try:
        return DomainEvents.of(_current_app).settings.require_scope
    except ConfigurationError:
        return False


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
    if not buffer.current():
        return []
    ext = DomainEvents.of(app or _current_app)
    return buffer.flush(lambda batch: publish_events(ext, batch))


async def transmit_async(app: Celery | None = None) -> list[AnyEvent]:
    """Publish the buffered events from asyncio and wait for RabbitMQ's confirms.

    :func:`transmit` without blocking the event loop: the same deadline
    (``domain_events_publish_timeout``), the same ``PublishError`` (exactly the unconfirmed
    events stay buffered), through aio-pika with one connection per event loop.

    Raises:
        PublishError: as for :func:`transmit`.
        ConfigurationError: the app has no ``DomainEvents``, or aio-pika is not installed
            (``pip install 'celery-domain-events[asyncio]'``).
    """
    if not buffer.current():
        return []
    ext = DomainEvents.of(app or _current_app)
    return await buffer.flush_async(lambda batch: publish_events_async(ext, batch))
