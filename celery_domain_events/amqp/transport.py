"""The transport seam: where a ``DomainEvents`` hands its messages to be published.

The default, :class:`AmqpTransport`, publishes through the Celery app's connection pool with
batched publisher confirms. The in-process test harness passes its own (see
``celery_domain_events.testing``), as httpx's ``MockTransport`` replaces the network.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from celery_domain_events.wire.message import OutboundMessage

from .confirm import publish_confirmed

__all__ = ["AmqpTransport", "Transport"]


@runtime_checkable
class Transport(Protocol):
    """Publishes messages, returning only once each is confirmed.

    ``transmit_async`` awaits the transport's ``async def publish_async(messages, declare)``
    if it has one (the test harness's does), and otherwise runs ``publish`` in a thread.
    """

    def publish(self, messages: Sequence[OutboundMessage], declare: Sequence[Any] = ()) -> None:
        """Publish ``messages`` in order, declaring ``declare`` (kombu entities) first.

        Raises:
            PublishError: some were not confirmed; exactly those are in ``error.events``.
        """


class AmqpTransport:
    """Publish from a kombu connection pool with batched confirms, under one deadline."""

    def __init__(self, acquire: Callable[[], Any], timeout: Callable[[], float]) -> None:
        """Publish with connections from ``acquire`` within the deadline ``timeout()`` returns.

        ``acquire()`` returns a context manager of a kombu Connection (``app.pool.acquire``);
        ``timeout()`` is read at each publish.
        """
        self._acquire = acquire
        self._timeout = timeout

    def publish(self, messages: Sequence[OutboundMessage], declare: Sequence[Any] = ()) -> None:
        """Publish ``messages`` and wait for RabbitMQ's confirms (see ``publish_confirmed``)."""
        publish_confirmed(self._acquire, messages, timeout=self._timeout(), declare=declare)
