"""``python manage.py domain_events_inbox_purge``: forget the events handled long ago."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from celery_domain_events.contrib.django.inbox import DjangoInbox
from celery_domain_events.exceptions import ConfigurationError


class Command(BaseCommand):
    """Delete the inbox entries older than ``--older-than`` (default: the retention setting)."""

    help = (
        "Delete the domain events inbox entries older than --older-than seconds "
        "(default: setting domain_events_inbox_retention, 7 days)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Options: --older-than, --database."""
        parser.add_argument(
            "--older-than",
            type=float,
            default=None,
            help="Seconds (default: the DOMAIN_EVENTS_INBOX_RETENTION setting).",
        )
        parser.add_argument("--database", default="default", help="Database alias.")

    def handle(self, *args: Any, **options: Any) -> None:
        """Purge once and print how many entries were deleted."""
        seconds = options["older_than"]
        if seconds is None:
            seconds = self._retention()
        if seconds <= 0:
            raise CommandError("--older-than must be positive")
        deleted = DjangoInbox(using=options["database"]).purge(timedelta(seconds=seconds))
        self.stdout.write(f"{deleted} inbox entr{'y' if deleted == 1 else 'ies'} deleted")

    @staticmethod
    def _retention() -> float:
        from celery_domain_events.contrib.django import resolve_app  # noqa: PLC0415 (app init)
        from celery_domain_events.extension import DomainEvents  # noqa: PLC0415

        try:
            return float(DomainEvents.of(resolve_app(None)).settings.inbox_retention)
        except ConfigurationError as exc:
            raise CommandError(str(exc)) from None
