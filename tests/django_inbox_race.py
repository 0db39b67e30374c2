"""Two deliveries of one event through DjangoInbox at once, on PostgreSQL (a child process).

Run by tests/test_django_inbox.py: ``python -m tests.django_inbox_race`` with the database URL
in ``$TEST_DJANGO_INBOX_RACE_DB_URL``; prints the outcome as one JSON line.
"""

from __future__ import annotations

import json
import os
import threading
import time

import sqlalchemy as sa

RACE_DB_URL = "TEST_DJANGO_INBOX_RACE_DB_URL"


def main() -> None:
    import django
    from django.conf import settings

    url = sa.make_url(os.environ[RACE_DB_URL])
    settings.configure(
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": url.database,
                "USER": url.username or "",
                "PASSWORD": url.password or "",
                "HOST": url.host or "",
                "PORT": str(url.port or ""),
            }
        },
        INSTALLED_APPS=["celery_domain_events.contrib.django"],
        USE_TZ=True,
    )
    django.setup()
    from django.core.management import call_command
    from django.db import connections

    from celery_domain_events.contrib.django.inbox import DjangoInbox
    from celery_domain_events.contrib.django.models import InboxEntry

    call_command("migrate", "domain_events", verbosity=0)
    inbox = DjangoInbox()
    outcomes: list[bool] = []
    first_inside = threading.Event()

    def deliver(pause: float) -> None:
        try:
            with inbox.claim("dji_race", "e1") as fresh:
                outcomes.append(fresh)
                first_inside.set()
                time.sleep(pause)
        finally:
            connections.close_all()

    first = threading.Thread(target=deliver, args=(0.5,))
    first.start()
    first_inside.wait(10)
    started = time.monotonic()
    second = threading.Thread(target=deliver, args=(0,))
    second.start()
    second.join()
    waited = time.monotonic() - started
    first.join()
    rows = InboxEntry.objects.filter(handler="dji_race").count()
    connections.close_all()
    result = {"outcomes": outcomes, "waited": waited, "rows": rows}
    print(json.dumps(result))  # noqa: T201 (the parent reads it)


if __name__ == "__main__":
    main()
