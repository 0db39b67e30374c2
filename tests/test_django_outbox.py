"""The Django outbox against the real PostgreSQL and RabbitMQ, crashes included.

The crash tests of tests/test_outbox.py, for ``celery_domain_events.contrib.django.outbox``. Django
can be configured once per process (this one uses SQLite, in tests/test_django.py), so
everything Django does runs in a child process with the settings of examples/django_ledger, on
a PostgreSQL database of the test's own: ``child_main`` below, or ``manage.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from .conftest import Topology, drain, wait_for
from .test_django_example import EXAMPLE, Ledger, collect, ledger_service, probe_queue

pytestmark = [pytest.mark.rabbitmq]

CHILD_ENV = "TEST_DJANGO_OUTBOX_CHILD"


@pytest.fixture
def ledger(topology: Topology, engine: sa.Engine) -> Iterator[Ledger]:
    with ledger_service(topology, engine) as service:
        yield service


def run_child(
    ledger: Ledger, mode: str, env: dict[str, str] | None = None, **options: Any
) -> subprocess.Popen[str]:
    """Start ``child_main`` in the example project's directory, with its settings."""
    return subprocess.Popen(
        [sys.executable, "-c", "from tests.test_django_outbox import child_main; child_main()"],
        cwd=EXAMPLE,
        env={**ledger.env, **(env or {}), CHILD_ENV: json.dumps({"mode": mode, **options})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(child: subprocess.Popen[str], expected_code: int = 0) -> Any:
    """Wait for ``child``; return the JSON it printed last (None if it printed nothing)."""
    out, err = child.communicate(timeout=60)
    assert child.returncode == expected_code, out + err
    lines = out.strip().splitlines()
    return json.loads(lines[-1]) if lines else None


def relay_once(ledger: Ledger) -> int:
    relay = ledger.manage("domain_events_relay", "--once")
    assert relay.returncode == 0, relay.stdout + relay.stderr
    assert relay.stdout.endswith("event(s) relayed\n"), relay.stdout
    return int(relay.stdout.split()[0])


def event_ids(messages: list[Any]) -> list[str]:
    return [json.loads(m.body)["id"] for m in messages]


def outbox_ids(ledger: Ledger) -> list[str]:
    return [
        r.id for r in ledger.rows("SELECT id FROM domain_events_outbox ORDER BY created_at, id")
    ]


def entries(ledger: Ledger) -> list[int]:
    return [r.order_id for r in ledger.rows("SELECT order_id FROM ledger_ledgerentry ORDER BY 1")]


def test_rows_share_the_business_transaction(topology: Topology, ledger: Ledger) -> None:
    probe = probe_queue(topology, "#")
    added = finish(run_child(ledger, "transactions"))
    # Rolled back by an exception, by set_rollback(), and a rolled-back savepoint: no row.
    assert entries(ledger) == [3]
    rows = ledger.rows(
        "SELECT id, exchange, routing_key, attempts FROM domain_events_outbox "
        "ORDER BY created_at, id"
    )
    assert rows == [
        (added["paid"], topology.exchange, "test.outbox.order_paid", 0),
        (added["shipped"], topology.exchange, "test.outbox.order_shipped", 0),
    ]
    assert drain(topology.broker_url, probe) == []  # written, not published

    assert relay_once(ledger) == 2
    assert ledger.outbox_count() == 0
    relayed = collect(topology.broker_url, probe, 2)
    assert event_ids(relayed) == [added["paid"], added["shipped"]]
    assert [m.delivery_info["routing_key"] for m in relayed] == [
        "test.outbox.order_paid",
        "test.outbox.order_shipped",
    ]
    assert relayed[0].properties["content_type"] == "application/cloudevents+json"
    assert relayed[0].properties["message_id"] == added["paid"]
    shipped = json.loads(relayed[1].body)
    assert (shipped["eventversion"], shipped["data"]) == (2, {"order_id": 3})
    assert relay_once(ledger) == 0


def test_publish_failure_keeps_the_rows_and_counts_attempts(
    topology: Topology, ledger: Ledger
) -> None:
    added = finish(run_child(ledger, "write", count=2))
    broker_down = {
        "LEDGER_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//",
        "LEDGER_EXTRA_SETTINGS": json.dumps({"CELERY_DOMAIN_EVENTS_PUBLISH_TIMEOUT": 1}),
    }
    for attempt in (1, 2):
        relay = ledger.manage("domain_events_relay", "--once", **broker_down)
        assert relay.returncode == 1, relay.stdout + relay.stderr
        last = relay.stderr.strip().splitlines()[-1]  # after the retry and relay log lines
        assert last.startswith("relay failed: could not publish 2 message(s)"), relay.stderr
        rows = ledger.rows("SELECT id, attempts FROM domain_events_outbox ORDER BY created_at, id")
        assert rows == [(event_id, attempt) for event_id in added]

    probe = probe_queue(topology, "#")
    assert relay_once(ledger) == 2  # the broker is back: nothing was lost
    assert event_ids(collect(topology.broker_url, probe, 2)) == added
    assert ledger.outbox_count() == 0


def test_the_sqlalchemy_relay_publishes_the_django_outbox(
    topology: Topology, ledger: Ledger
) -> None:
    # The same table: `celery -A proj domain-events outbox relay --db-url ...` relays it too.
    probe = probe_queue(topology, "#")
    added = finish(run_child(ledger, "write", count=3))
    command = [
        "domain-events",
        "outbox",
        "relay",
        "--once",
        "--db-url",
        ledger.env["LEDGER_DB_URL"],
    ]
    relay = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "ledger_site", *command],
        cwd=EXAMPLE,
        env=ledger.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert relay.returncode == 0, relay.stdout + relay.stderr
    assert relay.stdout.strip() == "3 event(s) relayed"
    assert event_ids(collect(topology.broker_url, probe, 3)) == added
    assert ledger.outbox_count() == 0


def test_app_dies_after_commit_before_publish(topology: Topology, ledger: Ledger) -> None:
    probe = probe_queue(topology, "#")
    finish(run_child(ledger, "write", count=25, die=True), expected_code=1)
    assert entries(ledger) == list(range(25))
    waiting = outbox_ids(ledger)
    assert len(waiting) == 25
    assert drain(topology.broker_url, probe) == []  # the dead process published nothing

    assert relay_once(ledger) == 25  # the next relay publishes them
    assert event_ids(collect(topology.broker_url, probe, 25)) == waiting
    assert ledger.outbox_count() == 0


def test_relay_killed_between_publish_and_delete(
    topology: Topology, ledger: Ledger, tmp_path: Path
) -> None:
    probe = probe_queue(topology, "#")
    added = finish(run_child(ledger, "write", count=20))
    marker = tmp_path / "published"
    relay = run_child(ledger, "relay-and-hang", marker=str(marker))
    try:
        wait_for(lambda: marker.exists() or relay.poll() is not None, timeout=30)
        assert marker.exists(), relay.communicate()
        first = collect(topology.broker_url, probe, 20)  # confirmed by the broker...
        assert ledger.outbox_count() == 20  # ...and not deleted yet
    finally:
        relay.kill()  # a power cut between the confirms and the COMMIT of the DELETE
        relay.communicate(timeout=30)

    relayed = 0

    def empty() -> bool:  # the dead relay's row locks go when PostgreSQL notices
        nonlocal relayed
        relayed += relay_once(ledger)
        return ledger.outbox_count() == 0

    wait_for(empty, timeout=30, interval=0.2)
    assert relayed == 20  # the next relay publishes them again
    arrived = Counter(event_ids(first) + event_ids(collect(topology.broker_url, probe, 20)))
    assert set(arrived) == set(added)  # every event at least once: nothing lost
    assert set(arrived.values()) == {2}  # duplicates, with the same event id to dedupe on


def test_concurrent_relays_publish_each_row_once(
    topology: Topology, ledger: Ledger, tmp_path: Path
) -> None:
    probe = probe_queue(topology, "#")
    added = finish(run_child(ledger, "write", count=1000, business=False))
    go = tmp_path / "go"
    relays = [
        run_child(ledger, "relay-race", ready=str(tmp_path / f"ready-{n}"), go=str(go))
        for n in range(2)
    ]
    wait_for(lambda: all((tmp_path / f"ready-{n}").exists() for n in range(2)), timeout=30)
    go.touch()  # both relays are connected to PostgreSQL and RabbitMQ: start together
    batches = [finish(relay) for relay in relays]
    assert sum(map(sum, batches)) == 1000
    assert batches[0], "both relays did part of the work"
    assert batches[1], "both relays did part of the work"
    assert ledger.outbox_count() == 0
    arrived = event_ids(collect(topology.broker_url, probe, 1000, timeout=30))
    assert sorted(arrived) == sorted(added)  # each row exactly once


def test_a_publish_that_fails_after_commit_lands_in_the_outbox(
    topology: Topology, ledger: Ledger
) -> None:
    probe = probe_queue(topology, "#")
    broker_down = {
        "LEDGER_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//",
        "LEDGER_EXTRA_SETTINGS": json.dumps({"CELERY_DOMAIN_EVENTS_PUBLISH_TIMEOUT": 1}),
    }
    # emit_on_commit(robust=True): the commit succeeds, the unconfirmed event goes to the outbox.
    emitted = finish(run_child(ledger, "emit-on-commit", env=broker_down))
    assert entries(ledger) == [7]
    assert outbox_ids(ledger) == emitted
    assert relay_once(ledger) == 1  # the broker is reachable again
    assert event_ids(collect(topology.broker_url, probe, 1)) == emitted
    assert ledger.outbox_count() == 0


def test_relay_command_runs_until_sigterm(
    topology: Topology, ledger: Ledger, tmp_path: Path
) -> None:
    probe = probe_queue(topology, "#")
    output = tmp_path / "relay.out"
    with output.open("w") as out:
        relay = subprocess.Popen(
            [sys.executable, "manage.py", "domain_events_relay", "--interval", "0.1"],
            cwd=EXAMPLE,
            env=ledger.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        first = finish(run_child(ledger, "write", count=1))
        assert event_ids(collect(topology.broker_url, probe, 1, timeout=30)) == first
        second = finish(run_child(ledger, "write", count=2, start=1))
        assert event_ids(collect(topology.broker_url, probe, 2)) == second
        assert ledger.outbox_count() == 0
    finally:
        relay.send_signal(signal.SIGTERM)
        code = relay.wait(timeout=30)
    printed = output.read_text()
    assert code == 0, printed
    assert printed.strip().splitlines()[-1] == "stopped: 3 event(s) relayed"


# The child process: `python -c "from tests.test_django_outbox import child_main; child_main()"`,
# in examples/django_ledger, configured by Ledger.env. Each mode prints its result as JSON.


def child_main() -> None:
    import django

    django.setup()
    config = json.loads(os.environ[CHILD_ENV])
    modes = {
        "transactions": child_transactions,
        "write": child_write,
        "relay-and-hang": child_relay_and_hang,
        "relay-race": child_relay_race,
        "emit-on-commit": child_emit_on_commit,
    }
    result = modes[config["mode"]](config)
    if result is not None:
        sys.stdout.write(json.dumps(result) + "\n")


class Rollback(Exception):
    pass


def entry(order_id: int) -> None:
    """A business row: the ledger entry of an order."""
    from ledger.models import LedgerEntry

    LedgerEntry.objects.create(order_id=order_id, amount=1, event_id="test")


def child_transactions(config: dict[str, Any]) -> dict[str, str]:
    """Roll back three ways (exception, set_rollback, a savepoint), then commit two events."""
    from django.db import transaction

    from celery_domain_events.contrib.django import outbox

    try:
        with transaction.atomic():
            entry(1)
            outbox.add("test.outbox.order_paid", {"order_id": 1})
            raise Rollback
    except Rollback:
        pass
    with transaction.atomic():
        entry(2)
        outbox.add("test.outbox.order_paid", {"order_id": 2})
        transaction.set_rollback(True)
    with transaction.atomic():
        entry(3)
        paid = outbox.add("test.outbox.order_paid", {"order_id": 3})
        try:
            with transaction.atomic():  # a savepoint
                outbox.add("test.outbox.order_refunded", {"order_id": 3})
                raise Rollback
        except Rollback:
            pass
        shipped = outbox.add("test.outbox.order_shipped", {"order_id": 3}, version=2)
    return {"paid": str(paid.event_id), "shipped": str(shipped.event_id)}


def child_write(config: dict[str, Any]) -> list[str]:
    """Commit ``count`` events (with ledger entries unless ``business`` is false)."""
    from django.db import transaction

    from celery_domain_events.contrib.django import outbox, resolve_app
    from celery_domain_events.extension import DomainEvents
    from celery_domain_events.publishing.send import as_event

    start, count = config.get("start", 0), config["count"]
    with transaction.atomic():
        if config.get("business", True):
            added = []
            for n in range(start, start + count):
                entry(n)
                added.append(outbox.add("test.outbox.order_paid", {"order_id": n}))
        else:  # many rows, fast: one INSERT
            added = [as_event("test.outbox.tick", {"n": n}) for n in range(count)]
            outbox.store(DomainEvents.of(resolve_app(None)), added)
    if config.get("die"):
        os._exit(1)  # committed; the process dies before anything could publish
    return [str(e.event_id) for e in added]


def child_relay_and_hang(config: dict[str, Any]) -> None:
    """Relay one batch and hang between the broker's confirms and the DELETE."""
    from celery_domain_events.contrib.django import outbox

    def hang_after_publish() -> None:
        Path(config["marker"]).touch()
        time.sleep(60)  # the test SIGKILLs us here

    outbox._after_publish = hang_after_publish
    outbox.relay_once()


def child_relay_race(config: dict[str, Any]) -> list[int]:
    """Relay 50 rows at a time until none is left; return the batch sizes."""
    from django.db import connection

    from celery_domain_events.contrib.django import outbox, resolve_app

    # Connect first, so that both relays start relaying at the same moment.
    connection.ensure_connection()
    broker = resolve_app(None).pool.acquire(block=True)
    broker.ensure_connection()
    broker.release()
    Path(config["ready"]).touch()
    wait_for(Path(config["go"]).exists, timeout=30, interval=0.005)
    batches = []
    while count := outbox.relay_once(limit=50):
        batches.append(count)
    return batches


def child_emit_on_commit(config: dict[str, Any]) -> list[str]:
    """Commit a ledger entry and publish its event on commit (the broker may be down)."""
    from django.db import transaction

    from celery_domain_events.contrib.django import emit_on_commit

    with transaction.atomic():
        entry(7)
        event = emit_on_commit("test.outbox.order_paid", {"order_id": 7})
    return [str(event.event_id)]


def test_a_misspelled_setting_stops_the_relay_with_one_line(ledger: Ledger) -> None:
    # Even with an empty outbox: a relay must not idle silently on a setting it cannot read.
    typo = {"LEDGER_EXTRA_SETTINGS": json.dumps({"CELERY_DOMAIN_EVENTS_SERVCE": "x"})}
    for args in (("--once",), ("--interval", "0.1")):
        relay = ledger.manage("domain_events_relay", *args, timeout=30, **typo)
        assert relay.returncode != 0, relay.stdout
        [line] = relay.stderr.strip().splitlines()
        assert line.startswith("CommandError: unknown setting 'CELERY_DOMAIN_EVENTS_SERVCE'")
