"""``async def`` handlers: the per-process event loop and the in-process harness (no broker),
then real workers.

The real-worker tests run tests/worker_app.py's async handlers (``aio_*``), which leave one line
per run in a marker file: ``<time> <fields...>``, where a run records ``_where()``, that is
``<pid> <id of the running loop> <native id of the loop's thread> <thread name>``.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import select
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from celery_domain_events import (
    DomainEvent,
    DomainEvents,
    GenericEvent,
    RetryPolicy,
    discard,
    domain_event_handler,
    emit,
    transmit,
)
from celery_domain_events.consuming import aio_loop
from celery_domain_events.testing import capture_events
from celery_domain_events.tracing import current_traceparent, trace_id, use_traceparent
from celery_domain_events.wire.dead_letter import HEADER_PREFIX

from .conftest import RECORDER, Recorder, Topology, WorkerProcess, drain, wait_for

Make = Callable[..., WorkerProcess]
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


# --- The loop (no broker) -------------------------------------------------------------------


def test_run_returns_the_result_and_raises_the_exception_of_the_coroutine() -> None:
    async def double(n: int) -> int:
        await asyncio.sleep(0)
        return 2 * n

    async def fail() -> None:
        await asyncio.sleep(0)
        raise KeyError("inside")

    assert aio_loop.run(double(21)) == 42
    with pytest.raises(KeyError, match="inside") as raised:
        aio_loop.run(fail())
    assert any(entry.name == "fail" for entry in raised.traceback)  # the coroutine's frame


def test_runs_from_several_threads_share_the_loop_and_overlap_on_it() -> None:
    async def nap() -> tuple[int, str]:
        await asyncio.sleep(0.2)
        return id(asyncio.get_running_loop()), threading.current_thread().name

    results: list[tuple[int, str]] = []
    threads = [
        threading.Thread(target=lambda: results.append(aio_loop.run(nap()))) for _ in range(8)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    elapsed = time.monotonic() - started
    assert len(results) == 8
    assert set(results) == {(id(aio_loop.get_loop()), aio_loop.THREAD_NAME)}
    assert elapsed < 1.0, elapsed  # 8 x 0.2 s one after the other would be 1.6 s
    assert aio_loop.run(nap())[0] == id(aio_loop.get_loop())  # the same loop, run after run


_var: contextvars.ContextVar[str] = contextvars.ContextVar("test_aio_var", default="unset")


def test_the_coroutine_runs_in_a_copy_of_the_callers_context() -> None:
    async def swap() -> str:
        seen = _var.get()
        _var.set("set by the coroutine")
        return seen

    token = _var.set("set by the caller")
    try:
        assert aio_loop.run(swap()) == "set by the caller"
        assert _var.get() == "set by the caller"  # the coroutine changed its copy only
    finally:
        _var.reset(token)
    seen_in_thread: list[str] = []

    def other_thread() -> None:
        _var.set("another thread's")
        seen_in_thread.append(aio_loop.run(swap()))

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join(10)
    assert seen_in_thread == ["another thread's"]


@pytest.fixture
def soft_time_limit_in(request: pytest.FixtureRequest) -> Iterator[Callable[[float], None]]:
    """Raise SoftTimeLimitExceeded in this (main) thread after a delay, as billiard does.

    A signal sent to the process (SIGUSR1), whose handler raises, from another thread.
    """

    def handler(signum: int, frame: Any) -> None:
        raise SoftTimeLimitExceeded("soft time limit (test)")

    previous = signal.signal(signal.SIGUSR1, handler)
    timers: list[threading.Timer] = []

    def arm(seconds: float) -> None:
        timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGUSR1))
        timers.append(timer)
        timer.start()

    yield arm
    for timer in timers:
        timer.cancel()
        timer.join()
    signal.signal(signal.SIGUSR1, previous)


def test_an_interrupted_wait_cancels_the_coroutine(
    soft_time_limit_in: Callable[[float], None],
) -> None:
    events: list[str] = []

    async def slow() -> None:
        events.append("started")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(0.05)  # cleanup that awaits still runs
            events.append("cancelled")
            raise
        events.append("finished")

    soft_time_limit_in(0.3)
    started = time.monotonic()
    with pytest.raises(SoftTimeLimitExceeded):
        aio_loop.run(slow())
    assert 0.25 < time.monotonic() - started < 3
    assert events == ["started", "cancelled"]  # finished its cancellation before run() raised
    assert aio_loop.run(asyncio.sleep(0, "still usable")) == "still usable"


def test_a_coroutine_ignoring_its_cancellation_is_left_after_cancel_timeout(
    soft_time_limit_in: Callable[[float], None], caplog: pytest.LogCaptureFixture
) -> None:
    finished = threading.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(3)  # swallows the cancellation and goes on
        finished.set()

    soft_time_limit_in(0.1)
    started = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger=aio_loop.__name__),
        pytest.raises(SoftTimeLimitExceeded),
    ):
        aio_loop.run(stubborn(), cancel_timeout=0.1)
    assert time.monotonic() - started < 2  # did not wait for the 3 s
    assert not finished.is_set()
    assert "did not finish within 0.1 s of its cancellation" in caplog.text
    assert finished.wait(10)  # it went on running on the loop


@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt])
def test_a_base_exception_in_a_coroutine_does_not_stop_the_loop(
    exc_type: type[BaseException],
) -> None:
    async def escape() -> None:
        await asyncio.sleep(0)
        raise exc_type("out")

    loop = aio_loop.get_loop()
    with pytest.raises(exc_type):
        aio_loop.run(escape())
    assert aio_loop.run(asyncio.sleep(0, "alive")) == "alive"
    assert aio_loop.get_loop() is loop


def test_run_on_the_loops_own_thread_refuses_instead_of_deadlocking() -> None:
    async def nested() -> str:
        inner = asyncio.sleep(0)
        try:
            aio_loop.run(inner)
        except RuntimeError as exc:
            return str(exc)
        return "no error"

    assert "would wait for itself" in aio_loop.run(nested())


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="no per-thread signal masks")
def test_the_loop_thread_leaves_signals_to_the_pool_thread() -> None:
    async def mask() -> set[int]:
        return set(signal.pthread_sigmask(signal.SIG_BLOCK, []))

    blocked = aio_loop.run(mask())
    assert {signal.SIGUSR1, signal.SIGALRM, signal.SIGTERM, signal.SIGINT} <= blocked
    assert signal.SIGSEGV not in blocked
    assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # not here


def _fork(child: Callable[[], str]) -> str:
    """Run ``child`` in a forked process; return what it returned (or its error)."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns about forking a process that has threads (our loop's).
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 0
        try:
            os.close(read_end)
            os.write(write_end, child().encode())
        except BaseException as exc:
            os.write(write_end, f"error: {exc!r}".encode())
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 15)
        output = os.read(read_end, 65536).decode() if ready else "timeout"
    finally:
        os.close(read_end)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return output


def test_a_forked_child_never_uses_its_parents_loop() -> None:
    async def where() -> str:
        return f"{os.getpid()} {threading.get_native_id()}"

    parent_loop = aio_loop.get_loop()
    parent_where = aio_loop.run(where())

    def child() -> str:
        loop = aio_loop.get_loop()
        assert loop is not parent_loop
        assert not loop.is_closed()
        return aio_loop.run(where())

    # A lock held by another thread at the fork (here: this one) must not block the child.
    with aio_loop._lock:
        child_where = _fork(child)
    child_pid, child_thread = child_where.split()
    parent_pid, parent_thread = parent_where.split()
    assert child_pid != parent_pid, child_where
    assert child_thread != parent_thread
    assert aio_loop.get_loop() is parent_loop  # the parent's is untouched
    assert aio_loop.run(where()) == parent_where


def test_a_fork_the_at_fork_hook_misses_is_caught_by_the_pid_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parent = aio_loop._loop_thread()
    # As after a fork that does not run Python's at-fork hooks: the state is the parent's.
    monkeypatch.setattr(parent, "pid", os.getpid() + 1)
    try:
        assert aio_loop.get_loop() is not parent.loop
        assert aio_loop.run(asyncio.sleep(0, "ok")) == "ok"
    finally:
        parent.loop.call_soon_threadsafe(parent.loop.stop)  # this process has two: end one
        parent.thread.join(5)


# --- Async handlers in process (the capture harness, no broker) ------------------------------


class AhPing(DomainEvent):
    event_name: ClassVar[str] = "ah.ping"
    n: int


@domain_event_handler("ah.ping", name="ah_ping", retry=RetryPolicy(max_retries=1))
async def ah_ping(event: AhPing) -> None:
    attempt = len([e for e in RECORDER.get("ah_ping") if e[0] == event.n]) + 1
    RECORDER.record("ah_ping", (event.n, attempt, type(event), current_traceparent()))
    emit("ah.pong", {"n": event.n, "attempt": attempt})
    await asyncio.sleep(0.01)
    if event.n == 1 and attempt == 1:
        raise ConnectionError("the first attempt's pong must be discarded")
    if event.n == 2:
        discard()  # as in a plain function: nothing emitted so far goes out
        emit("ah.pong", {"n": 2, "attempt": attempt, "after_discard": True})


@domain_event_handler("ah.pong", name="ah_pong", retry=None)
async def ah_pong(event: GenericEvent) -> None:
    RECORDER.record("ah_pong", (event.event_data(), current_traceparent()))


def test_async_handlers_in_process_emit_only_what_a_plain_function_would(
    recorder: Recorder,
) -> None:
    app = Celery("ah", broker="memory://", set_as_current=False)
    DomainEvents(app, service="ah", handlers=[ah_ping, ah_pong])
    with capture_events(app) as events, use_traceparent(TRACEPARENT):
        emit(AhPing(n=1))
        emit(AhPing(n=2))
        transmit(app)
        events.join()
    assert [(n, attempt, kind) for n, attempt, kind, _ in recorder.get("ah_ping")] == [
        (1, 1, AhPing),
        (1, 2, AhPing),
        (2, 1, AhPing),
    ]
    pongs = [data for data, _ in recorder.get("ah_pong")]
    assert pongs == [{"n": 1, "attempt": 2}, {"n": 2, "attempt": 1, "after_discard": True}]
    traces = [tp for *_, tp in recorder.get("ah_ping")] + [tp for _, tp in recorder.get("ah_pong")]
    assert {trace_id(tp) for tp in traces} == {TRACE_ID}
    assert events.dead_letters == []


# --- Real broker, real `celery worker` --------------------------------------------------------


def records(worker: WorkerProcess, name: str) -> list[list[str]]:
    """Every line handler ``name`` recorded, for any event, split into fields."""
    lines = [
        line.split()
        for path in sorted(worker.markers.glob(f"{name}-*"))
        for line in path.read_text().splitlines()
    ]
    return sorted(lines, key=lambda fields: float(fields[0]))


POOLS = {
    "solo": ("-P", "solo"),
    "prefork": ("-P", "prefork", "-c", "2"),
    "threads": ("-P", "threads", "-c", "4"),
}


@pytest.mark.rabbitmq
@pytest.mark.worker
@pytest.mark.parametrize(
    "pool",
    [pytest.param("solo", marks=pytest.mark.matrix), "prefork", "threads"],
)
def test_an_async_handler_runs_on_one_loop_per_worker_process(
    topology: Topology, worker_process: Make, pool: str
) -> None:
    env = {"TEST_AIO_PRESTART": "1"} if pool == "prefork" else {}
    worker = worker_process(["aio_ping"], **env).start(*POOLS[pool])
    publisher = topology.app("pub")
    sent = [emit("probe.aio", {"n": n}) for n in range(6)]
    transmit(publisher)
    wait_for(lambda: len(records(worker, "aio_ping")) == 6, timeout=30)
    wait_for(lambda: topology.queue_depth(worker.queue("aio_ping")) == 0)
    runs = records(worker, "aio_ping")
    assert sorted(int(n) for _, kind, n, *_ in runs if kind == "AioPing") == list(range(6))
    assert {event.event_id for event in sent} == {
        path.name.removeprefix("aio_ping-") for path in worker.markers.glob("aio_ping-*")
    }
    where = {tuple(fields[3:]) for fields in runs}  # (pid, loop id, loop thread id, name)
    assert {name for *_, name in where} == {aio_loop.THREAD_NAME}
    pids = {pid for pid, *_ in where}
    assert len(where) == len(pids), where  # one loop (and one thread) per process, reused
    assert worker.proc is not None
    if pool == "prefork":
        [parent] = records(worker, "aio_parent")
        parent_pid, parent_loop, parent_thread = parent[1:4]
        assert parent_pid == str(worker.proc.pid)
        assert parent_pid not in pids
        # The parent's loop object is still in each child's memory: a new one has another id.
        assert all(loop != parent_loop and thread != parent_thread for _, loop, thread, _ in where)
        assert len({thread for _, _, thread, _ in where}) == len(pids)
    else:
        assert pids == {str(worker.proc.pid)}
    assert "Traceback" not in worker.log(), worker.log()


@pytest.mark.rabbitmq
@pytest.mark.worker
def test_async_failures_are_retried_then_dead_lettered_for_that_handler_only(
    topology: Topology, worker_process: Make
) -> None:
    handlers = ["aio_flaky", "aio_fails", "aio_fail_sibling"]
    worker = worker_process(handlers).start()
    publisher = topology.app("pub")
    flaky = emit("probe.aio.flaky", {})
    failing = emit("probe.aio.fail", {})
    transmit(publisher)
    dlq = worker.queue("aio_fails") + ".dlq"
    wait_for(lambda: topology.queue_depth(dlq) == 1, timeout=30)
    wait_for(lambda: len(records(worker, "aio_flaky")) == 2, timeout=30)
    wait_for(lambda: topology.queue_depth(worker.queue("aio_flaky")) == 0)
    # Fails once, is retried after its countdown (1 s), succeeds: no dead letter.
    (first_at, first), (second_at, second) = (
        (float(t), outcome) for t, outcome in records(worker, "aio_flaky")
    )
    assert (first, second) == ("fail", "ok")
    assert second_at - first_at >= 0.9
    assert topology.queue_depth(worker.queue("aio_flaky") + ".dlq") == 0
    # Always fails: 1 + max_retries attempts, then its own DLQ; the sibling ran once.
    assert len(records(worker, "aio_fails")) == 2
    assert len(records(worker, "aio_fail_sibling")) == 1
    [letter] = drain(topology.broker_url, dlq)
    headers = letter.headers
    assert headers[HEADER_PREFIX + "reason"] == "retries-exhausted"
    assert headers[HEADER_PREFIX + "attempts"] == 2
    assert headers[HEADER_PREFIX + "exception"] == "builtins.RuntimeError"
    assert headers[HEADER_PREFIX + "message"] == f"aio_fails failed {failing.event_id}"
    assert "in aio_fails" in headers[HEADER_PREFIX + "traceback"]  # the coroutine's frame
    assert headers[HEADER_PREFIX + "handler"] == "aio_fails"
    assert letter.properties["message_id"] == str(failing.event_id)
    assert len(worker.marker_lines("aio_flaky", flaky.event_id)) == 2


@pytest.mark.rabbitmq
@pytest.mark.worker
def test_events_an_async_handler_emits_go_out_only_when_it_succeeds_in_its_trace(
    topology: Topology, worker_process: Make
) -> None:
    worker = worker_process(["aio_emits", "aio_receiver"]).start("-P", "solo")
    publisher = topology.app("pub")
    with use_traceparent(TRACEPARENT):
        cause = emit("probe.aio.emit", {})
        transmit(publisher)
    wait_for(lambda: len(records(worker, "aio_receiver")) >= 1, timeout=30)
    wait_for(lambda: topology.queue_depth(worker.queue("aio_receiver")) == 0)
    wait_for(lambda: topology.queue_depth(worker.queue("aio_emits")) == 0)
    emitter = records(worker, "aio_emits")
    receiver = records(worker, "aio_receiver")
    assert [attempt for _, attempt, _ in emitter] == ["1", "2"]
    # The first attempt failed after emitting: its event was discarded with it.
    assert [attempt for _, attempt, _ in receiver] == ["2"]
    assert worker.marker_lines("aio_receiver", cause.event_id)
    traces = [tp for *_, tp in emitter + receiver]
    assert {trace_id(tp) for tp in traces} == {TRACE_ID}
    assert len(set(traces)) == 3  # one span per handler run
    assert topology.queue_depth(worker.queue("aio_emits") + ".dlq") == 0


@pytest.mark.rabbitmq
@pytest.mark.worker
def test_the_soft_time_limit_cancels_an_async_handler_as_it_stops_a_plain_one(
    topology: Topology, worker_process: Make
) -> None:
    # Time limits need the prefork pool (solo and threads have none).
    worker = worker_process(["aio_soft", "sync_soft"]).start("-P", "prefork", "-c", "2")
    publisher = topology.app("pub")
    event = emit("probe.soft", {})
    transmit(publisher)
    dlqs = {name: worker.queue(name) + ".dlq" for name in ("aio_soft", "sync_soft")}
    wait_for(lambda: all(topology.queue_depth(q) == 1 for q in dlqs.values()), timeout=40)
    aio_runs = records(worker, "aio_soft")
    assert [fields[1] for fields in aio_runs] == ["started", "cancelled"] * 2
    for (started_at, *_), (cancelled_at, *_) in zip(aio_runs[::2], aio_runs[1::2], strict=True):
        # Cancelled at the soft time limit (1 s; billiard checks it about once a second).
        assert 0.9 <= float(cancelled_at) - float(started_at) < 4
    sync_runs = records(worker, "sync_soft")
    assert [fields[1] for fields in sync_runs] == ["started", "soft-time-limit"] * 2
    letters = {name: drain(topology.broker_url, q) for name, q in dlqs.items()}
    summary = {
        name: {
            key: letter.headers[HEADER_PREFIX + key] for key in ("reason", "attempts", "exception")
        }
        for name, [letter] in letters.items()
    }
    assert (
        summary["aio_soft"]
        == summary["sync_soft"]
        == {
            "reason": "retries-exhausted",
            "attempts": 2,
            "exception": "billiard.exceptions.SoftTimeLimitExceeded",
        }
    )
    assert worker.marker_lines("aio_soft", event.event_id)
    assert "Hard time limit" not in worker.log()
