"""The ledger in the admin (the outbox is there too, read-only, from the outbox app)."""

from django.contrib import admin

from .models import Invoice, LedgerEntry


@admin.register(LedgerEntry)
class LedgerEntryAdmin(admin.ModelAdmin):
    list_display = ("order_id", "amount", "booked_at", "event_id")
    search_fields = ("=order_id", "event_id")


@admin.register(Invoice)
class InvoiceAdmin(admin.ModelAdmin):
    list_display = ("id", "customer", "amount", "issued_at")
