"""`celery -A app domain-events dlq ...` against the real broker and a real worker."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from kombu import Connection

from celery_domain_events import emit, transmit

from .conftest import Topology, WorkerProcess, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.worker, pytest.mark.slow]


def cli(worker: WorkerProcess, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return worker.celery("domain-events", *args, check=check)


def depths(worker: WorkerProcess) -> dict[str, Any]:
    listing = json.loads(cli(worker, "dlq", "list", "--json").stdout)
    assert all("messages" not in row for row in listing)  # only with --messages
    return {row["handler"]: row["depth"] for row in listing}


def test_list_show_replay_and_purge_dead_letters(
    topology: Topology, worker_process: Callable[..., WorkerProcess]
) -> None:
    worker = worker_process(["flaky", "sibling"]).start()
    publisher = topology.app("pub")
    first, second = emit("probe.retry", {"n": 1}), emit("probe.retry", {"n": 2})
    transmit(publisher)
    dlq = worker.queue("flaky") + ".dlq"
    wait_for(lambda: topology.queue_depth(dlq) == 2, timeout=60)
    assert depths(worker) == {"flaky": 2, "sibling": 0}

    shown = cli(worker, "dlq", "show", str(first.event_id)).stdout
    record = json.loads(shown)
    assert record["reason"] == "retries-exhausted"
    assert record["attempts"] == 3
    assert record["event"] == "probe.retry"
    assert json.loads(record["body"])["id"] == str(first.event_id)
    assert "RuntimeError" in record["traceback"]

    dry = cli(worker, "dlq", "replay", "--id", str(first.event_id), "--dry-run").stdout
    assert "1 dead letter(s) would be replayed" in dry
    assert topology.queue_depth(dlq) == 2

    none = cli(worker, "dlq", "replay", "--event", "other.#").stdout
    assert "0 dead letter(s) replayed" in none
    spent = cli(worker, "dlq", "replay", "--reason", "retries-exhausted", "--dry-run").stdout
    assert "2 dead letter(s) would be replayed" in spent
    poison = cli(worker, "dlq", "replay", "--reason", "poison", "--dry-run").stdout
    assert "0 dead letter(s) would be replayed" in poison

    out = cli(worker, "dlq", "replay", "--handler", "flaky", "--id", str(first.event_id)).stdout
    assert "1 dead letter(s) replayed" in out
    # The replay reaches the failing handler only: three more attempts, then back in the DLQ.
    wait_for(lambda: len(worker.marker_lines("flaky", first.event_id)) == 6, timeout=60)
    wait_for(lambda: topology.queue_depth(dlq) == 2, timeout=30)
    assert len(worker.marker_lines("sibling", first.event_id)) == 1
    replayed = json.loads(cli(worker, "dlq", "list", "--json", "--messages").stdout)
    by_id = {m["event_id"]: m for row in replayed for m in row["messages"]}
    assert by_id[str(first.event_id)]["replayed"] == 1
    assert by_id[str(second.event_id)]["replayed"] == 0

    refused = cli(worker, "dlq", "purge", "--id", str(second.event_id), check=False)
    assert refused.returncode != 0  # no --yes and no terminal to confirm on
    assert topology.queue_depth(dlq) == 2
    purged = cli(worker, "dlq", "purge", "--id", str(second.event_id), "--yes").stdout
    assert "1 dead letter(s) purged" in purged
    assert depths(worker) == {"flaky": 1, "sibling": 0}

    missing = cli(worker, "dlq", "show", str(second.event_id), check=False)
    assert missing.returncode == 1  # nothing found
    assert "no dead letter" in missing.stderr
    bad = cli(worker, "dlq", "list", "--handler", "nope", check=False)
    assert bad.returncode == 2  # a usage error
    assert "unknown handler" in bad.stderr


@pytest.mark.parametrize(
    ("case", "url"),
    [
        ("closed port", "amqp://guest:s3cret@127.0.0.1:1//"),
        ("refused login", "amqp://guest:s3cret@127.0.0.1:5672//"),
    ],
)
def test_an_unreachable_broker_is_one_line_and_exit_code_3(
    worker_process: Callable[..., WorkerProcess], case: str, url: str
) -> None:
    worker = worker_process(["flaky"], TEST_BROKER_URL=url, TEST_PUBLISH_TIMEOUT="2")
    for args in (("dlq", "list"), ("dlq", "replay", "--dry-run"), ("topology", "declare")):
        result = cli(worker, *args, check=False)
        assert result.returncode == 3, (case, args, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("Error: cannot reach the broker at amqp://guest:**@127.0.0.1:")
        assert "Traceback" not in result.stderr
        assert "s3cret" not in result.stderr + result.stdout
        if case == "refused login":  # refused at once, not retried until the deadline
            assert "ACCESS_REFUSED" in lines[0] or "refused" in lines[0].lower(), lines[0]


def test_an_unreadable_management_api_is_one_line_and_exit_code_4(
    worker_process: Callable[..., WorkerProcess], broker_url: str
) -> None:
    cases = {
        "unreachable": {"TEST_MANAGEMENT_URL": "http://admin:s3cret@127.0.0.1:1"},
        "cannot guess": {"TEST_BROKER_URL": f"{broker_url};{broker_url}"},
    }
    for name, env in cases.items():
        worker = worker_process(["flaky"], **env)
        for args in (("topology", "show"), ("topology", "diff")):
            result = cli(worker, *args, check=False)
            assert result.returncode == 4, (name, args, result.stdout, result.stderr)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1, result.stderr
            assert "management API" in lines[0] or "domain_events_management_url" in lines[0]
            assert "Traceback" not in result.stderr
            assert "s3cret" not in result.stderr + result.stdout


def test_every_command_that_prints_data_has_json(
    topology: Topology, worker_process: Callable[..., WorkerProcess]
) -> None:
    worker = worker_process(["flaky", "sibling"])
    declared = json.loads(cli(worker, "topology", "declare", "--json").stdout)
    assert [d["queue"] for d in declared] == [worker.queue("flaky"), worker.queue("sibling")]
    diff = json.loads(cli(worker, "topology", "diff", "--json").stdout)
    assert diff == {"clean": True, "missing": [], "stale": [], "orphaned_queues": []}
    shown = json.loads(cli(worker, "topology", "show", "--json").stdout)
    assert {q["queue"] for q in shown["queues"]} == {d["queue"] for d in declared}
    replayed = json.loads(cli(worker, "dlq", "replay", "--dry-run", "--json").stdout)
    assert replayed == {"dry_run": True, "replayed": []}
    purged = json.loads(cli(worker, "dlq", "purge", "--dry-run", "--json").stdout)
    assert purged == {"dry_run": True, "purged": []}


@pytest.mark.parametrize("command", [("dlq", "list"), ("dlq", "check"), ("topology", "show")])
def test_an_invalid_setting_is_a_one_line_usage_error(
    worker_process: Callable[..., WorkerProcess], command: tuple[str, ...]
) -> None:
    # Not started: the commands read the app's settings (a delivery limit on classic queues).
    worker = worker_process(["flaky"], TEST_DELIVERY_LIMIT="3")
    result = cli(worker, *command, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert line == (
        "Error: invalid domain events settings: domain_events_delivery_limit needs "
        "domain_events_queue_type='quorum' (classic queues have no delivery limit)"
    ), result.stderr
    assert "Traceback" not in result.stderr


def test_an_unknown_reason_is_a_usage_error_not_an_empty_selection(
    worker_process: Callable[..., WorkerProcess],
) -> None:
    worker = worker_process(["flaky"])
    result = cli(worker, "dlq", "replay", "--reason", "retries_exhausted", "--dry-run", check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "did you mean 'retries-exhausted'?" in result.stderr
    result = cli(worker, "dlq", "purge", "--reason", "bogus", "--dry-run", check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Reasons: retries-exhausted, rejected, poison, or broker:<why>" in result.stderr


@pytest.mark.parametrize(
    ("with_task_queue", "missing_queues"), [(False, True), (True, True), (True, False)]
)
def test_a_worker_given_handler_queues_with_q_runs_only_those_handlers(
    topology: Topology,
    worker_process: Callable[..., WorkerProcess],
    with_task_queue: bool,
    missing_queues: bool,
) -> None:
    # Celery declared a -Q queue as a plain task queue, which RabbitMQ refused (its
    # dead-letter arguments differ), and the worker stopped; with task_create_missing_queues
    # off, Celery refused the name at once.
    env = {} if missing_queues else {"TEST_NO_MISSING_QUEUES": "1"}
    worker = worker_process(["flaky", "sibling"], **env)
    queues = [worker.queue("sibling"), *([topology.tasks] if with_task_queue else [])]
    worker.start("-P", "solo", "-Q", ",".join(queues))
    assert "this worker runs sibling" in worker.log()
    event = emit("probe.retry", {"n": 1})
    transmit(topology.app("pub"))
    wait_for(lambda: bool(worker.marker_lines("sibling", event.event_id)), timeout=30)
    assert worker.marker_lines("flaky", event.event_id) == []  # not this worker's handler
    assert not queue_exists(topology, worker.queue("flaky"))  # nor declared by it
    assert worker.proc is not None
    assert worker.proc.poll() is None
    assert "PRECONDITION_FAILED" not in worker.log()
    # No stray exchange named after the queue, as Celery declares for a queue of its own.
    with Connection(topology.broker_url) as conn, pytest.raises(conn.channel_errors):
        conn.channel().exchange_declare(worker.queue("sibling"), "direct", passive=True)


@pytest.mark.parametrize("with_q", [False, True])
def test_a_worker_given_a_handler_queue_with_x_runs_the_other_handlers(
    topology: Topology, worker_process: Callable[..., WorkerProcess], with_q: bool
) -> None:
    worker = worker_process(["flaky", "sibling"])
    selection = ("-Q", topology.tasks) if with_q else ()
    worker.start("-P", "solo", *selection, "-X", worker.queue("flaky"))
    assert "this worker runs sibling" in worker.log()
    event = emit("probe.retry", {"n": 1})
    transmit(topology.app("pub"))
    wait_for(lambda: bool(worker.marker_lines("sibling", event.event_id)), timeout=30)
    assert worker.marker_lines("flaky", event.event_id) == []
    assert not queue_exists(topology, worker.queue("flaky"))


def queue_exists(topology: Topology, name: str) -> bool:
    with Connection(topology.broker_url) as conn:
        try:
            conn.channel().queue_declare(name, passive=True)
        except conn.channel_errors:
            return False
        return True
