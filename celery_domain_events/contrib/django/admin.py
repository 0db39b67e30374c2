"""The outbox and the inbox in the Django admin, read-only: what waits, what was handled."""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin

from celery_domain_events.contrib.django.models import InboxEntry, OutboxMessage

__all__ = ["InboxEntryAdmin", "OutboxMessageAdmin"]


@admin.register(OutboxMessage)
class OutboxMessageAdmin(admin.ModelAdmin):
    """Rows are written by ``outbox.add`` and deleted by the relay: never edited by hand."""

    list_display = ("id", "routing_key", "created_at", "attempts")
    list_filter = ("routing_key",)
    search_fields = ("id", "routing_key")
    ordering = ("created_at", "id")
    readonly_fields = ("id", "created_at", "exchange", "routing_key", "attempts", "event_json")
    exclude = ("body", "properties", "headers")

    @admin.display(description="event")
    def event_json(self, obj: OutboxMessage) -> str:
        """The CloudEvent as it will be published."""
        return json.dumps(obj.event, indent=2, ensure_ascii=False)

    def has_add_permission(self, request: Any) -> bool:
        """Rows come from ``outbox.add`` only."""
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        """The relay publishes rows exactly as they were written."""
        return False


@admin.register(InboxEntry)
class InboxEntryAdmin(admin.ModelAdmin):
    """Entries are written by ``DjangoInbox`` and deleted by ``domain_events_inbox_purge``."""

    list_display = ("handler", "event_id", "handled_at")
    list_filter = ("handler",)
    search_fields = ("event_id", "handler")
    ordering = ("-handled_at",)
    readonly_fields = ("handler", "event_id", "handled_at")

    def has_add_permission(self, request: Any) -> bool:
        """Entries come from handler runs only."""
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        """An entry records what happened."""
        return False
