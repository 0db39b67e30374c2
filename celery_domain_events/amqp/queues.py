"""Queues over AMQP: declaring the topology, a queue's depth, reading a dead-letter queue."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from amqp.exceptions import PreconditionFailed
from kombu import Connection
from kombu.common import ignore_errors

from celery_domain_events.exceptions import ConfigurationError
from celery_domain_events.wire.dead_letter import DeadLetter, letter_from
from celery_domain_events.wire.topology import Auxiliary

__all__ = ["declare", "declare_entity", "depth", "depths", "process"]

log = logging.getLogger(__name__)


def depth(conn: Connection, queue: str) -> int | None:
    """Return the number of messages in ``queue``, or None if it does not exist."""
    channel: Any = conn.channel()  # transport channel: the stubs only know StdChannel
    try:
        _, count, _ = channel.queue_declare(queue, passive=True)
        return int(count)
    except conn.channel_errors:
        return None
    finally:
        ignore_errors(conn, channel.close)


def depths(conn: Connection, names: list[str]) -> dict[str, int | None]:
    """Return the number of messages in each queue of ``names`` (None: it does not exist).

    One channel for all of them (a passive declare each), opened again only after a missing
    queue made the broker close it.
    """
    found: dict[str, int | None] = {}
    channel: Any = None
    try:
        for name in names:
            if channel is None:
                channel = conn.channel()
            try:
                _, count, _ = channel.queue_declare(name, passive=True)
                found[name] = int(count)
            except conn.channel_errors:
                found[name] = None
                channel = None  # the broker closed it
    finally:
        if channel is not None:
            ignore_errors(conn, channel.close)
    return found


def process(
    conn: Connection,
    queue: str,
    select: Callable[[DeadLetter], bool] = lambda _: True,
    act: Callable[[DeadLetter], None] | None = None,
    *,
    limit: int | None = None,
) -> list[DeadLetter]:
    """Read the dead letters of ``queue``; ``act`` on the selected ones, then ack them.

    Messages are fetched unacked; those not selected (or all of them, when ``act`` is None,
    as for ``list`` and dry runs) return to the queue in their order when the channel closes.
    If ``act`` raises, the message it failed on is not acked and stays dead-lettered. Copies
    of a failure already seen (same ``x-failure-key``) are counted in its ``copies`` and, when
    it was acted on, acked without acting again.

    Returns:
        The selected dead letters, one per failure (at most ``limit``).
    """
    channel: Any = conn.channel()  # transport channel: the stubs only know StdChannel
    selected: list[DeadLetter] = []
    seen: dict[str, int] = {}  # failure key -> its index in selected
    try:
        _, count, _ = channel.queue_declare(queue, passive=True)
        for _ in range(count):
            raw = channel.basic_get(queue, no_ack=False)
            if raw is None:
                break
            letter = letter_from(queue, raw)
            if letter.key is not None and letter.key in seen:
                first = seen[letter.key]
                selected[first] = replace(selected[first], copies=selected[first].copies + 1)
                if act is not None:
                    channel.basic_ack(raw.delivery_tag)
                continue
            if limit is not None and len(selected) >= limit:
                continue  # still read on: later copies of the selected ones are counted
            if not select(letter):
                continue
            if letter.key is not None:
                seen[letter.key] = len(selected)
            selected.append(letter)
            if act is not None:
                act(letter)
                channel.basic_ack(raw.delivery_tag)
    finally:
        ignore_errors(conn, channel.close)
    return selected


def declare_entity(entity: Any, channel: Any) -> None:
    """Declare a kombu ``Exchange`` or ``Queue`` on ``channel``, or an :class:`Auxiliary` queue.

    An auxiliary queue is declared on a fresh channel of ``channel``'s connection and never
    raises: a refusal would close the channel it was declared on, so it is logged with the
    queue's advice instead.
    """
    if not isinstance(entity, Auxiliary):
        entity.declare(channel=channel)
        return
    new_channel = getattr(channel.connection, "channel", None)
    aux = new_channel() if callable(new_channel) else channel  # kombu memory:// has none
    try:
        entity.queue.declare(channel=aux)
    except Exception as exc:
        log.warning(
            "Domain events: could not declare %r (%s); carrying on without changing it. %s",
            entity.name,
            getattr(exc, "reply_text", exc),
            entity.advice,
        )
    finally:
        if aux is not channel:
            with contextlib.suppress(Exception):
                aux.close()


def declare(entities: list[Any], channel: Any) -> None:
    """Declare ``entities`` (exchanges, queues with bindings, ``wire.topology.Auxiliary`` queues).

    Raises:
        ConfigurationError: RabbitMQ refused to declare an exchange or a handler queue
            (PRECONDITION_FAILED: it exists with other arguments, such as another queue
            type). Auxiliary queues (unrouted, DLQs) are never fatal.
    """
    for entity in entities:
        try:
            declare_entity(entity, channel)
        except PreconditionFailed as exc:
            raise ConfigurationError(
                f"RabbitMQ refused to declare {type(entity).__name__.lower()} "
                f"{entity.name!r}: {exc.reply_text}. It exists with other arguments; "
                "delete it or align the domain_events_* settings with it."
            ) from exc
