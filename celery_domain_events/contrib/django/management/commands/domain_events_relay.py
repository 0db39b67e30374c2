"""``python manage.py domain_events_relay``: publish the outbox's events until stopped."""

from __future__ import annotations

import signal
import threading
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from celery_domain_events.contrib.django import outbox
from celery_domain_events.exceptions import ConfigurationError, PublishError


class Command(BaseCommand):
    """Relay the outbox to RabbitMQ; SIGTERM or SIGINT stops it after the current batch."""

    help = "Publish the domain events outbox to RabbitMQ (until SIGTERM, or once with --once)."

    def add_arguments(self, parser: CommandParser) -> None:
        """Options: --once, --interval, --limit, --database."""
        parser.add_argument("--once", action="store_true", help="Relay one batch and exit.")
        parser.add_argument("--interval", type=float, default=1.0, help="Seconds between polls.")
        parser.add_argument("--limit", type=int, default=500, help="Rows per batch.")
        parser.add_argument("--database", default=None, help="Database alias (default: default).")

    def handle(self, *args: Any, **options: Any) -> None:
        """Relay once, or until a signal arrives."""
        try:
            self._relay(options)
        except ConfigurationError as exc:
            raise CommandError(str(exc)) from None

    def _relay(self, options: dict[str, Any]) -> None:
        if options["once"]:
            try:
                count = outbox.relay_once(limit=options["limit"], using=options["database"])
            except PublishError as exc:
                self.stderr.write(f"relay failed: {exc}")
                raise SystemExit(1) from None
            self.stdout.write(f"{count} event(s) relayed")
            return
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        total = outbox.relay_forever(
            interval=options["interval"],
            limit=options["limit"],
            using=options["database"],
            stop=stop,
        )
        self.stdout.write(f"stopped: {total} event(s) relayed")
