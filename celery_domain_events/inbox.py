"""Effectively-once handlers: an inbox of the ``(handler, event id)`` pairs already handled.

Delivery is at least once: a redelivery after a crash, an outbox relay that published twice, a
replay, a publisher's retry. An idempotent handler records ``(handler, event id)`` in the same
database transaction as its side effects, so that the pair is committed if and only if they are::

    inbox = SqlAlchemyInbox(Session)                  # contrib.inbox; DjangoInbox, RedisInbox

    @domain_event_handler("order.placed", idempotent=inbox)
    def project(event: OrderPlaced) -> None:
        inbox.session.add(OrderRow(id=event.order_id))   # the inbox row's transaction

A delivery whose pair is already there is skipped and acked, logged, and shown in Flower as the
task's result ``"duplicate"``. Two concurrent deliveries of one event are decided by the
database's unique key: the second insert waits for the first transaction, then fails (skip)
or, if the first rolled back, succeeds (run). The key includes the handler, because each
handler must see each event once (MassTransit#3543).

An inbox is any object with the :class:`Inbox` method (and :class:`AsyncInbox`'s, for
``async def`` handlers). An inbox that raises
:class:`~celery_domain_events.exceptions.InboxBusy` also says how long a claim can keep it busy,
in seconds, as ``max_retry_after`` (:class:`~.contrib.redis_inbox.RedisInbox`: its lease): a
worker holds such a retry that long, however short the handler's own backoff.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Protocol, runtime_checkable

__all__ = ["DUPLICATE", "AsyncInbox", "Inbox"]

#: What a skipped duplicate delivery returns: its task's result, as Flower shows it.
DUPLICATE = "duplicate"


@runtime_checkable
class Inbox(Protocol):
    """Claims ``(handler, event id)`` in a unit of work that commits with the handler's."""

    def claim(self, handler: str, event_id: str) -> AbstractContextManager[bool]:
        """Open the unit of work and claim the pair in it.

        The context manager yields True when the pair is new: the handler runs inside, and the
        unit commits when the block ends without an exception (rolls back otherwise). It
        yields False for a duplicate: nothing is committed and the handler does not run.
        """


@runtime_checkable
class AsyncInbox(Protocol):
    """:class:`Inbox` for ``async def`` handlers."""

    def aclaim(self, handler: str, event_id: str) -> AbstractAsyncContextManager[bool]:
        """As :meth:`Inbox.claim`, awaited on the worker's event loop."""
