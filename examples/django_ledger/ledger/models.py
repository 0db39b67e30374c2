"""The ledger's tables."""

from django.db import models


class LedgerEntry(models.Model):
    """One booked payment. ``order_id`` is unique: booking an order twice is a no-op."""

    order_id = models.BigIntegerField(unique=True)
    amount = models.DecimalField(max_digits=12, decimal_places=2)
    event_id = models.CharField(max_length=64, help_text="the order.paid event booked here")
    booked_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "ledger entries"

    def __str__(self) -> str:
        return f"order {self.order_id}: {self.amount}"


class Invoice(models.Model):
    """An invoice issued through ``POST /invoices/``."""

    customer = models.CharField(max_length=200)
    amount = models.DecimalField(max_digits=12, decimal_places=2)
    issued_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"invoice {self.pk} to {self.customer}: {self.amount}"
