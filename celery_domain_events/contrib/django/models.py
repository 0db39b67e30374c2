"""The outbox table as a Django model (the same table the SQLAlchemy outbox uses)."""

from __future__ import annotations

from typing import Any

from django.db import models

from celery_domain_events.contrib._outbox_rows import DEFAULT_TABLE_NAME

__all__ = ["InboxEntry", "OutboxMessage"]


class OutboxMessage(models.Model):
    """One event waiting to be relayed: the exact message a publish would send."""

    id = models.CharField(primary_key=True, max_length=36, help_text="event id (CloudEvents id)")
    created_at = models.DateTimeField(db_index=True)
    exchange = models.CharField(max_length=255)
    routing_key = models.CharField(max_length=255)
    body = models.BinaryField(help_text="CloudEvents JSON, as published")
    properties = models.JSONField()
    headers = models.JSONField()
    attempts = models.IntegerField(default=0)

    class Meta:
        """The table the SQLAlchemy outbox uses too."""

        db_table = DEFAULT_TABLE_NAME
        ordering = ("created_at", "id")
        verbose_name = "outbox message"

    def __str__(self) -> str:
        return f"{self.routing_key} {self.id}"

    @property
    def event(self) -> Any:
        """The CloudEvents JSON body, parsed (for the admin)."""
        import json  # noqa: PLC0415 (admin only)

        return json.loads(bytes(self.body))


class InboxEntry(models.Model):
    """One ``(handler, event id)`` an idempotent handler has handled (``DjangoInbox``).

    The SQLAlchemy inbox's table (``define_inbox_table``), plus the ``id`` Django needs: the
    unique constraint is the SQLAlchemy table's composite primary key.
    """

    handler = models.CharField(max_length=200, help_text="handler name")
    event_id = models.CharField(max_length=255, help_text="CloudEvents id")
    handled_at = models.DateTimeField(db_index=True)

    class Meta:
        """The table the SQLAlchemy inbox uses too."""

        db_table = "domain_events_inbox"  # contrib.inbox.DEFAULT_INBOX_TABLE (needs SQLAlchemy)
        ordering = ("-handled_at",)
        verbose_name = "inbox entry"
        verbose_name_plural = "inbox entries"
        constraints = (
            models.UniqueConstraint(
                fields=("handler", "event_id"), name="domain_events_inbox_handler_event_id"
            ),
        )

    def __str__(self) -> str:
        return f"{self.handler} {self.event_id}"
