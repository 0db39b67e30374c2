"""The invoice API: the event goes out after the request's transaction commits."""

import json
from decimal import Decimal, InvalidOperation

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from celery_domain_events.contrib.django import emit_on_commit

from .events import InvoiceIssued
from .models import Invoice


@csrf_exempt  # a JSON API for other services, not a browser form
@require_POST
def issue_invoice(request: HttpRequest) -> HttpResponse:
    """``POST /invoices/ {"customer": "ada", "amount": "19.90"}``: create an invoice.

    With ``ATOMIC_REQUESTS`` the view runs in one transaction; ``emit_on_commit`` holds
    ``invoice.issued`` until it commits, and drops it if the view raises (rollback).
    """
    try:
        payload = json.loads(request.body)
        customer, amount = str(payload["customer"]), Decimal(payload["amount"])
    except (ValueError, KeyError, TypeError, InvalidOperation):
        return JsonResponse({"error": 'expected {"customer": str, "amount": decimal}'}, status=400)
    invoice = Invoice.objects.create(customer=customer, amount=amount)
    emit_on_commit(InvoiceIssued(invoice_id=invoice.pk, customer=customer, amount=amount))
    return JsonResponse({"invoice_id": invoice.pk}, status=201)
