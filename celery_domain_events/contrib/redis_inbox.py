"""A Redis inbox: idempotent handlers whose side effects are not in a database of yours.

::

    from redis import Redis

    inbox = RedisInbox(Redis.from_url("redis://localhost:6379/0"))

    @domain_event_handler("order.placed", idempotent=inbox)
    def notify(event: OrderPlaced) -> None:
        push_notification(event.order_id)

Each run sets the key ``<prefix><handler>:<event id>`` to ``"processing"`` if it is absent
(``SET NX``, expiring after ``lease``), runs the handler, and then marks the key ``"done"`` for
``ttl``. A handler that raises deletes the key, so its retry runs again. A delivery that finds
``"done"`` is a duplicate and is skipped; one that finds ``"processing"`` raises
:class:`~celery_domain_events.exceptions.InboxBusy`, and its task retries once the lease has
expired.

It is weaker than a database inbox, whose row commits in the same transaction as the
handler's writes:

* the side effects and the ``"done"`` mark are not atomic: a worker that dies after the side
  effects and before the mark (or whose ``SET`` fails) leaves ``"processing"``, and the
  handler runs again once the lease has expired;
* a handler that runs longer than ``lease`` loses its claim: a concurrent delivery may run it
  a second time. Keep ``lease`` above the handler's time limit;
* keys expire after ``ttl``: a duplicate that arrives later runs the handler again; Redis may
  also evict keys under ``maxmemory`` unless its policy is ``noeviction`` or ``volatile-*``
  with enough room, and a failover to a replica may lose the latest marks.

Install with the ``redis`` extra (redis-py >= 5). Sync handlers only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from celery_domain_events.exceptions import InboxBusy

__all__ = ["DEFAULT_PREFIX", "RedisInbox"]

#: Prefix of the inbox's keys unless you choose another.
DEFAULT_PREFIX = "domain_events:inbox:"

_PROCESSING = b"processing"
_DONE = b"done"


def _ms(duration: timedelta, name: str) -> int:
    if not isinstance(duration, timedelta):
        raise TypeError(
            f"RedisInbox {name} must be a timedelta, e.g. {name}=timedelta(days=7); "
            f"got {duration!r}"
        )
    ms = int(duration.total_seconds() * 1000)
    if ms <= 0:
        raise ValueError(f"RedisInbox {name} must be positive, not {duration}")
    return ms


class RedisInbox:
    """An inbox of Redis keys; see the module docstring for what it does not guarantee.

    Args:
        client: a ``redis.Redis`` client (``decode_responses`` either way).
        ttl: how long a handled event is remembered.
        lease: how long a claim holds while the handler runs; a delivery that finds it
            retries after it expires.
        prefix: the prefix of the keys.
    """

    def __init__(
        self,
        client: Any,
        ttl: timedelta = timedelta(days=7),
        lease: timedelta = timedelta(minutes=5),
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        self.client = client
        self.ttl_ms = _ms(ttl, "ttl")
        self.lease_ms = _ms(lease, "lease")
        self.prefix = prefix

    @property
    def max_retry_after(self) -> float:
        """The longest ``InboxBusy.retry_after`` this inbox gives, in seconds: the lease."""
        return self.lease_ms / 1000

    def key(self, handler: str, event_id: str) -> str:
        """The Redis key of ``(handler, event_id)``."""
        return f"{self.prefix}{handler}:{event_id}"

    @contextmanager
    def claim(self, handler: str, event_id: str) -> Iterator[bool]:
        """Claim the pair for ``lease``; mark it done if the block succeeds, free it if not.

        Raises:
            InboxBusy: another delivery holds the pair (running, or crashed mid-handler).
        """
        key = self.key(handler, event_id)
        if not self.client.set(key, _PROCESSING, nx=True, px=self.lease_ms):
            state = self.client.get(key)
            if _as_bytes(state) == _DONE:
                yield False
                return
            if state is not None:  # "processing"
                left = max(int(self.client.pttl(key)), 0) / 1000
                raise InboxBusy(
                    f"{handler} is already handling event {event_id} (or crashed in it): "
                    f"retry once its lease expires in {left:.0f} s",
                    retry_after=left,
                )
            # The key expired between SET and GET: claim it again.
            if not self.client.set(key, _PROCESSING, nx=True, px=self.lease_ms):
                raise InboxBusy(
                    f"{handler} is already handling event {event_id}: retry later",
                    retry_after=1.0,
                )
        try:
            yield True
        except BaseException:
            self.client.delete(key)
            raise
        self.client.set(key, _DONE, px=self.ttl_ms)


def _as_bytes(value: Any) -> bytes | None:
    if value is None:
        return None
    return value.encode() if isinstance(value, str) else bytes(value)
