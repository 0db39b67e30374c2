"""URLs: the invoice API and the admin (which shows the outbox, read-only)."""

from django.contrib import admin
from django.urls import path
from ledger import views

urlpatterns = [
    path("invoices/", views.issue_invoice, name="issue-invoice"),
    path("admin/", admin.site.urls),
]
