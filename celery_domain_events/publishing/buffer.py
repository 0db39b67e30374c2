"""The context-local buffer of emitted events (a thread, an asyncio task): a leaf module.

Each context sees its own buffer; a buffer records the Celery task run that opened it, so a
buffer left open around a task never collects that task's events (see :mod:`.task_scope`).
"""

from __future__ import annotations

import atexit
import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from celery_domain_events.events import AnyEvent
from celery_domain_events.exceptions import PublishError

__all__ = [
    "Buffer",
    "buffered",
    "close_buffer",
    "current",
    "discard",
    "flush",
    "flush_async",
    "new_buffer",
    "open_buffer",
    "replace",
    "start",
]


class Buffer(list[AnyEvent]):
    """Buffered events, and the task run they belong to (see :mod:`.task_scope`)."""

    __slots__ = ("owner",)

    #: The Celery request of the task run that opened this buffer, if any.
    owner: Any


def new_buffer(owner: Any = None) -> Buffer:
    """Return an empty buffer owned by task run ``owner`` (or none)."""
    # Not an __init__ override: list's own is C, and every handler run opens a buffer.
    buffer = Buffer()
    buffer.owner = owner
    return buffer


# A fresh list per context: the default must not be a shared mutable object.
_buffer: contextvars.ContextVar[Buffer | None] = contextvars.ContextVar(
    "celery_domain_events_buffer", default=None
)


def open_buffer(owner: Any = None) -> contextvars.Token[Buffer | None]:
    """Start a fresh, empty buffer in this context, owned by task run ``owner`` (or none)."""
    return _buffer.set(new_buffer(owner))


def close_buffer(token: contextvars.Token[Buffer | None]) -> None:
    """Restore the buffer that was current before :func:`open_buffer` returned ``token``."""
    _buffer.reset(token)


def buffered() -> list[AnyEvent]:
    """Return a copy of the events emitted in this context and not yet transmitted."""
    return list(_buffer.get() or ())


def discard() -> list[AnyEvent]:
    """Drop the buffered events (on rollback) and return them."""
    pending: list[AnyEvent] = _buffer.get() or []
    _buffer.set(None)
    return list(pending)


def flush(publish: Callable[[list[AnyEvent]], None]) -> list[AnyEvent]:
    """Hand the buffered events to ``publish``; those it confirmed leave the buffer.

    Raises:
        PublishError: from ``publish``; exactly the unconfirmed events (``error.events``) stay
            buffered, with whatever was emitted meanwhile.
    """
    pending = _buffer.get()
    if not pending:
        return []
    batch = list(pending)
    try:
        publish(batch)
    except PublishError as exc:
        _keep_unconfirmed(pending, batch, exc)
        raise
    del pending[: len(batch)]
    return batch


async def flush_async(publish: Callable[[list[AnyEvent]], Awaitable[None]]) -> list[AnyEvent]:
    """:func:`flush` for a coroutine ``publish``."""
    pending = _buffer.get()
    if not pending:
        return []
    batch = list(pending)
    try:
        await publish(batch)
    except PublishError as exc:
        _keep_unconfirmed(pending, batch, exc)
        raise
    del pending[: len(batch)]
    return batch


def _keep_unconfirmed(pending: Buffer, batch: list[AnyEvent], exc: PublishError) -> None:
    unconfirmed = {id(event) for event in exc.events}
    # Keep whatever was emitted meanwhile (by a callback during the wait, say).
    pending[: len(batch)] = [event for event in batch if id(event) in unconfirmed]


def current() -> Buffer | None:
    """The buffer of this context, if one is open."""
    return _buffer.get()


def replace(pending: Buffer | None) -> None:
    """Make ``pending`` the buffer of this context.

    For code that ran in a copy of this context (an ``async def`` handler): what it left
    current there becomes current here, as if it had run here.
    """
    _buffer.set(pending)


@atexit.register
def _warn_untransmitted() -> None:
    # A script that emits and exits without transmit() would drop its events without a trace.
    # Only the main thread's own context is visible here; threads and tasks end before.
    pending = _buffer.get()
    if pending:
        logging.getLogger("celery_domain_events").warning(
            "%d event(s) emitted but never transmitted (the first: %s); they are dropped: "
            "call transmit(app) after your transaction commits, or emit inside scope(app)",
            len(pending),
            pending[0].event_name,
        )


def start(owner: Any = None) -> tuple[Buffer, contextvars.Token[Buffer | None]]:
    """Open a buffer owned by ``owner`` here and return it with the token that closes it."""
    buffer = new_buffer(owner)
    return buffer, _buffer.set(buffer)
