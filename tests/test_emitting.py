"""Emitting from Celery tasks and from handlers: sent on success, discarded on failure."""

from __future__ import annotations

import pytest

from celery_domain_events import emit, transmit

from . import handlers
from .conftest import Recorder, Topology, running_worker, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.worker]


def test_task_events_are_sent_on_success_and_discarded_on_failure(
    topology: Topology, recorder: Recorder
) -> None:
    app = topology.app(handlers=[handlers.chain_next])

    @app.task(name=f"t{topology.uid}.work")
    def work(n: int, fail: bool) -> None:
        emit("test.task.done", {"n": n})
        if fail:
            raise ValueError("rolled back")

    with running_worker(app):
        work.delay(1, True)
        work.delay(2, False)
        work.delay(3, True)
        wait_for(lambda: len(recorder.get("chain_next")) >= 1)
        wait_for(lambda: topology.queue_depth(f"{topology.service()}.chain_next") == 0)
    assert [e.event_data()["n"] for e in recorder.get("chain_next")] == [2]


def test_handler_emits_only_when_its_attempt_succeeds(
    topology: Topology, recorder: Recorder
) -> None:
    app = topology.app(handlers=[handlers.chain_start, handlers.chain_next])
    with running_worker(app):
        start = emit("test.chain.start", {"fail_first": True})
        transmit(app)
        wait_for(lambda: len(recorder.get("chain_next")) == 1)
        wait_for(lambda: topology.queue_depth(f"{topology.service()}.chain_next") == 0)
    assert len(recorder.get("chain_start")) == 2  # failed once, retried once
    [follow_up] = recorder.get("chain_next")  # the failed attempt's emit was discarded
    assert follow_up.event_data() == {"after": str(start.event_id)}
