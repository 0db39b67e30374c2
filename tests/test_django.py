"""Django integration against the real RabbitMQ: emit_on_commit() and DomainEventsMiddleware."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any, ClassVar

import django
import pytest
from celery import Celery
from django.conf import settings

if not settings.configured:
    settings.configure(
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": ":memory:",  # one connection per thread, and the tests use one thread
                "ATOMIC_REQUESTS": True,
            }
        },
        INSTALLED_APPS=[
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "django.contrib.admin",
            "celery_domain_events.contrib.django",
        ],
        ALLOWED_HOSTS=["testserver"],
        SECRET_KEY="test",
        LOGGING_CONFIG=None,  # leave pytest's logging alone
    )
    django.setup()

from django.db import connection, transaction
from django.http import HttpRequest, HttpResponse
from django.test import Client, TestCase, override_settings
from django.urls import path
from kombu import Connection, Queue

from celery_domain_events import (
    ConfigurationError,
    DomainEvent,
    DomainEvents,
    PublishError,
    emit,
)
from celery_domain_events.amqp import transport as extension_module
from celery_domain_events.contrib.django import emit_on_commit
from celery_domain_events.contrib.django import outbox as django_outbox
from celery_domain_events.contrib.django.models import OutboxMessage
from celery_domain_events.publishing import api as publisher_module

from .conftest import ROOT, Topology, wait_for

pytestmark = [pytest.mark.rabbitmq]
pytest_plugins = ["celery_domain_events.testing.pytest_plugin"]


#: The app DOMAIN_EVENTS_CELERY_APP names in the middleware tests (set per test).
CELERY_APP: Celery | None = None


class NoteAdded(DomainEvent):
    event_name: ClassVar[str] = "test.django.note_added"
    note_id: int


class Rollback(Exception):
    pass


# Rows the tests write, so that commit and rollback are real.
def add_note(text: str) -> int:
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO note (text) VALUES (%s)", [text])
        return int(cursor.lastrowid)


def notes() -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT text FROM note ORDER BY id")
        return [row[0] for row in cursor.fetchall()]


@pytest.fixture(autouse=True)
def _table(request: pytest.FixtureRequest) -> Iterator[None]:
    if isinstance(request.instance, TestCase):  # it keeps its own transaction open
        yield
        return
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS note (id INTEGER PRIMARY KEY, text TEXT)")
        cursor.execute("DELETE FROM note")
    publisher_module.discard()
    yield
    publisher_module.discard()
    assert not connection.in_atomic_block


@pytest.fixture
def outbox_table() -> Iterator[None]:
    """The outbox table, made by the app's own migration."""
    from django.core.management import call_command

    call_command("migrate", "domain_events", verbosity=0)
    OutboxMessage.objects.all().delete()
    yield
    OutboxMessage.objects.all().delete()


@pytest.fixture
def app(topology: Topology) -> Celery:
    return topology.app()


class Probe:
    """A queue bound to the test exchange by ``#``: every event published reaches it."""

    def __init__(self, topology: Topology, app: Celery) -> None:
        self.topology = topology
        self.app = app
        self.name = f"test.{topology.uid}.probe"  # deleted by the topology fixture
        with Connection(topology.broker_url) as conn:
            exchange = DomainEvents.of(app).topology.exchange()
            Queue(self.name, exchange, routing_key="#", auto_delete=False)(
                conn.default_channel
            ).declare()

    def received(self) -> list[str]:
        """Return the names of the events published so far, in arrival order, and drain them.

        A sentinel is published last (in autocommit mode, so at once): everything published
        before it is in the queue ahead of it, so what precedes it is all there is.
        """
        sentinel = emit_on_commit("test.django.sentinel", app=self.app)
        seen: list[Any] = []

        def sentinel_arrived() -> bool:
            with Connection(self.topology.broker_url) as conn:
                while (msg := conn.default_channel.basic_get(self.name, no_ack=True)) is not None:
                    seen.append(msg)
            return any(m.properties["message_id"] == str(sentinel.event_id) for m in seen)

        wait_for(sentinel_arrived, timeout=10)
        assert seen[-1].properties["message_id"] == str(sentinel.event_id)
        return [m.properties["type"] for m in seen[:-1]]


@pytest.fixture
def probe(topology: Topology, app: Celery) -> Probe:
    return Probe(topology, app)


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The routing keys of each confirmed batch, one list per publish_confirmed() call."""
    calls: list[list[str]] = []
    real = extension_module.publish_confirmed

    def spy(acquire: Any, messages: list[Any], **kwargs: Any) -> None:
        calls.append([m.routing_key for m in messages])
        real(acquire, messages, **kwargs)

    monkeypatch.setattr(extension_module, "publish_confirmed", spy)
    return calls


def test_commit_publishes_the_transaction_as_one_batch_in_emit_order(
    app: Celery, probe: Probe, batches: list[list[str]]
) -> None:
    with transaction.atomic():
        note_id = add_note("first")
        first = emit_on_commit(NoteAdded(note_id=note_id), app=app)
        emit_on_commit("test.django.untyped", {"n": 2}, app=app)
        transaction.on_commit(lambda: add_note("someone else's callback"))
        emit_on_commit("test.django.last", app=app)
        assert batches == []  # nothing before COMMIT
    assert batches == [["test.django.note_added", "test.django.untyped", "test.django.last"]]
    assert probe.received() == ["test.django.note_added", "test.django.untyped", "test.django.last"]
    assert isinstance(first, NoteAdded)
    assert notes() == ["first", "someone else's callback"]


def test_rollback_publishes_nothing(app: Celery, probe: Probe, batches: list[list[str]]) -> None:
    with suppress(Rollback), transaction.atomic():
        add_note("gone")
        emit_on_commit("test.django.rolled_back", app=app)
        with transaction.atomic():
            emit_on_commit("test.django.rolled_back_inner", app=app)
        raise Rollback
    assert batches == []
    assert notes() == []
    assert probe.received() == []


def test_a_rolled_back_savepoint_drops_only_its_own_events(
    app: Celery, probe: Probe, batches: list[list[str]]
) -> None:
    with transaction.atomic():
        emit_on_commit("test.django.a", app=app)
        with suppress(Rollback), transaction.atomic():
            emit_on_commit("test.django.b_dropped", app=app)
            raise Rollback
        emit_on_commit("test.django.c", app=app)
        with transaction.atomic():  # released: its events stay, but for its own savepoint
            emit_on_commit("test.django.d", app=app)
            with suppress(Rollback), transaction.atomic():
                emit_on_commit("test.django.e_dropped", app=app)
                raise Rollback
            emit_on_commit("test.django.f", app=app)
        # The last savepoint rolls back after the last emit: the batch must still go out.
        with suppress(Rollback), transaction.atomic():
            add_note("rolled back")
            emit_on_commit("test.django.g_dropped", app=app)
            raise Rollback
    expected = ["test.django.a", "test.django.c", "test.django.d", "test.django.f"]
    assert batches == [expected]
    assert probe.received() == expected
    assert notes() == []


def test_autocommit_publishes_at_once(app: Celery, probe: Probe, batches: list[list[str]]) -> None:
    assert not connection.in_atomic_block
    emit_on_commit("test.django.now", {"n": 1}, app=app)
    assert batches == [["test.django.now"]]
    emit_on_commit("test.django.again", app=app)
    assert batches == [["test.django.now"], ["test.django.again"]]
    assert probe.received() == ["test.django.now", "test.django.again"]


def test_one_transaction_each_its_own_batch(
    app: Celery, probe: Probe, batches: list[list[str]]
) -> None:
    for n in range(2):
        with transaction.atomic():
            emit_on_commit(f"test.django.tx{n}.one", app=app)
            emit_on_commit(f"test.django.tx{n}.two", app=app)
    assert batches == [
        ["test.django.tx0.one", "test.django.tx0.two"],
        ["test.django.tx1.one", "test.django.tx1.two"],
    ]
    assert probe.received() == [
        "test.django.tx0.one",
        "test.django.tx0.two",
        "test.django.tx1.one",
        "test.django.tx1.two",
    ]


def test_events_for_two_apps_go_out_as_one_batch_each(
    topology: Topology, app: Celery, probe: Probe, batches: list[list[str]]
) -> None:
    other = topology.app(service="other")  # same exchange, another service
    with transaction.atomic():
        emit_on_commit("test.django.app1.a", app=app)
        emit_on_commit("test.django.app2.a", app=other)
        emit_on_commit("test.django.app1.b", app=app)
    assert batches == [["test.django.app1.a", "test.django.app1.b"], ["test.django.app2.a"]]
    assert probe.received() == ["test.django.app1.a", "test.django.app1.b", "test.django.app2.a"]


def write_and_emit(app: Celery, emitted: list[Any], *, robust: bool = True) -> None:
    with transaction.atomic():
        add_note("committed anyway")
        emitted.append(emit_on_commit("test.django.lost", app=app, robust=robust))
        transaction.on_commit(lambda: add_note("later callback ran"))


@pytest.fixture
def down() -> Celery:
    """An app whose broker is down: nothing listens on port 5999, so nothing is declared."""
    app = Celery("django-down", broker="amqp://guest:guest@127.0.0.1:5999//", set_as_current=False)
    app.conf.update(broker_heartbeat=None, domain_events_publish_timeout=1)
    DomainEvents(app, service="django-down")
    return app


def test_a_failed_publish_after_commit_keeps_the_events_in_the_outbox(
    topology: Topology,
    app: Celery,
    probe: Probe,
    outbox_table: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The same service and exchange as `app`, while its broker is unreachable.
    down = topology.app(domain_events_publish_timeout=1)
    down.conf.broker_url = "amqp://guest:guest@127.0.0.1:5999//"
    emitted: list[Any] = []
    with caplog.at_level(logging.WARNING):
        write_and_emit(down, emitted)  # robust by default: no error out of the commit
    [kept] = emitted
    assert notes() == ["committed anyway", "later callback ran"]  # later callbacks still run
    [row] = OutboxMessage.objects.all()
    assert row.id == str(kept.event_id)
    assert row.routing_key == "test.django.lost"
    assert json.loads(bytes(row.body))["id"] == str(kept.event_id)
    assert any("kept in the outbox" in r.getMessage() for r in caplog.records)
    # The relay publishes it once the broker is back (here: the app whose broker is up).
    assert django_outbox.relay_once(app=app) == 1
    assert OutboxMessage.objects.count() == 0
    assert probe.received() == ["test.django.lost"]


def test_without_the_outbox_a_failed_publish_after_commit_is_logged_in_full(
    down: Celery, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        "django.apps.apps.is_installed", lambda name: name != "celery_domain_events.contrib.django"
    )
    emitted: list[Any] = []
    with caplog.at_level(logging.ERROR):
        write_and_emit(down, emitted)
    [lost] = emitted
    assert notes() == ["committed anyway", "later callback ran"]
    [record] = [r for r in caplog.records if r.name == "celery_domain_events.publishing.send"]
    assert record.levelno == logging.ERROR
    assert str(lost.event_id) in record.getMessage()


def test_a_failed_publish_with_robust_false_leaves_the_atomic_block_and_logs_the_events(
    app: Celery, down: Celery, probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    emitted: list[Any] = []
    with caplog.at_level(logging.ERROR), pytest.raises(PublishError) as info:
        write_and_emit(down, emitted, robust=False)
    [lost] = emitted
    assert info.value.events == (lost,)
    assert notes() == ["committed anyway"]  # the error comes after COMMIT
    [record] = [r for r in caplog.records if r.name == "celery_domain_events.publishing.send"]
    assert record.levelno == logging.ERROR
    assert str(lost.event_id) in record.getMessage()
    # The connection is usable, and the next transaction publishes normally.
    with transaction.atomic():
        emit_on_commit("test.django.next", app=app)
    assert probe.received() == ["test.django.next"]


def test_a_misspelled_setting_fails_emit_on_commit_inside_the_transaction() -> None:
    # Not after COMMIT, where it would fail a committed request and skip later callbacks.
    typo = Celery("django-typo", broker="memory://", set_as_current=False)
    typo.conf.update(domain_events_exchnage="x")
    DomainEvents(typo, service="django-typo")
    emitted: list[Any] = []
    with pytest.raises(ConfigurationError, match="domain_events_exchnage"):
        write_and_emit(typo, emitted)
    assert emitted == []
    assert notes() == []  # the transaction rolled back


def test_test_case_capture_of_on_commit_callbacks_publishes_the_batch(
    app: Celery, probe: Probe, batches: list[list[str]]
) -> None:
    # Django's TestCase wraps each test in a transaction that never commits and runs on_commit
    # callbacks through captureOnCommitCallbacks(execute=True) instead.
    with transaction.atomic():
        emit_on_commit("test.django.before_capture", app=app)  # never committed
        with TestCase.captureOnCommitCallbacks(execute=True) as callbacks:
            emit_on_commit("test.django.captured.one", app=app)
            emit_on_commit("test.django.captured.two", app=app)
        assert batches == [["test.django.captured.one", "test.django.captured.two"]]
        assert len(callbacks) == 4  # a mark and a flush per event
        transaction.set_rollback(True)  # as TestCase does
    assert probe.received() == ["test.django.captured.one", "test.django.captured.two"]


def test_an_app_setting_that_names_no_celery_app_is_an_error() -> None:
    not_an_app = override_settings(DOMAIN_EVENTS_CELERY_APP=f"{__name__}.NoteAdded")
    with not_an_app, pytest.raises(ConfigurationError, match="not a Celery app"):
        emit_on_commit("test.django.x")
    missing = override_settings(DOMAIN_EVENTS_CELERY_APP=f"{__name__}.MISSING")
    with missing, pytest.raises(ConfigurationError, match="MISSING"):
        emit_on_commit("test.django.x")


# The middleware, through Django's own request handler.
class ViewFailed(Exception):
    pass


def ok_view(request: HttpRequest) -> HttpResponse:
    add_note("ok")
    emit("test.django.view.emitted")
    emit_on_commit("test.django.view.on_commit")  # ATOMIC_REQUESTS: published at its commit
    return HttpResponse("ok")


def failing_view(request: HttpRequest) -> HttpResponse:
    add_note("failed")
    emit("test.django.view.emitted")
    emit_on_commit("test.django.view.on_commit")
    raise ViewFailed


def emit_only_view(request: HttpRequest) -> HttpResponse:
    emit("test.django.view.emitted")
    return HttpResponse("ok")


urlpatterns = [
    path("ok/", ok_view),
    path("fail/", failing_view),
    path("emit-only/", emit_only_view),
]


@pytest.fixture
def site(app: Celery, monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    monkeypatch.setattr(f"{__name__}.CELERY_APP", app)
    with override_settings(
        ROOT_URLCONF=__name__,
        MIDDLEWARE=["celery_domain_events.contrib.django.DomainEventsMiddleware"],
        DOMAIN_EVENTS_CELERY_APP=f"{__name__}.CELERY_APP",
    ):
        yield Client()


def test_middleware_transmits_after_the_view_returned(
    site: Client, probe: Probe, batches: list[list[str]]
) -> None:
    outer = emit("test.django.outer")  # buffered outside the request
    response = site.get("/ok/")
    assert response.status_code == 200
    # The view's transaction committed first, then the middleware transmitted.
    assert batches == [["test.django.view.on_commit"], ["test.django.view.emitted"]]
    assert probe.received() == ["test.django.view.on_commit", "test.django.view.emitted"]
    assert notes() == ["ok"]
    assert publisher_module.buffered() == [outer]  # the previous buffer is back, untouched


def test_middleware_discards_when_the_view_raised(
    site: Client, probe: Probe, batches: list[list[str]]
) -> None:
    outer = emit("test.django.outer")
    with pytest.raises(ViewFailed):  # the test client re-raises the view's exception
        site.get("/fail/")
    assert batches == []
    assert notes() == []  # ATOMIC_REQUESTS rolled the view back
    assert publisher_module.buffered() == [outer]
    assert probe.received() == []


def test_a_failed_transmit_after_the_view_keeps_the_events_in_the_outbox(
    site: Client, down: Celery, outbox_table: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(f"{__name__}.CELERY_APP", down)
    outer = emit("test.django.outer")
    response = site.get("/emit-only/")  # its transaction committed: the request succeeds
    assert response.status_code == 200
    [row] = OutboxMessage.objects.all()
    assert row.routing_key == "test.django.view.emitted"
    assert publisher_module.buffered() == [outer]


def test_without_the_outbox_a_failed_transmit_after_the_view_is_logged_in_full(
    site: Client, down: Celery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(f"{__name__}.CELERY_APP", down)
    monkeypatch.setattr(
        "django.apps.apps.is_installed", lambda name: name != "celery_domain_events.contrib.django"
    )
    with caplog.at_level(logging.ERROR):
        assert site.get("/emit-only/").status_code == 200
    [record] = [r for r in caplog.records if r.name == "celery_domain_events.publishing.send"]
    assert record.levelno == logging.ERROR
    assert "test.django.view.emitted" in record.getMessage()
    assert "A request succeeded" in record.getMessage()


def test_django_keeps_on_commit_callbacks_as_savepoint_ids_func_robust() -> None:
    # The shape _compat.django_append_on_commit and django_on_commit_funcs rely on.
    from celery_domain_events import _compat

    def callback() -> None: ...

    with transaction.atomic():
        transaction.on_commit(callback)
        ids, func, robust = connection.run_on_commit[-1]
        assert isinstance(ids, set)
        assert func is callback
        assert robust is False
        assert _compat.django_on_commit_funcs(connection)[-1] is callback
        transaction.set_rollback(True)


def test_capture_events_sees_emit_on_commit_inside_a_test_case_transaction() -> None:
    # A TestCase wraps each test in a transaction that never commits: the harness publishes
    # what emit_on_commit holds as that commit would, and no more (a rolled-back savepoint's
    # events stay dropped, other callbacks are left alone).
    from celery_domain_events.testing import capture_events

    app = Celery("django-capture", broker="memory://", set_as_current=False)
    DomainEvents(app, service="django-capture")
    others: list[str] = []
    with transaction.atomic(), capture_events(app) as events:  # as TestCase does
        transaction.on_commit(lambda: others.append("ran"))
        with transaction.atomic():
            emit_on_commit("test.django.kept", app=app)
        try:
            with transaction.atomic():
                emit_on_commit("test.django.dropped", app=app)
                raise Rollback
        except Rollback:
            pass
        assert [e.event_name for e in events.published] == ["test.django.kept"]
        events.join()
        assert [e.event_name for e in events.published] == ["test.django.kept"]  # once
        assert others == []
        transaction.set_rollback(True)


def test_the_capture_fixture_is_also_a_context_manager(domain_events_capture: Any) -> None:
    app = Celery("django-fixture", broker="memory://", set_as_current=False)
    ext = DomainEvents(app, service="django-fixture")
    broker = ext.transport
    with domain_events_capture(app) as events:
        emit_on_commit("test.django.fixture", app=app)  # autocommit: at once
        assert [e.event_name for e in events.published] == ["test.django.fixture"]
    assert ext.transport is broker  # ended by the with block


class CaptureInsideATestCase(TestCase):
    """A real Django TestCase: its transaction never commits, and no wrapping is needed."""

    def test_emit_on_commit_reaches_the_capture(self) -> None:
        from celery_domain_events.testing import capture_events

        app = Celery("django-testcase", broker="memory://", set_as_current=False)
        DomainEvents(app, service="django-testcase")
        with capture_events(app) as events:
            with transaction.atomic():
                emit_on_commit("test.django.in_test_case", app=app)
            events.join()
        assert [e.event_name for e in events.published] == ["test.django.in_test_case"]


PYTEST_DJANGO_TESTS = """
import pytest
from celery import Celery
from django.db import connection, transaction

from celery_domain_events import DomainEvents
from celery_domain_events.contrib.django import emit_on_commit
from celery_domain_events.testing import capture_events

pytest_plugins = ["celery_domain_events.testing.pytest_plugin"]
APP = Celery("pytest-django", broker="memory://", set_as_current=False)
DomainEvents(APP, service="pytest-django")


@pytest.mark.django_db
def test_capture_events() -> None:
    assert connection.in_atomic_block  # pytest-django's transaction, never committed
    with capture_events(APP) as events:
        with transaction.atomic():
            emit_on_commit("test.django.marked", app=APP)
        events.join()
    assert [e.event_name for e in events.published] == ["test.django.marked"]


def test_the_capture_fixture(db, domain_events_capture) -> None:
    events = domain_events_capture(APP)
    with transaction.atomic():
        emit_on_commit("test.django.fixture", app=APP)
    assert [e.event_name for e in events.published] == ["test.django.fixture"]
"""


def test_capture_events_needs_no_wrapping_in_a_pytest_django_test(tmp_path: Path) -> None:
    # pytest-django runs in a pytest of its own (this suite configures Django by hand and
    # disables the plugin): its `db` fixture and django_db mark, on SQLite.
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\naddopts = --strict-markers -p no:cacheprovider\n"
        "DJANGO_SETTINGS_MODULE = pdj_settings\n"
    )
    (tmp_path / "pdj_settings.py").write_text(
        textwrap.dedent(
            """
            DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": "x.db"}}
            INSTALLED_APPS = ["django.contrib.contenttypes", "celery_domain_events.contrib.django"]
            SECRET_KEY = "test"
            USE_TZ = True
            """
        )
    )
    (tmp_path / "test_in_pytest_django.py").write_text(PYTEST_DJANGO_TESTS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "DJANGO_"))}
    inner = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", "pytest.ini", "--rootdir", ".", "-q"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert inner.returncode == 0, inner.stdout + inner.stderr
    assert inner.stdout.strip().splitlines()[-1].startswith("2 passed"), inner.stdout


def test_the_outbox_is_listed_read_only_in_the_admin() -> None:
    from django.contrib import admin

    from celery_domain_events.contrib.django import admin as outbox_admin

    model_admin = admin.site._registry[OutboxMessage]
    assert isinstance(model_admin, outbox_admin.OutboxMessageAdmin)
    assert not model_admin.has_add_permission(HttpRequest())
    assert not model_admin.has_change_permission(HttpRequest())
    assert "routing_key" in model_admin.list_display
