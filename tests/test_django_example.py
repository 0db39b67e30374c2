"""The Django example (examples/django_ledger) as users run it: a real PostgreSQL database,
`manage.py migrate`, a real `celery -A ledger_site worker` subprocess, the real RabbitMQ.

The project is laid out as the Celery docs' "First steps with Django" recommend; every domain
events setting is a Django setting with the CELERY_ namespace, and ``ledger/handlers.py`` is
listed nowhere: the worker must discover it. Django runs only in subprocesses (this process
configures Django once, with SQLite, in tests/test_django.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from kombu import Connection, Queue, binding

from celery_domain_events import DomainEvents, emit, transmit
from celery_domain_events.ops.rabbitmq_api import ManagementClient

from .conftest import DB_URL, ROOT, Topology, _ignore, drain, read_log, spawn_worker, wait_for

pytestmark = [pytest.mark.rabbitmq]

EXAMPLE = ROOT / "examples" / "django_ledger"
HANDLER = "book_payment"


class Ledger:
    """One test's ledger service: its own migrated database, exchange and service name."""

    def __init__(self, topology: Topology, db_url: sa.URL) -> None:
        self.topology = topology
        self.service = topology.service("ledger")
        self.engine = sa.create_engine(db_url)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")},
            "DJANGO_SETTINGS_MODULE": "ledger_site.settings",
            # The project's directory, as manage.py and `celery -A` see it; the repository for
            # the crash tests' children (python -c "from tests... import child_main").
            "PYTHONPATH": os.pathsep.join(
                [str(EXAMPLE), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
            "LEDGER_DB_URL": db_url.render_as_string(hide_password=False),
            "LEDGER_BROKER_URL": topology.broker_url,
            "LEDGER_SERVICE": self.service,
            "LEDGER_EVENTS_EXCHANGE": topology.exchange,
            "LEDGER_UNROUTED_QUEUE": topology.unrouted,
        }

    @property
    def handler_queue(self) -> str:
        return f"{self.service}.{HANDLER}"

    def manage(
        self, *args: str, timeout: float = 60, **env: str
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python manage.py ARGS`` in the project's directory with this test's settings."""
        return subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=EXAMPLE,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def scalar(self, sql: str) -> Any:
        with self.engine.connect() as conn:
            return conn.exec_driver_sql(sql).scalar_one()

    def rows(self, sql: str) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.exec_driver_sql(sql))

    def outbox_count(self) -> int:
        return int(self.scalar("SELECT count(*) FROM domain_events_outbox"))


@contextmanager
def ledger_service(topology: Topology, engine: sa.Engine) -> Iterator[Ledger]:
    """A fresh database ``ledger_<uid>`` (migrated), dropped afterwards with the ledger's queues.

    ``engine`` is conftest's (PostgreSQL down: skipped locally, failed in CI); it creates and
    drops the database.
    """
    name = f"ledger_{topology.uid}"
    admin = engine.execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    ledger = Ledger(topology, sa.make_url(DB_URL).set(database=name))
    try:
        migrated = ledger.manage("migrate", "--no-input", "-v", "0")
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
        yield ledger
    finally:
        ledger.engine.dispose()
        with admin.connect() as conn:
            # Children a test killed may still hold a connection for a moment.
            conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
            )
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        with Connection(topology.broker_url) as conn:
            for queue in (ledger.handler_queue, ledger.handler_queue + ".dlq"):
                _ignore(conn, lambda q=queue: conn.default_channel.queue_delete(q))


@pytest.fixture
def ledger(topology: Topology, engine: sa.Engine) -> Iterator[Ledger]:
    with ledger_service(topology, engine) as service:
        yield service


def probe_queue(topology: Topology, *patterns: str) -> str:
    """Bind ``test.<uid>.probe`` (deleted by ``Topology.cleanup``) to the test exchange."""
    name = f"test.{topology.uid}.probe"
    exchange = DomainEvents.of(topology.app("probe")).topology.exchange()
    with Connection(topology.broker_url) as conn:
        queue = Queue(
            name, bindings=[binding(exchange, routing_key=p) for p in patterns], durable=True
        )
        queue(conn.default_channel).declare()
    return name


def collect(broker_url: str, queue: str, expected: int, timeout: float = 20) -> list[Any]:
    """Wait for exactly ``expected`` messages at ``queue``; return them in arrival order."""
    seen: list[Any] = []

    def enough() -> bool:
        seen.extend(drain(broker_url, queue))
        return len(seen) >= expected

    wait_for(enough, timeout=timeout)
    time.sleep(0.2)
    seen.extend(drain(broker_url, queue))
    assert len(seen) == expected, [m.body for m in seen]
    return seen


def cloud_events(messages: list[Any]) -> list[dict[str, Any]]:
    return [json.loads(m.body) for m in messages]


class LedgerWorker:
    """``celery -A ledger_site worker`` in the project's directory, as its README runs it."""

    def __init__(self, ledger: Ledger, log_path: Path) -> None:
        self.ledger = ledger
        self.log_path = log_path
        # Celery's own task queue, of this test only (the handler queues are the library's).
        self.task_queue = f"test.{ledger.topology.uid}.tasks"
        self.hostname = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *pool: str) -> LedgerWorker:
        self.proc, self.hostname = spawn_worker(
            "ledger_site",
            "--without-heartbeat",
            "-Q",
            self.task_queue,
            *pool,
            cwd=EXAMPLE,
            env=self.ledger.env,
            log_path=self.log_path,
        )
        return self

    def log(self) -> str:
        return read_log(self.log_path)

    def stop(self) -> None:
        """Warm shutdown, as ``celery control shutdown`` asks for it.

        Not SIGTERM: an idle solo worker notices the signal only when its event loop wakes up,
        up to 10 s later; a remote control message wakes it at once.
        """
        if self.proc is None or self.proc.poll() is not None:
            return
        self.ledger.topology.app("control").control.shutdown(destination=[self.hostname])
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def cleanup(self) -> None:
        self.stop()
        with Connection(self.ledger.topology.broker_url) as conn:
            # -Q made both: the queue, and a direct exchange of the same name.
            _ignore(conn, lambda: conn.default_channel.queue_delete(self.task_queue))
            _ignore(conn, lambda: conn.default_channel.exchange_delete(self.task_queue))


@pytest.fixture
def ledger_worker(ledger: Ledger, tmp_path: Path) -> Iterator[LedgerWorker]:
    worker = LedgerWorker(ledger, tmp_path / "worker.log")
    yield worker
    worker.cleanup()


@pytest.mark.worker
@pytest.mark.slow
@pytest.mark.parametrize("pool", [("-P", "solo"), ("-P", "prefork", "-c", "2")], ids=str)
def test_worker_books_payments_and_the_relay_publishes_the_outbox(
    topology: Topology, ledger: Ledger, ledger_worker: LedgerWorker, pool: tuple[str, ...]
) -> None:
    shop = topology.app("shop")  # a shop-like publisher on the same exchange
    probe = probe_queue(topology, "ledger.#")
    ledger_worker.start(*pool)

    # handlers.py was discovered (it is listed nowhere), on the exchange the settings name.
    log = ledger_worker.log()
    assert "domain_events.ledger.handlers.book_payment" in log  # the worker's [tasks]
    assert (
        f"Domain events: consuming 1 handler queue(s) of service {ledger.service!r} on "
        f"exchange {topology.exchange!r}: {ledger.handler_queue}"
    ) in log
    bindings = ManagementClient.for_broker(topology.broker_url).bindings_from(topology.exchange)
    assert {(b["destination"], b["routing_key"]) for b in bindings} == {
        (ledger.handler_queue, "order.paid"),
        (probe, "ledger.#"),
    }

    # 20 orders paid, 5 of them delivered twice (same event id): booked once each.
    paid = [emit("order.paid", {"order_id": n, "amount": f"{n}.50"}) for n in range(1, 21)]
    sent = transmit(shop)
    for event in paid[:5]:
        emit(event)
    sent += transmit(shop)
    assert len(sent) == 25

    def handled() -> bool:
        text = ledger_worker.log()
        return text.count("booked order") + text.count("is already booked") >= 25

    wait_for(handled, timeout=30)
    log = ledger_worker.log()
    assert log.count("booked order") == 20, log
    assert log.count("is already booked") == 5, log
    assert "ERROR" not in log, log
    entries = ledger.rows("SELECT order_id, amount, event_id FROM ledger_ledgerentry")
    assert sorted((e.order_id, e.amount) for e in entries) == [
        (n, Decimal(f"{n}.50")) for n in range(1, 21)
    ]
    assert {e.event_id for e in entries} == {str(e.event_id) for e in paid}
    assert topology.queue_depth(ledger.handler_queue + ".dlq") == 0

    # Each booking wrote its ledger.entry_booked to the outbox, in its transaction: nothing
    # is published until the relay runs.
    outbox = ledger.rows("SELECT routing_key, exchange FROM domain_events_outbox")
    assert outbox == [("ledger.entry_booked", topology.exchange)] * 20
    assert drain(topology.broker_url, probe) == []
    relay = ledger.manage("domain_events_relay", "--once")
    assert relay.returncode == 0, relay.stdout + relay.stderr
    assert relay.stdout.strip() == "20 event(s) relayed"
    booked = cloud_events(collect(topology.broker_url, probe, 20))
    assert {e["type"] for e in booked} == {"ledger.entry_booked"}
    assert sorted(e["data"]["order_id"] for e in booked) == list(range(1, 21))
    assert {e["source"] for e in booked} == {ledger.service}
    assert ledger.outbox_count() == 0


# Runs in `manage.py shell`: POST /invoices/ with Django's test client; at the request's COMMIT
# nothing may have reached the probe queue yet.
INVOICE_SCRIPT = """
import json, os
from django.db import connection
from django.test import Client
from kombu import Connection

def depth():
    with Connection(os.environ["LEDGER_BROKER_URL"]) as conn:
        return conn.default_channel.queue_declare(os.environ["TEST_PROBE"], passive=True)[1]

at_commit = []
commit = connection.commit

def checked_commit():
    at_commit.append(depth())
    commit()

connection.commit = checked_commit
response = Client().post(
    "/invoices/", {"customer": "ada", "amount": "19.90"}, content_type="application/json"
)
refused = Client().post("/invoices/", {"customer": "ada"}, content_type="application/json")
print("RESULT", json.dumps({
    "status": response.status_code,
    "body": response.json(),
    "at_commit": at_commit,
    "after": depth(),
    "refused": refused.status_code,
}))
"""


def test_invoice_view_publishes_after_the_commit(topology: Topology, ledger: Ledger) -> None:
    probe = probe_queue(topology, "invoice.#")
    shell = ledger.manage("shell", "-c", INVOICE_SCRIPT, TEST_PROBE=probe)
    assert shell.returncode == 0, shell.stdout + shell.stderr
    [line] = [line for line in shell.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    assert result["status"] == 201
    # Nothing had been published at the request's COMMIT; the event was, once the view
    # returned (the second COMMIT is the refused request's, which publishes nothing).
    assert result["at_commit"] == [0, 1]
    assert result["after"] == 1
    assert result["refused"] == 400

    [issued] = cloud_events(collect(topology.broker_url, probe, 1))
    invoice_id = result["body"]["invoice_id"]
    assert issued["type"] == "invoice.issued"
    assert issued["data"] == {"invoice_id": invoice_id, "customer": "ada", "amount": "19.90"}
    assert ledger.rows("SELECT id, customer, amount FROM ledger_invoice") == [
        (invoice_id, "ada", Decimal("19.90"))
    ]


@pytest.mark.worker
def test_misspelled_setting_fails_at_startup_naming_the_key(topology: Topology) -> None:
    ledger = Ledger(topology, sa.make_url(DB_URL).set(database="unused"))  # never connected
    typo = {"LEDGER_EXTRA_SETTINGS": json.dumps({"CELERY_DOMAIN_EVENTS_EXCHNAGE": "orders"})}
    worker = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "ledger_site", "worker", "-P", "solo"],
        cwd=EXAMPLE,
        env={**ledger.env, **typo},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = worker.stdout + worker.stderr
    assert worker.returncode != 0, output
    assert " ready." not in output
    # One line, naming the key: no traceback.
    assert "Traceback" not in output, output
    [error] = [line for line in output.splitlines() if "EXCHNAGE" in line]
    assert error == (
        "Error: unknown setting 'CELERY_DOMAIN_EVENTS_EXCHNAGE': did you mean "
        "'CELERY_DOMAIN_EVENTS_EXCHANGE'?"
    )

    show = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "ledger_site", "domain-events", "topology", "show"],
        cwd=EXAMPLE,
        env={**ledger.env, **typo},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert show.returncode != 0
    assert show.returncode == 2
    [error] = (show.stdout + show.stderr).strip().splitlines()  # one line, no traceback
    assert error == (
        "Error: unknown setting 'CELERY_DOMAIN_EVENTS_EXCHNAGE': did you mean "
        "'CELERY_DOMAIN_EVENTS_EXCHANGE'?"
    )
