"""Flower shows each handler run with a readable task name and an event summary."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_domain_events import emit, transmit
from celery_domain_events.consuming.delivery import task_id_for

from .conftest import ROOT, Topology, WorkerProcess, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.worker, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def flower(tmp_path: Path) -> Iterator[Callable[[WorkerProcess], str]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(worker: WorkerProcess) -> str:
        port = free_port()
        log = (tmp_path / "flower.log").open("ab")
        env = {**worker.env, "FLOWER_UNAUTHENTICATED_API": "true"}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tests.worker_app",
                "flower",
                f"--port={port}",
                "--address=127.0.0.1",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _get(url + "/healthcheck") == "OK", timeout=30, interval=0.3)
        return url

    yield start
    for proc in procs:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read().decode()
    except OSError:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return body


def test_flower_lists_handler_runs_by_name_with_the_event(
    topology: Topology,
    worker_process: Callable[..., WorkerProcess],
    flower: Callable[[WorkerProcess], str],
) -> None:
    worker = worker_process(["flaky", "sibling"])
    url = flower(worker)  # first, so that it sees the worker's events from the start
    worker.start()
    event = emit("probe.retry", {"order": 7, "email": "customer@example.com"})
    transmit(topology.app("pub"))
    sibling_id = task_id_for(str(event.event_id), "sibling")
    flaky_id = task_id_for(str(event.event_id), "flaky")

    def tasks() -> dict[str, Any]:
        return _get(f"{url}/api/tasks") or {}

    wait_for(
        lambda: (
            tasks().get(sibling_id, {}).get("state") == "SUCCESS"
            and tasks().get(flaky_id, {}).get("state") == "FAILURE"
        ),
        timeout=60,
        interval=0.5,
    )
    sibling = tasks()[sibling_id]
    assert sibling["name"] == "domain_events.tests.worker_app.sibling"
    assert "'event': 'probe.retry'" in sibling["kwargs"]
    assert str(event.event_id) in sibling["kwargs"]
    flaky = tasks()[flaky_id]
    assert flaky["name"] == "domain_events.tests.worker_app.flaky"
    assert "flaky handler failed" in flaky["exception"]
    assert flaky["retries"] == 2
    # Every attempt, retries included, shows the summary only: never the event's data.
    summary = (
        f"{{'event': 'probe.retry', 'version': 1, 'id': '{event.event_id}', "
        f"'source': '{topology.service('pub')}'}}"
    )
    assert sibling["kwargs"] == summary
    assert flaky["kwargs"] == summary

    # A replayed run (from the DLQ, through the retry exchange) shows the same summary.
    from celery_domain_events import DomainEvents
    from celery_domain_events.amqp.queues import process
    from celery_domain_events.ops.replay import replay

    dlq = worker.queue("flaky") + ".dlq"
    wait_for(lambda: topology.queue_depth(dlq) == 1, timeout=30)
    app = topology.app("pub")
    ext = DomainEvents.of(app)
    ext.settings  # noqa: B018 (read before the replay, as the CLI does)
    with app.connection_for_write() as conn:
        assert len(process(conn, dlq, act=lambda letter: replay(ext, conn, letter))) == 1
    wait_for(lambda: len(worker.marker_lines("flaky", event.event_id)) == 6, timeout=60)
    wait_for(lambda: topology.queue_depth(dlq) == 1, timeout=30)
    wait_for(lambda: tasks()[flaky_id].get("state") == "FAILURE", timeout=30, interval=0.5)
    assert tasks()[flaky_id]["kwargs"] == summary
    assert "customer@example.com" not in json.dumps(tasks())
