"""The Django inbox: idempotent handlers whose ORM writes commit with the inbox row.

::

    # settings.py: INSTALLED_APPS = [..., "celery_domain_events.contrib.django"]; then migrate
    from celery_domain_events.contrib.django.inbox import DjangoInbox

    inbox = DjangoInbox()

    @domain_event_handler("order.placed", idempotent=inbox)
    def project(event: OrderPlaced) -> None:
        Projection.objects.create(order_id=event.order_id)  # joins the inbox's atomic block

Each run opens ``transaction.atomic(using=...)``, inserts an :class:`InboxEntry` in a savepoint
(a nested ``atomic()``) and runs the handler inside: its writes on that database commit with
the entry, or roll back with it if the handler raises (the retry runs it again). A duplicate's
insert violates the unique constraint on ``(handler, event_id)``: nothing is committed and the
handler is skipped. On PostgreSQL a second delivery of an event being handled waits on the
first one's row, then is skipped, or runs if the first rolled back.

The table is ``domain_events_inbox``, as the SQLAlchemy inbox's, plus an ``id`` column (Django
before 5.2 has no composite primary key): the SQLAlchemy inbox can use the table Django
created, not the reverse.
Delete old rows with ``python manage.py domain_events_inbox_purge``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from django.db import DEFAULT_DB_ALIAS, IntegrityError, transaction
from django.utils import timezone

from celery_domain_events.contrib.django.models import InboxEntry

__all__ = ["DjangoInbox"]


class DjangoInbox:
    """An inbox in a Django database; see the module docstring.

    Args:
        using: the database alias of the inbox table, and of the transaction the handler's
            writes must use to commit with it.
    """

    def __init__(self, using: str = DEFAULT_DB_ALIAS) -> None:
        self.using = using

    def __repr__(self) -> str:
        return f"DjangoInbox(using={self.using!r})"

    @contextmanager
    def claim(self, handler: str, event_id: str) -> Iterator[bool]:
        """Open an atomic block and claim ``(handler, event_id)`` in it; see ``inbox.Inbox``."""
        with transaction.atomic(using=self.using):
            try:
                with transaction.atomic(using=self.using):
                    InboxEntry.objects.using(self.using).create(
                        handler=handler, event_id=event_id, handled_at=timezone.now()
                    )
            except IntegrityError:  # committed by an earlier delivery: a duplicate
                yield False
                return
            yield True

    def purge(self, older_than: timedelta) -> int:
        """Delete the entries of events handled more than ``older_than`` ago; return how many.

        A duplicate of a purged event would run the handler again: keep the window longer than
        redeliveries, relays and replays can lag (DLQs included).
        """
        cutoff = timezone.now() - older_than
        deleted, _ = InboxEntry.objects.using(self.using).filter(handled_at__lt=cutoff).delete()
        return int(deleted)
