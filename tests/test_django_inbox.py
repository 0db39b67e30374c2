"""DjangoInbox: in-process on SQLite (as tests/test_django.py), races on the real PostgreSQL.

Django can be configured once per process: this module shares tests/test_django.py's settings
(importing it configures them), and the concurrency test runs in a child process configured
for a PostgreSQL database of its own.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from celery import Celery
from django.core.management import call_command
from django.db import connection
from django.http import HttpRequest
from django.test import override_settings
from django.utils import timezone

from celery_domain_events import (
    DomainEvent,
    DomainEvents,
    RetryPolicy,
    domain_event_handler,
    emit,
    transmit,
)
from celery_domain_events.testing import capture_events

from . import test_django
from .conftest import DB_URL
from .django_inbox_race import RACE_DB_URL

assert test_django.settings.configured  # models can be imported from here on

from celery_domain_events.contrib.django.inbox import DjangoInbox  # noqa: E402
from celery_domain_events.contrib.django.models import InboxEntry  # noqa: E402

INBOX = DjangoInbox()
FAILURES = {"left": 0}

#: The app DOMAIN_EVENTS_CELERY_APP names in the purge command's test.
PURGE_APP = Celery("dji_purge", broker="memory://", set_as_current=False)
PURGE_APP.conf.domain_events_inbox_retention = 2 * 3600
DomainEvents(PURGE_APP, service="dji", discover_handlers=False)


class DjOrder(DomainEvent):
    event_name: ClassVar[str] = "dji.order.placed"
    order_id: int


@domain_event_handler("dji.order.placed", idempotent=INBOX, retry=RetryPolicy(max_retries=2))
def dji_project(event: DjOrder) -> None:
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO dji_note (order_id) VALUES (%s)", [event.order_id])
    if FAILURES["left"]:
        FAILURES["left"] -= 1
        raise ConnectionError("flaky downstream: the row above is rolled back")


def notes() -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT order_id FROM dji_note ORDER BY order_id")
        return [row[0] for row in cursor.fetchall()]


@pytest.fixture(autouse=True)
def tables() -> Iterator[None]:
    call_command("migrate", "domain_events", verbosity=0)
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS dji_note (order_id INTEGER)")
        cursor.execute("DELETE FROM dji_note")
    InboxEntry.objects.all().delete()
    FAILURES["left"] = 0
    yield
    InboxEntry.objects.all().delete()
    assert not connection.in_atomic_block


def app_with(*handlers: Any) -> Celery:
    app = Celery("dji", broker="memory://", set_as_current=False)
    DomainEvents(app, service="dji", handlers=list(handlers), discover_handlers=False)
    return app


def test_a_duplicate_is_skipped_and_the_side_effect_committed_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = app_with(dji_project)
    event = DjOrder(order_id=1)
    with capture_events(app) as events, caplog.at_level("INFO"):
        emit(event)
        emit(event)
        transmit(app)
        events.join()
    assert notes() == [1]
    assert events.handled(dji_project) == [event, event]
    assert [(e.handler, e.event_id) for e in InboxEntry.objects.all()] == [
        ("dji_project", str(event.event_id))
    ]
    assert "dji_project already handled it" in caplog.text


def test_a_failure_rolls_back_the_entry_and_the_side_effect_and_the_retry_runs() -> None:
    app = app_with(dji_project)
    FAILURES["left"] = 1
    with capture_events(app) as events:
        emit(DjOrder(order_id=2))
        transmit(app)
        events.join()
    assert FAILURES["left"] == 0
    assert notes() == [2]  # the failed attempt's row was rolled back with its entry
    assert InboxEntry.objects.count() == 1


def test_a_failed_claim_leaves_nothing_behind() -> None:
    def fail() -> None:
        with INBOX.claim("dji_direct", "e1") as fresh:
            assert fresh
            with connection.cursor() as cursor:
                cursor.execute("INSERT INTO dji_note (order_id) VALUES (3)")
            raise ConnectionError("boom")

    with pytest.raises(ConnectionError):
        fail()
    assert notes() == []
    assert not InboxEntry.objects.exists()
    with INBOX.claim("dji_direct", "e1") as fresh:
        assert fresh  # nothing was remembered: the retry runs


def test_the_purge_command_deletes_old_entries() -> None:
    now = timezone.now()
    InboxEntry.objects.bulk_create(
        [
            InboxEntry(handler="h", event_id="old", handled_at=now - timedelta(hours=3)),
            InboxEntry(handler="h", event_id="mid", handled_at=now - timedelta(minutes=90)),
            InboxEntry(handler="h", event_id="new", handled_at=now),
        ]
    )
    out = io.StringIO()
    with override_settings(DOMAIN_EVENTS_CELERY_APP="tests.test_django_inbox.PURGE_APP"):
        call_command("domain_events_inbox_purge", stdout=out)  # the setting: 2 hours
    assert out.getvalue() == "1 inbox entry deleted\n"
    out = io.StringIO()
    call_command("domain_events_inbox_purge", "--older-than", "3600", stdout=out)
    assert out.getvalue() == "1 inbox entry deleted\n"
    assert list(InboxEntry.objects.values_list("event_id", flat=True)) == ["new"]


def test_the_inbox_is_listed_read_only_in_the_admin() -> None:
    from django.contrib import admin

    from celery_domain_events.contrib.django.admin import InboxEntryAdmin

    model_admin = admin.site._registry[InboxEntry]
    assert isinstance(model_admin, InboxEntryAdmin)
    assert not model_admin.has_add_permission(HttpRequest())
    assert not model_admin.has_change_permission(HttpRequest())


def test_the_table_is_the_sqlalchemy_inboxs_plus_an_id() -> None:
    with connection.cursor() as cursor:
        columns = [
            c.name
            for c in connection.introspection.get_table_description(cursor, "domain_events_inbox")
        ]
    assert columns == ["id", "handler", "event_id", "handled_at"]


# --- two deliveries at once, on PostgreSQL ------------------------------------------------


@pytest.fixture
def pg_database() -> Iterator[str]:
    name = f"dji_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(DB_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL is not reachable: {exc}")
    yield name
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def test_the_unique_constraint_decides_between_two_concurrent_deliveries(
    pg_database: str,
) -> None:
    url = sa.make_url(DB_URL).set(database=pg_database)
    child = subprocess.run(
        [sys.executable, "-m", "tests.django_inbox_race"],
        cwd=Path(__file__).resolve().parent.parent,
        env={
            **os.environ,
            RACE_DB_URL: url.render_as_string(hide_password=False),
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == 0, child.stdout + child.stderr
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["outcomes"] == [True, False]
    assert result["waited"] >= 0.3  # the second insert waited for the first transaction
    assert result["rows"] == 1
