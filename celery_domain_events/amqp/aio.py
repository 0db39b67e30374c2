"""Publish with batched publisher confirms from asyncio, through aio-pika.

The asyncio twin of :mod:`.confirm`, with the same promises: one deadline
(``domain_events_publish_timeout``) bounds connecting, publishing, waiting for the confirms and
re-sending what a lost connection left unconfirmed; refused credentials or an unknown vhost fail
at once; only unconfirmed messages are sent again, and exactly those end up in
``PublishError.events``. Nothing here blocks the event loop: while the broker is down the loop
keeps serving other requests.

aio-pika (on aiormq) is the AMQP client: the most used asyncio AMQP 0-9-1 client, maintained,
typed, with publisher confirms as awaitables. Each event loop of the process keeps **one**
connection and one confirm channel, opened on the first publish and reused by every later one
(concurrent transmits share the channel: each publish awaits its own confirm).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from kombu import Exchange, Queue
from kombu.utils.url import maybe_sanitize_url

from celery_domain_events.exceptions import PublishError
from celery_domain_events.wire.message import OutboundMessage
from celery_domain_events.wire.topology import Auxiliary

__all__ = ["AioPikaTransport"]

log = logging.getLogger(__name__)

# Failures that waiting cannot fix: wrong credentials, an unknown vhost (aiormq reports a
# Connection.Close in place of OpenOk as a frame error), a server that is no AMQP 0-9-1 broker,
# an exchange that exists with other arguments or that the user may not write to.
_IRRECOVERABLE: tuple[type[BaseException], ...] = (
    aiormq.exceptions.ChannelPreconditionFailed,
    aiormq.exceptions.ChannelAccessRefused,
    aiormq.exceptions.AuthenticationError,
    aiormq.exceptions.ProbableAuthenticationError,
    aiormq.exceptions.IncompatibleProtocolError,
    aiormq.exceptions.ConnectionNotAllowed,
    aiormq.exceptions.InvalidFrameError,
)
# Failures a new connection or channel may fix (a broker restart, a lost node, a closed channel).
_RECOVERABLE: tuple[type[BaseException], ...] = (
    ConnectionError,  # aiormq's AMQPConnectionError too
    OSError,
    asyncio.TimeoutError,
    aiormq.exceptions.AMQPChannelError,
    aiormq.exceptions.ChannelInvalidStateError,
)


class _Unroutable(Exception):
    """A message that must reach a queue came back from the broker (basic.return)."""


_RETRIED: tuple[type[BaseException], ...] = (*_RECOVERABLE, _Unroutable)


@dataclass
class _Link:
    """The connection and confirm channel of one event loop."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    connection: AbstractConnection | None = None
    channel: AbstractChannel | None = None
    exchanges: dict[str, AbstractExchange] = field(default_factory=dict)
    declared: set[tuple[str, str]] = field(default_factory=set)

    def usable(self) -> bool:
        return (
            self.connection is not None
            and not self.connection.is_closed
            and self.channel is not None
            and not self.channel.is_closed
        )

    async def reset(self) -> None:
        connection, self.connection, self.channel = self.connection, None, None
        self.exchanges.clear()
        self.declared.clear()
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()


class AioPikaTransport:
    """Publish from asyncio with batched confirms, one connection per event loop."""

    def __init__(self, urls: Sequence[str], timeout: Any) -> None:
        """Publish to the first reachable of ``urls`` within the deadline ``timeout()`` returns.

        ``urls`` are AMQP URLs with credentials, tried in turn like kombu's failover list.
        """
        if not urls:
            raise ValueError("AioPikaTransport needs at least one broker URL")
        self._urls = list(urls)
        self._timeout = timeout
        self._links: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Link]
        self._links = weakref.WeakKeyDictionary()
        self._next_url = 0

    def _link(self) -> _Link:
        loop = asyncio.get_running_loop()
        link = self._links.get(loop)
        if link is None:
            link = self._links[loop] = _Link()
        return link

    async def close(self) -> None:
        """Close this event loop's connection (at shutdown, in the ASGI lifespan)."""
        link = self._links.pop(asyncio.get_running_loop(), None)
        if link is not None:
            await link.reset()

    async def publish_async(
        self, messages: Sequence[OutboundMessage], declare: Sequence[Any] = ()
    ) -> None:
        """Publish ``messages`` and return once RabbitMQ has confirmed every one.

        Raises:
            PublishError: some messages were still unconfirmed at the deadline, or the broker
                refused the connection (credentials, vhost); exactly the unconfirmed messages'
                ``source`` objects are in ``PublishError.events``.
        """
        timeout = float(self._timeout())
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + timeout
        pending = list(messages)
        error: BaseException | str | None = None
        delay = 0.1
        link = self._link()
        while pending:
            remaining = give_up_at - loop.time()
            if remaining <= 0:
                raise PublishError(
                    f"could not publish {len(pending)} message(s) to {self._where()} within "
                    f"{timeout:g} s (domain_events_publish_timeout): {error!r}",
                    _sources(pending),
                ) from error if isinstance(error, BaseException) else None
            try:
                await asyncio.wait_for(self._open(link, declare), remaining)
                pending, nacked, failure = await self._publish_once(
                    link, pending, give_up_at - loop.time()
                )
                if failure is not None:
                    raise failure
            except _IRRECOVERABLE as exc:
                await link.reset()
                reason = repr(exc)
                if isinstance(exc, aiormq.exceptions.InvalidFrameError):
                    # aiormq's words for a Connection.Close in place of Connection.OpenOk.
                    reason = (
                        "the broker refused to open the vhost (does it exist, may the user use it?)"
                    )
                raise PublishError(
                    f"could not publish {len(pending)} message(s) to {self._where()}: {reason}",
                    _sources(pending),
                ) from exc
            except _RETRIED as exc:
                # The channel and maybe the connection are unusable: open fresh ones (which
                # declare again) and re-send everything not yet confirmed.
                error = exc
                await link.reset()
                failed_at = self._where()
                self._next_url += 1  # the next attempt tries the next URL of the list
                log.warning(
                    "Publishing to %s failed (%r); %d message(s) unconfirmed, retrying",
                    failed_at,
                    exc,
                    len(pending),
                )
            else:
                if not pending:
                    return
                error = f"{nacked} message(s) nacked by the broker"
            await asyncio.sleep(max(0.0, min(delay, give_up_at - loop.time())))
            delay = min(delay * 2, 1.0)

    def _where(self) -> str:
        return str(maybe_sanitize_url(self._urls[self._next_url % len(self._urls)]))

    async def _open(self, link: _Link, declare: Sequence[Any]) -> dict[str, AbstractExchange]:
        async with link.lock:  # one connect at a time per loop; the others wait and reuse it
            if not link.usable():
                await link.reset()
                url = self._urls[self._next_url % len(self._urls)]
                link.connection = await aio_pika.connect(url)
                # on_return_raises: a returned message fails its own publish, and only that one.
                link.channel = await link.connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
            assert link.channel is not None
            for entity in declare:
                key = (type(entity).__name__, entity.name)
                if key not in link.declared:
                    await _declare(link, entity)
                    link.declared.add(key)
            return link.exchanges

    async def _publish_once(
        self, link: _Link, batch: list[OutboundMessage], remaining: float
    ) -> tuple[list[OutboundMessage], int, BaseException | None]:
        """Publish ``batch`` and wait up to ``remaining`` seconds for the confirms.

        Returns:
            The messages still unconfirmed, how many of them the broker nacked, and the
            failure that makes a new channel necessary (a lost connection, a missing confirm,
            an unroutable message that must reach a queue), if any.
        """
        channel = link.channel
        assert channel is not None
        futures = [
            asyncio.ensure_future(
                _exchange(link, channel, msg.exchange).publish(
                    _message(msg), msg.routing_key, mandatory=msg.mandatory
                )
            )
            for msg in batch
        ]
        _, not_done = await asyncio.wait(futures, timeout=max(0.0, remaining))
        for future in not_done:
            future.cancel()
        if not_done:
            await asyncio.gather(*not_done, return_exceptions=True)
        unconfirmed: list[OutboundMessage] = []
        nacked = 0
        failure: BaseException | None = None
        if not_done:
            failure = asyncio.TimeoutError(f"{len(not_done)} publisher confirm(s) still missing")
        for msg, future in zip(batch, futures, strict=True):
            exc = failure if future in not_done else future.exception()
            if exc is None:
                continue
            if isinstance(exc, aiormq.exceptions.PublishError):  # basic.return
                if not msg.must_route:
                    # Acked too: handled, by being dropped (no unrouted queue is configured).
                    log.warning(
                        "Event %r was unroutable on exchange %r and was dropped by the broker",
                        msg.routing_key,
                        msg.exchange,
                    )
                    continue
                exc = _Unroutable(
                    f"no queue bound for {msg.routing_key!r} on exchange {msg.exchange!r}"
                )
            unconfirmed.append(msg)
            if isinstance(exc, aiormq.exceptions.DeliveryError):
                nacked += 1  # a nack: the same channel may take it again
            elif failure is None:
                failure = exc
        return unconfirmed, nacked, failure


def _exchange(link: _Link, channel: AbstractChannel, name: str) -> AbstractExchange:
    exchange = link.exchanges.get(name)
    if exchange is None:
        # Not declared here (see _declare): an unknown exchange is the broker's to report.
        exchange = link.exchanges[name] = aio_pika.Exchange(
            channel, name, durable=False, auto_delete=False
        )
    return exchange


def _message(msg: OutboundMessage) -> aio_pika.Message:
    properties = msg.properties
    timestamp = properties.get("timestamp")
    return aio_pika.Message(
        msg.body,
        content_type=msg.content_type,
        content_encoding=msg.content_encoding,
        headers=msg.headers or None,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=properties.get("message_id"),
        type=properties.get("type"),
        timestamp=timestamp,
        app_id=properties.get("app_id"),
        correlation_id=properties.get("correlation_id"),
        priority=properties.get("priority"),
    )


def _sources(messages: Sequence[OutboundMessage]) -> list[Any]:
    return [m.source if m.source is not None else m for m in messages]


async def _declare(link: _Link, entity: Any) -> None:
    """Declare a kombu ``Exchange``, ``Queue`` or :class:`Auxiliary` queue through aio-pika."""
    channel = link.channel
    assert channel is not None
    assert link.connection is not None
    if isinstance(entity, Exchange):
        await _declare_exchange(channel, entity)
    elif isinstance(entity, Auxiliary):
        # As the sync Auxiliary: its own channel, so a refusal cannot close ours; logged.
        aux = await link.connection.channel(publisher_confirms=False)
        try:
            await _declare_queue(aux, entity.queue)
        except Exception as exc:
            log.warning(
                "Domain events: could not declare %r (%s); carrying on without changing it. %s",
                entity.name,
                exc,
                entity.advice,
            )
        finally:
            with contextlib.suppress(Exception):
                await aux.close()
    elif isinstance(entity, Queue):
        await _declare_queue(channel, entity)
    else:
        raise TypeError(f"cannot declare {entity!r}")


async def _declare_exchange(channel: AbstractChannel, exchange: Exchange) -> AbstractExchange:
    return await channel.declare_exchange(
        exchange.name,
        type=exchange.type,
        durable=exchange.durable,
        auto_delete=exchange.auto_delete,
        arguments=exchange.arguments or None,
    )


async def _declare_queue(channel: AbstractChannel, queue: Queue) -> None:
    exchange = None
    if queue.exchange is not None and queue.exchange.name:
        exchange = await _declare_exchange(channel, queue.exchange)
    declared = await channel.declare_queue(
        queue.name,
        durable=queue.durable,
        exclusive=queue.exclusive,
        auto_delete=queue.auto_delete,
        arguments=queue.queue_arguments or None,
    )
    if exchange is not None:
        await declared.bind(exchange, routing_key=queue.routing_key or "")
    for binding in queue.bindings or ():
        if binding.exchange is None:
            continue
        bound = await _declare_exchange(channel, binding.exchange)
        await declared.bind(bound, routing_key=binding.routing_key or "")
