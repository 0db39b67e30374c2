"""The transactional outbox against the real PostgreSQL and the real RabbitMQ, crashes included."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from click.testing import CliRunner

from celery_domain_events import DomainEvents, PublishError, emit, transmit
from celery_domain_events.contrib.outbox import Outbox
from celery_domain_events.ops.outbox_cli import outbox as outbox_cli

from .conftest import DB_URL, ROOT, Topology, drain, probe, wait_for

pytestmark = [pytest.mark.rabbitmq]

CHILD_ENV = "TEST_OUTBOX_CHILD"


@pytest.fixture
def table_name(topology: Topology, engine: sa.Engine) -> Iterator[str]:
    """This test's outbox table name; the table is dropped afterwards, whoever created it."""
    name = f"outbox_{topology.uid}"
    yield name
    Outbox(DomainEvents.of(topology.app("drop")), table_name=name).table.drop(
        engine, checkfirst=True
    )


@pytest.fixture
def box(topology: Topology, engine: sa.Engine, table_name: str) -> Outbox:
    outbox = Outbox(DomainEvents.of(topology.app()), table_name=table_name)
    outbox.table.create(engine)
    return outbox


@pytest.fixture
def orders(topology: Topology, engine: sa.Engine) -> Iterator[sa.Table]:
    """A business table of this test only."""
    table = orders_table(f"orders_{topology.uid}")
    table.create(engine)
    yield table
    table.drop(engine, checkfirst=True)


def orders_table(name: str) -> sa.Table:
    return sa.Table(name, sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True))


def collect(topology: Topology, name: str, expected: int, timeout: float = 15) -> list[Any]:
    """Wait for exactly ``expected`` messages at the probe queue; return them in order."""
    seen: list[Any] = []

    def enough() -> bool:
        seen.extend(drain(topology.broker_url, name))
        return len(seen) >= expected

    wait_for(enough, timeout=timeout)
    time.sleep(0.2)
    seen.extend(drain(topology.broker_url, name))
    assert len(seen) == expected
    return seen


def event_ids(messages: list[Any]) -> list[str]:
    return [json.loads(m.body)["id"] for m in messages]


def rows(engine: sa.Engine, table: sa.Table) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(table).order_by(table.c.created_at)))


def count(engine: sa.Engine, table: sa.Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def order_paid_then_fail(engine: sa.Engine, box: Outbox, orders: sa.Table, order_id: int) -> None:
    with engine.begin() as conn:
        conn.execute(orders.insert().values(id=order_id))
        box.add(conn, "test.outbox.order_paid", {"order_id": order_id})
        raise ValueError("boom")


def relay_until_empty(box: Outbox, engine: sa.Engine) -> int:
    """Relay until no row is left (rows a dead relay locked are freed when PG notices)."""
    relayed = 0

    def empty() -> bool:
        nonlocal relayed
        relayed += box.relay_once(engine)
        return count(engine, box.table) == 0

    wait_for(empty, timeout=20, interval=0.1)
    return relayed


def test_rows_share_the_business_transaction(
    topology: Topology, engine: sa.Engine, box: Outbox, orders: sa.Table
) -> None:
    queue = probe(topology, box.ext.app)
    with sa.orm.Session(engine) as session:
        session.execute(orders.insert().values(id=1))
        box.add(session, "test.outbox.order_paid", {"order_id": 1})
        session.rollback()
    with pytest.raises(ValueError, match="boom"):
        order_paid_then_fail(engine, box, orders, 2)
    assert count(engine, orders) == count(engine, box.table) == 0
    assert box.relay_once(engine) == 0

    with sa.orm.Session(engine) as session:
        session.execute(orders.insert().values(id=3))
        paid = box.add(session, "test.outbox.order_paid", {"order_id": 3})
        shipped = box.add(session, "test.outbox.order_shipped", {"order_id": 3}, version=2)
        session.commit()
    [first, second] = rows(engine, box.table)
    assert (first.id, second.id) == (str(paid.event_id), str(shipped.event_id))
    assert (first.attempts, first.exchange, first.routing_key) == (
        0,
        topology.exchange,
        "test.outbox.order_paid",
    )
    assert drain(topology.broker_url, queue) == []  # written, not published

    assert box.relay_once(engine) == 2
    assert count(engine, box.table) == 0
    relayed = collect(topology, queue, 2)
    assert event_ids(relayed) == [str(paid.event_id), str(shipped.event_id)]
    assert [m.delivery_info["routing_key"] for m in relayed] == [
        "test.outbox.order_paid",
        "test.outbox.order_shipped",
    ]
    assert json.loads(relayed[1].body)["data"] == {"order_id": 3}

    # The relay sends what transmit() sends: the same body format, properties and headers.
    emit("test.outbox.order_paid", {"order_id": 4})
    transmit(box.ext.app)
    [direct] = collect(topology, queue, 1)
    differ = {"message_id", "timestamp", "application_headers"}
    assert {k: v for k, v in relayed[0].properties.items() if k not in differ} == {
        k: v for k, v in direct.properties.items() if k not in differ
    }
    assert relayed[0].properties["content_type"] == "application/cloudevents+json"
    assert relayed[0].properties["message_id"] == str(paid.event_id)
    assert json.loads(relayed[1].body)["eventversion"] == 2
    assert (relayed[0].headers or {}) == (direct.headers or {}) == {}
    assert json.loads(relayed[0].body).keys() == json.loads(direct.body).keys()


def test_publish_failure_keeps_the_rows_and_counts_attempts(
    topology: Topology, engine: sa.Engine, box: Outbox
) -> None:
    down = Celery("down", broker="amqp://guest:guest@127.0.0.1:1//", set_as_current=False)
    down.conf.broker_heartbeat = None
    DomainEvents(
        down,
        service=topology.service(),
        exchange=topology.exchange,
        unrouted_queue=topology.unrouted,
        publish_timeout=1,
    )
    stuck = Outbox(DomainEvents.of(down), table_name=box.table.name)
    with engine.begin() as conn:
        added = [box.add(conn, "test.outbox.order_paid", {"order_id": n}) for n in range(2)]
    for attempt in (1, 2):
        with pytest.raises(PublishError) as info:
            stuck.relay_once(engine)
        assert set(info.value.events) == {str(e.event_id) for e in added}
        assert [r.attempts for r in rows(engine, box.table)] == [attempt, attempt]

    queue = probe(topology, box.ext.app)
    assert box.relay_once(engine) == 2  # the broker is back: nothing was lost
    assert event_ids(collect(topology, queue, 2)) == [str(e.event_id) for e in added]


def test_app_dies_after_commit_before_publish(
    topology: Topology, engine: sa.Engine, box: Outbox, orders: sa.Table
) -> None:
    queue = probe(topology, box.ext.app)
    child = run_child(topology, box, mode="write", orders=orders.name, count=25)
    assert child.wait(timeout=30) == 1  # os._exit(1) right after the commit
    assert count(engine, orders) == 25
    waiting = [r.id for r in rows(engine, box.table)]
    assert len(waiting) == 25
    assert drain(topology.broker_url, queue) == []  # the dead process published nothing

    assert box.relay_once(engine) == 25
    assert event_ids(collect(topology, queue, 25)) == waiting
    assert count(engine, box.table) == 0


def test_relay_killed_between_publish_and_delete(
    topology: Topology, engine: sa.Engine, box: Outbox, tmp_path: Path
) -> None:
    queue = probe(topology, box.ext.app)
    with engine.begin() as conn:
        added = [str(box.add(conn, "test.outbox.tick", {"n": n}).event_id) for n in range(20)]
    marker = tmp_path / "published"
    relay = run_child(topology, box, mode="relay", marker=str(marker))
    try:
        wait_for(marker.exists, timeout=30)
        first = collect(topology, queue, 20)  # confirmed by the broker...
        assert count(engine, box.table) == 20  # ...and not deleted yet
    finally:
        os.kill(relay.pid, signal.SIGKILL)  # a power cut between the confirms and the DELETE
        relay.wait(timeout=30)

    assert relay_until_empty(box, engine) == 20  # a new relay publishes them again
    arrived = Counter(event_ids(first) + event_ids(collect(topology, queue, 20)))
    assert set(arrived) == set(added)  # every event at least once: nothing lost
    assert set(arrived.values()) == {2}  # duplicates, with the same event id to dedupe on


def test_concurrent_relays_publish_each_row_once(
    topology: Topology, engine: sa.Engine, box: Outbox
) -> None:
    queue = probe(topology, box.ext.app)
    with engine.begin() as conn:
        added = [str(box.add(conn, "test.outbox.tick", {"n": n}).event_id) for n in range(1000)]
    start = threading.Barrier(2)
    relayed: dict[str, list[int]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def relay(name: str) -> None:
        try:
            start.wait(timeout=10)
            while n := box.relay_once(engine, limit=50):
                relayed[name].append(n)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=relay, args=(name,)) for name in relayed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert sum(relayed["a"]) + sum(relayed["b"]) == 1000
    assert relayed["a"], "both relays did part of the work"
    assert relayed["b"], "both relays did part of the work"
    assert count(engine, box.table) == 0
    arrived = event_ids(collect(topology, queue, 1000, timeout=30))
    assert sorted(arrived) == sorted(added)  # each row exactly once


def test_relay_forever_until_stopped(topology: Topology, engine: sa.Engine, box: Outbox) -> None:
    queue = probe(topology, box.ext.app)
    stop = threading.Event()
    batches: list[int] = []
    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(
            box.relay_forever(engine, interval=0.1, stop=stop, on_batch=batches.append)
        )
    )
    thread.start()
    try:
        with engine.begin() as conn:
            for n in range(3):
                box.add(conn, "test.outbox.tick", {"n": n})
        collect(topology, queue, 3)
        with engine.begin() as conn:
            box.add(conn, "test.outbox.tick", {"n": 3})
        collect(topology, queue, 1)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert result == [4]
    assert sum(batches) == 4


def test_cli_creates_the_table_and_relays(
    topology: Topology, engine: sa.Engine, table_name: str
) -> None:
    app = topology.app()
    queue = probe(topology, app)
    runner = CliRunner()
    obj = SimpleNamespace(app=app)
    env = {"DOMAIN_EVENTS_OUTBOX_URL": DB_URL}

    absent = runner.invoke(outbox_cli, ["relay", "--once", "--table", table_name], obj=obj, env=env)
    assert absent.exit_code == 1
    assert "database error" in absent.output
    assert "does not exist" in absent.output
    bad_url = ["relay", "--once", "--db-url", "nosuchdb://x"]
    assert runner.invoke(outbox_cli, bad_url, obj=obj).exit_code == 2

    created = runner.invoke(outbox_cli, ["create-table", "--table", table_name], obj=obj, env=env)
    assert created.exit_code == 0, created.output
    assert f"outbox table {table_name!r} is ready" in created.output
    box = Outbox(DomainEvents.of(app), table_name=table_name)
    with engine.begin() as conn:
        for n in range(3):
            box.add(conn, "test.outbox.tick", {"n": n})

    once = ["relay", "--once", "--table", table_name, "--limit", "2"]
    assert runner.invoke(outbox_cli, once, obj=obj, env=env).output == "2 event(s) relayed\n"
    assert runner.invoke(outbox_cli, once, obj=obj, env=env).output == "1 event(s) relayed\n"
    assert runner.invoke(outbox_cli, once, obj=obj, env=env).output == "0 event(s) relayed\n"
    collect(topology, queue, 3)

    missing = runner.invoke(outbox_cli, ["relay", "--once"], obj=obj, env={})
    assert missing.exit_code == 2
    assert "--db-url" in missing.output


def test_cli_relay_runs_until_sigterm(
    topology: Topology, engine: sa.Engine, box: Outbox, tmp_path: Path
) -> None:
    queue = probe(topology, box.ext.app)
    with engine.begin() as conn:
        box.add(conn, "test.outbox.tick", {"n": 0})
    output = tmp_path / "relay.out"
    relay = run_child(topology, box, mode="cli", output=str(output))
    try:
        collect(topology, queue, 1, timeout=30)
        with engine.begin() as conn:
            box.add(conn, "test.outbox.tick", {"n": 1})
        collect(topology, queue, 1)
    finally:
        relay.send_signal(signal.SIGTERM)
        code = relay.wait(timeout=30)
    printed = output.read_text()
    assert code == 0, printed
    assert printed.count("1 event(s) relayed") == 2
    assert printed.rstrip().endswith("stopped: 2 event(s) relayed")


# A child process, for the crash tests: `python -c "from tests.test_outbox import child_main"`.


def run_child(topology: Topology, box: Outbox, *, mode: str, **options: Any) -> Any:
    config = {
        "mode": mode,
        "broker_url": topology.broker_url,
        "exchange": topology.exchange,
        "unrouted": topology.unrouted,
        "service": box.ext.settings.service,
        "table": box.table.name,
        **options,
    }
    out = open(options["output"], "wb") if "output" in options else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            [sys.executable, "-c", "from tests.test_outbox import child_main; child_main()"],
            cwd=ROOT,
            env={**os.environ, CHILD_ENV: json.dumps(config)},
            stdout=out,
            stderr=subprocess.STDOUT if "output" in options else None,
        )
    finally:
        if "output" in options:
            out.close()


def child_main() -> None:
    config = json.loads(os.environ[CHILD_ENV])
    app = Celery("outbox-child", broker=config["broker_url"], set_as_current=False)
    app.conf.update(
        broker_heartbeat=None,
        domain_events_exchange=config["exchange"],
        domain_events_unrouted_queue=config["unrouted"],
    )
    DomainEvents(app, service=config["service"], handlers=[])
    box = Outbox(DomainEvents.of(app), table_name=config["table"])
    engine = sa.create_engine(DB_URL)
    if config["mode"] == "write":
        orders = orders_table(config["orders"])
        with engine.begin() as conn:
            for n in range(config["count"]):
                conn.execute(orders.insert().values(id=n))
                box.add(conn, "test.outbox.order_paid", {"order_id": n})
        os._exit(1)  # committed; the process dies before anything could publish
    elif config["mode"] == "relay":

        def hang_after_publish() -> None:
            Path(config["marker"]).touch()
            time.sleep(60)  # the test SIGKILLs us here

        box.relay_once(engine, _after_publish=hang_after_publish)
    else:
        args = ["relay", "--db-url", DB_URL, "--table", config["table"], "--interval", "0.1"]
        outbox_cli.main(args, obj=SimpleNamespace(app=app), prog_name="relay")
