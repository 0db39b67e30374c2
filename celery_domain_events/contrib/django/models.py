"""The outbox table as a Django model (the same table the SQLAlchemy outbox uses)."""

from __future__ import annotations

from typing import Any

from django.db import models

from celery_domain_events.contrib._outbox_rows import DEFAULT_TABLE_NAME

__all__ = ["OutboxMessage"]


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
