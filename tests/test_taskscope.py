"""Task scope: a plain task's events leave with its run (in process, through Celery's tracer)."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from celery_domain_events import DomainEvents, buffered, discard, emit, scope
from celery_domain_events.testing import EventCapture, capture_events


def make_app(**overrides: Any) -> tuple[Celery, Any]:
    app = Celery("ts", broker="memory://", set_as_current=False)
    DomainEvents(app, service="ts", handlers=[], **overrides)

    @app.task(name="ts.work", shared=False)
    def work(n: int, fail: bool = False, rescope: bool = False) -> None:
        emit("ts.task.done", {"n": n})
        if rescope:  # a rollback inside the task, then the work again
            discard()
            emit("ts.task.done", {"n": n + 100})
        if fail:
            raise ValueError("rolled back")

    return app, work


def names(events: EventCapture) -> list[Any]:
    return [e.event_data()["n"] for e in events.published]


@pytest.fixture(autouse=True)
def _no_buffer_left() -> Any:
    yield
    discard()


def test_run_buffer_is_sent_on_success_and_dropped_on_failure() -> None:
    app, work = make_app()
    with capture_events(app) as events:
        assert work.apply(args=(1,)).successful()
        assert work.apply(args=(2, True)).failed()
        assert work.apply(args=(3, False, True)).successful()
    assert names(events) == [1, 103]
    assert buffered() == []


def test_run_ignores_a_buffer_open_around_it() -> None:
    app, work = make_app()
    with capture_events(app) as events, scope(app, transmit_on_exit=False):
        emit("ts.outer", {"n": 0})
        work.apply(args=(1, True))  # failed: its event must not reach the outer buffer
        work.apply(args=(2,))  # succeeded: sent when the run ended, not with the outer scope
        assert names(events) == [2]
        assert [e.event_name for e in buffered()] == ["ts.outer"]


def test_a_stray_buffer_in_the_context_does_not_swallow_task_events() -> None:
    app, work = make_app()
    emit("ts.stray", {"n": -1})  # no scope: a context buffer nobody will transmit
    with capture_events(app) as events:
        work.apply(args=(1,))
    assert names(events) == [1]
    assert [e.event_name for e in buffered()] == ["ts.stray"]


def test_a_scope_inside_the_task_is_its_own_unit_of_work() -> None:
    app = Celery("ts", broker="memory://", set_as_current=False)
    DomainEvents(app, service="ts", handlers=[])

    @app.task(name="ts.scoped", shared=False)
    def scoped() -> None:
        with scope(app):
            emit("ts.inner", {"n": 1})
        emit("ts.after", {"n": 2})
        raise ValueError("the run fails after its scope was sent")

    with capture_events(app) as events:
        assert scoped.apply().failed()
    assert names(events) == [1]


def test_task_scope_off_and_direct_calls_use_the_context_buffer() -> None:
    app, work = make_app(task_scope=False)
    with capture_events(app) as events:
        work.apply(args=(1,))
        assert events.published == []
        assert [e.event_data()["n"] for e in buffered()] == [1]
    app, work = make_app()
    discard()
    work(5)  # a plain function call: no run, no task_postrun
    assert [e.event_data()["n"] for e in buffered()] == [5]
