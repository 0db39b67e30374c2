"""Emitting from Celery tasks and from handlers: sent on success, discarded on failure."""

from __future__ import annotations

import pytest
from celery._state import get_current_app

from celery_domain_events import NoActiveScope, buffered, emit, scope, transmit

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


def test_require_scope_refuses_stray_emits(topology: Topology) -> None:
    app = topology.app(domain_events_require_scope=True)
    previous = get_current_app()
    app.set_current()  # emit() knows no app: it asks the current one
    try:
        with pytest.raises(NoActiveScope, match="outside a scope"):
            emit("test.scope.stray", {})
        with scope(app, transmit_on_exit=False):
            emit("test.scope.inside", {})
            assert [e.event_name for e in buffered()] == ["test.scope.inside"]
        assert buffered() == []
    finally:
        previous.set_current()
