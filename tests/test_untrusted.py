"""The wire is untrusted: whatever anyone publishes, a real worker runs no task, survives, and
every message ends handled, retried or dead-lettered with a failure record.

Each test publishes with a plain AMQP client (kombu, no library code) to the events exchange or
straight to a handler queue, against the real RabbitMQ and a real `celery worker` subprocess,
with the solo and the prefork pool.
"""

from __future__ import annotations

import json
import pickle
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Producer

from celery_domain_events.wire.dead_letter import HEADER_PREFIX

from .conftest import Topology, WorkerProcess, drain, unwritable_dlq, wait_for
from .hostile import FarFuture, deep_recursion, nested

pytestmark = [pytest.mark.rabbitmq, pytest.mark.worker, pytest.mark.slow]

Make = Callable[..., WorkerProcess]
POOLS = {"solo": ("-P", "solo"), "prefork": ("-P", "prefork", "-c", "2")}
TASK = "domain_events.tests.worker_app.typed_or_not"
CLOUD = "application/cloudevents+json"


def envelope(event_type: str = "probe.untyped", **overrides: Any) -> dict[str, Any]:
    body = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "elsewhere",
        "type": event_type,
        "data": {"n": 1},
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


def publish(
    topology: Topology,
    body: bytes,
    *,
    queue: str | None = None,
    routing_key: str = "probe.untyped",
    content_type: str | None = CLOUD,
    content_encoding: str = "utf-8",
    headers: dict[str, Any] | None = None,
    **properties: Any,
) -> None:
    """Publish like any AMQP client: to a handler queue (default exchange) or the exchange."""
    with Connection(topology.broker_url) as conn:
        producer = Producer(conn.channel())
        producer.publish(
            body,
            exchange="" if queue else topology.exchange,
            routing_key=queue or routing_key,
            content_type=content_type,
            content_encoding=content_encoding,
            headers=headers or {},
            **properties,
        )


def letters(topology: Topology, dlq: str) -> list[Any]:
    return drain(topology.broker_url, dlq)


def assert_alive_and_fast(worker: WorkerProcess) -> None:
    """The worker still runs and handles a valid event within 3 s of its publication.

    3 s, not less: the version matrix runs four test sessions with their workers at once on
    two cores.
    """
    assert worker.proc is not None
    assert worker.proc.poll() is None, worker.log()[-3000:]
    event = envelope()
    publish_at = time.monotonic()
    publish(worker.topology, json.dumps(event).encode())
    wait_for(lambda: worker.marker_lines("typed_or_not", event["id"]) != [], timeout=3.0)
    assert time.monotonic() - publish_at < 3.0


@pytest.fixture(params=list(POOLS))
def pool(request: pytest.FixtureRequest) -> tuple[str, ...]:
    return POOLS[request.param]


#: Both pools, the solo one marked ``matrix``: the version matrix (scripts/matrix) runs a
#: real-worker test once per combination, with the solo pool. What differs between Celery and
#: kombu versions is the worker's main thread (consumer, strategy, request), which both pools
#: share; the main run covers both pools on the default versions.
MATRIX_SOLO = [pytest.param("solo", marks=pytest.mark.matrix), "prefork"]
MATRIX_SOLO_POOL = pytest.mark.parametrize(
    "pool",
    [
        pytest.param(POOLS["solo"], marks=pytest.mark.matrix, id="solo"),
        pytest.param(POOLS["prefork"], id="prefork"),
    ],
)


def canvas(kind: str, marker: Path, raw_event: str) -> bytes:
    """A Celery task body for the handler's own task that tries to chain another task."""
    plant = {
        "task": "tests.plant_marker",
        "args": [str(marker)],
        "kwargs": {},
        "options": {},
        "subtask_type": None,
        "immutable": True,
    }
    embed: dict[str, Any] = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    embed[kind] = plant if kind == "chord" else [plant]
    return json.dumps([[], {"raw_event": raw_event, "meta": {}}, embed]).encode()


@MATRIX_SOLO_POOL
def test_no_message_runs_a_task_or_a_canvas(
    topology: Topology, worker_process: Make, pool: tuple[str, ...], tmp_path: Path
) -> None:
    worker = worker_process(["typed_or_not"]).start(*pool)
    queue = worker.queue("typed_or_not")
    marker = tmp_path / "planted"
    valid = json.dumps(envelope()).encode()

    class Evil:
        def __reduce__(self) -> Any:
            return (open, (str(marker), "w"))

    own = {"task": TASK, "id": str(uuid.uuid4())}
    attacks: dict[str, tuple[bytes, str, dict[str, Any]]] = {
        "callbacks": (canvas("callbacks", marker, valid.decode()), "application/json", own),
        "chain": (canvas("chain", marker, valid.decode()), "application/json", own),
        "chord": (canvas("chord", marker, valid.decode()), "application/json", own),
        "errbacks-bad-body": (canvas("errbacks", marker, "{not json"), "application/json", own),
        "garbage-own-task": (b"\x00garbage", "application/json", own),
        "pickle-own-task": (pickle.dumps(Evil()), "application/x-python-serialize", own),
        "other-task": (valid, CLOUD, {"task": "tests.plant_marker"}),
    }
    for kind, (body, content_type, headers) in attacks.items():
        publish(
            topology,
            body,
            queue=queue,
            content_type=content_type,
            content_encoding="binary",
            headers=headers,
            message_id=kind,
        )
    wait_for(lambda: topology.queue_depth(queue + ".dlq") == len(attacks), timeout=30)
    by_kind = {m.properties["message_id"]: m for m in letters(topology, queue + ".dlq")}
    assert set(by_kind) == set(attacks)
    for kind, letter in by_kind.items():
        assert letter.headers[HEADER_PREFIX + "reason"] == "poison", kind
        assert "Celery task message" in letter.headers[HEADER_PREFIX + "message"], kind
        body = letter.body.encode() if isinstance(letter.body, str) else letter.body
        assert body == attacks[kind][0], kind  # byte-identical, for forensics
    assert topology.queue_depth(queue) == 0
    assert_alive_and_fast(worker)
    time.sleep(0.5)  # a chained task would have run by now
    assert not marker.exists(), "a task named by a message ran"
    assert "tests.plant_marker[" not in worker.log()  # never received, never run


@MATRIX_SOLO_POOL
def test_poison_pills_never_stop_the_worker(
    topology: Topology, worker_process: Make, pool: tuple[str, ...]
) -> None:
    worker = worker_process(["typed_or_not"]).start(*pool)
    queue = worker.queue("typed_or_not")
    deep = "[" * 10_000 + "]" * 10_000
    pills: dict[str, tuple[bytes, dict[str, Any], str]] = {
        "deep-data": (
            json.dumps(envelope(data=0)).replace('"data": 0', f'"data": {deep}').encode(),
            {"message_id": "deep-data"},
            "deeper than 200 levels",
        ),
        "deep-data-no-id": (
            json.dumps(envelope(data=0)).replace('"data": 0', f'"data": {deep}').encode(),
            {},
            "deeper than 200 levels",
        ),
        "deep-list-body": (deep.encode(), {}, "deeper than 200 levels"),
        "huge-body": (
            json.dumps(envelope(data={"blob": "x" * (2 * 1024 * 1024)})).encode(),
            {},
            "over domain_events_max_event_bytes=1048576",
        ),
    }
    for name, (body, properties, _) in pills.items():
        publish(topology, body, headers={"pill": name}, **properties)
    with deep_recursion():
        for depth in (50, 2_000):  # 2,000: py-amqp's own decoder used to recurse past the limit
            publish(
                topology,
                json.dumps(envelope()).encode(),
                headers={"pill": f"deep-headers-{depth}", "nest": nested(depth)},
            )
    # Header values py-amqp cannot turn into Python (a timestamp 2**60 s after the epoch).
    for name, headers in (
        ("far-future", {"t": FarFuture(2000, 1, 1)}),
        ("nested-far-future", {"x": {"t": FarFuture(2000, 1, 1)}}),
    ):
        publish(topology, json.dumps(envelope()).encode(), headers=headers, message_id=name)
    wait_for(lambda: topology.queue_depth(queue + ".dlq") == len(pills) + 4, timeout=60)
    found = letters(topology, queue + ".dlq")
    by_pill = {m.headers["pill"]: m for m in found if "pill" in m.headers}
    by_id = {m.properties.get("message_id"): m for m in found}
    for name in ("far-future", "nested-far-future"):
        message = by_id[name].headers[HEADER_PREFIX + "message"]
        assert "AMQP headers could not be decoded" in message, name
    for name, (_, _, reason) in pills.items():
        assert by_pill[name].headers[HEADER_PREFIX + "reason"] == "poison", name
        assert reason in by_pill[name].headers[HEADER_PREFIX + "message"], name
    for depth in (50, 2_000):
        letter = by_pill[f"deep-headers-{depth}"]
        assert "headers nest deeper than 8 levels" in letter.headers[HEADER_PREFIX + "message"]
        # The undecodable header cannot travel again: it is named, never silently lost.
        assert letter.headers[HEADER_PREFIX + "dropped-headers"] == "nest"
    assert topology.queue_depth(queue) == 0
    assert_alive_and_fast(worker)
    assert "Unrecoverable error" not in worker.log()


def test_a_dead_letter_too_large_for_a_frame_is_trimmed_never_lost(
    topology: Topology, worker_process: Make
) -> None:
    worker = worker_process(["typed_or_not"]).start(*POOLS["prefork"])
    queue = worker.queue("typed_or_not")
    big = {"big": "b" * (100 * 1024), "small": "kept"}  # with a failure record: over 128 KiB
    # Poison found on the main thread (no specversion), and in the pool (data fails the model).
    publish(topology, json.dumps(envelope(specversion=...)).encode(), headers=big)
    typed = envelope("probe.typed", data={"n": "not a number"})
    publish(topology, json.dumps(typed).encode(), routing_key="probe.typed", headers=big)
    wait_for(lambda: topology.queue_depth(queue + ".dlq") == 2, timeout=30)
    time.sleep(1)  # a requeue loop or a duplicate would show now
    found = letters(topology, queue + ".dlq")
    assert len(found) == 2
    for letter in found:
        assert letter.headers[HEADER_PREFIX + "reason"] == "poison"
        assert letter.headers[HEADER_PREFIX + "dropped-headers"] == "big"
        assert letter.headers["small"] == "kept"
        assert "big" not in letter.headers
    assert topology.queue_depth(queue) == 0
    assert_alive_and_fast(worker)


@pytest.mark.matrix
def test_every_hard_time_limit_is_dead_lettered(topology: Topology, worker_process: Make) -> None:
    worker = worker_process(["times_out", "typed_or_not"]).start(*POOLS["prefork"])
    queue = worker.queue("times_out")
    ids = [str(uuid.uuid4()) for _ in range(6)]
    for event_id in ids:
        publish(
            topology,
            json.dumps(envelope("probe.timeout", id=event_id)).encode(),
            routing_key="probe.timeout",
        )
    wait_for(lambda: topology.queue_depth(queue + ".dlq") == 6, timeout=90)
    found = letters(topology, queue + ".dlq")
    assert sorted(json.loads(m.body)["id"] for m in found) == sorted(ids)  # once each
    for letter in found:
        assert letter.headers[HEADER_PREFIX + "exception"].endswith("TimeLimitExceeded")
        assert letter.headers[HEADER_PREFIX + "reason"] == "rejected"
    assert all(len(worker.marker_lines("times_out", i)) == 1 for i in ids)
    assert topology.queue_depth(queue) == 0
    assert_alive_and_fast(worker)


def test_a_hard_time_limit_whose_dead_letter_fails_is_requeued(
    topology: Topology, worker_process: Make
) -> None:
    worker = worker_process(["times_out"], TEST_PUBLISH_TIMEOUT="1").start(*POOLS["prefork"])
    queue = worker.queue("times_out")
    unwritable_dlq(topology.broker_url, queue + ".dlq")
    event_id = str(uuid.uuid4())
    publish(
        topology,
        json.dumps(envelope("probe.timeout", id=event_id)).encode(),
        routing_key="probe.timeout",
    )
    # Attempt, time limit, dead letter refused, requeued: it runs again.
    wait_for(lambda: len(worker.marker_lines("times_out", event_id)) >= 2, timeout=60)
    worker.stop()
    assert topology.queue_depth(queue) == 1  # the event is still there: never acked
    assert topology.queue_depth(queue + ".dlq") == 0
    assert "requeueing the delivery" in worker.log()


def test_every_valid_cloudevent_is_accepted_and_invalid_ones_are_poison(
    topology: Topology, worker_process: Make, pool: tuple[str, ...]
) -> None:
    worker = worker_process(["typed_or_not"]).start(*pool)
    queue = worker.queue("typed_or_not")
    # Another producer: no message_id, ids that are not UUIDs, fields this consumer's model
    # does not know (a tolerant reader ignores them), data of any JSON type when untyped.
    accepted = [
        envelope("probe.typed", id="crm-000123", data={"n": 1, "added": "later", "opt": None}),
        envelope("probe.untyped", id="crm-000124", data=[1, 2, 3]),
        envelope("probe.untyped", id="crm-000125", data="text", datacontenttype="text/plain"),
        envelope("probe.untyped", id="crm-000126", subject=None, time="2026-12-01T10:00:00Z"),
    ]
    refused = {
        "no-specversion": envelope(id="bad-1", specversion=...),
        "specversion-0.3": envelope(id="bad-2", specversion="0.3"),
        "numeric-id": envelope(id=42),
        "naive-time": envelope(id="bad-4", time="2026-12-01T10:00:00"),
    }
    for event in accepted:
        publish(topology, json.dumps(event).encode(), routing_key=event["type"])
    for name, event in refused.items():
        publish(topology, json.dumps(event).encode(), headers={"case": name})
    for event in accepted:
        wait_for(lambda e=event: worker.marker_lines("typed_or_not", e["id"]) != [], timeout=30)
    wait_for(lambda: topology.queue_depth(queue + ".dlq") == len(refused), timeout=30)
    by_case = {m.headers["case"]: m for m in letters(topology, queue + ".dlq")}
    assert set(by_case) == set(refused)
    assert all(m.headers[HEADER_PREFIX + "reason"] == "poison" for m in by_case.values())
    assert "specversion" in by_case["no-specversion"].headers[HEADER_PREFIX + "message"]
    time.sleep(0.5)
    assert all(len(worker.marker_lines("typed_or_not", e["id"])) == 1 for e in accepted)


def test_dead_letters_without_message_id_are_found_by_their_cloudevents_id(
    topology: Topology, worker_process: Make
) -> None:
    from .test_cli import cli

    worker = worker_process(["typed_or_not"]).start(*POOLS["solo"])
    queue = worker.queue("typed_or_not")
    event = envelope("probe.typed", id="crm-dlq-1", data={"n": "not a number"})
    publish(topology, json.dumps(event).encode(), routing_key="probe.typed")  # no message_id
    wait_for(lambda: topology.queue_depth(queue + ".dlq") == 1, timeout=30)
    listing = json.loads(cli(worker, "dlq", "list", "--json", "--messages").stdout)
    [row] = [r for r in listing if r["handler"] == "typed_or_not"]
    assert [m["event_id"] for m in row["messages"]] == ["crm-dlq-1"]
    shown = json.loads(cli(worker, "dlq", "show", "crm-dlq-1").stdout)
    assert shown["reason"] == "poison"
    assert json.loads(shown["body"])["id"] == "crm-dlq-1"
    out = cli(worker, "dlq", "replay", "--id", "crm-dlq-1").stdout
    assert "1 dead letter(s) replayed" in out
    # Replayed to its handler, which refuses it again: back in the DLQ, once.
    wait_for(lambda: topology.queue_depth(queue + ".dlq") == 1, timeout=30)
    time.sleep(0.5)
    assert topology.queue_depth(queue + ".dlq") == 1
    assert topology.queue_depth(queue) == 0
