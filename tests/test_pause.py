"""`celery control cancel_consumer` / `add_consumer` pause and resume one handler's queue."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import pytest

from .conftest import Topology, WorkerProcess, wait_for
from .test_untrusted import MATRIX_SOLO, POOLS, envelope, publish

pytestmark = [pytest.mark.rabbitmq, pytest.mark.worker, pytest.mark.slow]

EVENTS = 20


@pytest.mark.parametrize("pool", MATRIX_SOLO)
def test_pause_one_handler_and_resume_it_without_losing_events(
    topology: Topology, worker_process: Callable[..., WorkerProcess], pool: str
) -> None:
    worker = worker_process(["typed_or_not", "also_untyped"]).start(*POOLS[pool])
    paused = worker.queue("also_untyped")
    control = topology.app("ctl").control
    reply = control.cancel_consumer(paused, destination=[worker.hostname], reply=True)
    assert reply == [{worker.hostname: {"ok": f"no longer consuming from {paused}"}}]
    wait_for(lambda: f"paused handler queue {paused}" in worker.log(), timeout=10)

    ids = [str(uuid.uuid4()) for _ in range(EVENTS)]
    for event_id in ids:
        publish(topology, json.dumps(envelope(id=event_id)).encode())
    # The other handler keeps running; the paused one's events wait in its queue.
    wait_for(lambda: all(worker.marker_lines("typed_or_not", i) for i in ids), timeout=30)
    wait_for(lambda: topology.queue_depth(paused) == EVENTS, timeout=10)
    assert not any(worker.marker_lines("also_untyped", i) for i in ids)

    control.add_consumer(paused, destination=[worker.hostname], reply=True)
    wait_for(lambda: all(worker.marker_lines("also_untyped", i) for i in ids), timeout=30)
    wait_for(lambda: topology.queue_depth(paused) == 0, timeout=10)
    assert all(len(worker.marker_lines("also_untyped", i)) == 1 for i in ids)  # none twice
    assert all(len(worker.marker_lines("typed_or_not", i)) == 1 for i in ids)
    assert topology.queue_depth(paused + ".dlq") == 0
    assert "Received and deleted unknown message" not in worker.log()
