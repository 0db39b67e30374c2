"""The outbox in the Django admin: read-only, to see what waits and how often it failed."""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin

from celery_domain_events.contrib.django.models import OutboxMessage

__all__ = ["OutboxMessageAdmin"]


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
