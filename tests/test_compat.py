"""Canaries for the Celery, kombu and py-amqp details behind celery_domain_events._compat.

If an upgrade changes one of them, these fail before a worker does: the hardening would then
silently stop applying, or py-amqp may have fixed the problem itself (then drop the patch). The
Django canary is in tests/test_django.py, where Django is configured.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import amqp
import pytest
from amqp import serialization
from amqp.basic_message import Message as AmqpMessage
from celery import Celery, current_app
from celery import _state as celery_state
from celery.app import trace
from celery.apps import worker as celery_worker_app
from celery.concurrency import prefork, solo, thread
from celery.local import Proxy
from celery.worker import control, loops
from celery.worker import state as worker_state
from celery.worker.consumer.consumer import Consumer
from celery.worker.request import Request
from kombu import Connection, Exchange, Queue
from kombu.asynchronous.hub import Hub
from kombu.exceptions import MessageStateError
from kombu.message import Message

from celery_domain_events import _compat

from .hostile import FarFuture, deep_recursion, nested


def encoded_properties(**properties: Any) -> bytes:
    with deep_recursion():
        raw = bytes(AmqpMessage(**properties)._serialize_properties())
    return raw.replace(b"\x01\x02\x03", b"\xff\xfe\xfd")


POISON = {
    "deep-headers": {"application_headers": {"nest": nested(5_000)}},
    "timestamp-overflow": {"application_headers": {"t": FarFuture(2000, 1, 1)}},
    "nested-timestamp": {"application_headers": {"x": {"t": FarFuture(2000, 1, 1)}}},
    # b"\x01\x02\x03" is replaced by bytes that are not UTF-8 once encoded (see below).
    "not-utf8-property": {"correlation_id": "\x01\x02\x03", "content_type": "application/json"},
}


def original_decoder() -> Any:
    assert _compat._original_decode_properties is not None
    return _compat._original_decode_properties


@pytest.fixture(autouse=True)
def hardened() -> None:
    _compat.harden_amqp_decoder()


def test_py_amqp_still_looks_up_what_we_replace() -> None:
    assert serialization._read_item is _compat._read_item_bounded  # type: ignore[attr-defined]
    basic = serialization.Basic.CLASS_ID
    assert serialization.PROPERTY_CLASSES[basic] is _compat._decode_properties_safely
    _compat.harden_amqp_decoder()  # idempotent
    assert _compat._original_read_item is not _compat._read_item_bounded


@pytest.mark.parametrize("case", list(POISON))
def test_py_amqp_alone_fails_on_these_properties(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reason for the patch: without it each raises inside the connection's frame handler.
    raw = encoded_properties(**POISON[case])
    monkeypatch.setattr(serialization, "_read_item", _compat._original_read_item)
    with pytest.raises((RecursionError, OverflowError, ValueError, OSError, UnicodeDecodeError)):
        original_decoder()(raw, 0)


@pytest.mark.parametrize("case", list(POISON))
def test_hardened_decoder_delivers_them_marked(case: str) -> None:
    raw = encoded_properties(**POISON[case])
    properties, _ = serialization.PROPERTY_CLASSES[serialization.Basic.CLASS_ID](raw, 0)
    headers = properties["application_headers"]
    if case == "deep-headers":
        # Decoded to the depth limit; deeper levels stay raw bytes (refused later as too deep).
        value, levels = headers["nest"], 0
        while isinstance(value, dict):
            value, levels = value["a"], levels + 1
        assert isinstance(value, bytes)
        assert levels == _compat.MAX_DECODED_TABLE_DEPTH
    else:
        assert _compat.UNDECODABLE_HEADER in headers
    if case == "not-utf8-property":
        assert properties["correlation_id"] == "\ufffd\ufffd\ufffd"
        assert properties["content_type"] == "application/json"


def test_ordinary_properties_decode_unchanged() -> None:
    props = {
        "content_type": "application/cloudevents+json",
        "content_encoding": "utf-8",
        "application_headers": {"a": 1, "b": "x", "c": {"d": [1, 2]}, "t": datetime(2026, 1, 1)},
        "delivery_mode": 2,
        "priority": 3,
        "message_id": "m",
        "timestamp": int(datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()),
        "type": "user.created",
        "app_id": "shop",
    }
    raw = encoded_properties(**props)
    hardened = serialization.PROPERTY_CLASSES[serialization.Basic.CLASS_ID](raw, 0)
    assert hardened == original_decoder()(raw, 0)
    assert hardened[0]["application_headers"]["c"] == {"d": [1, 2]}


def test_encoded_table_size_is_py_amqps_own() -> None:
    table = {"a": "x" * 100, "b": {"c": 1}}
    assert _compat.encoded_table_size(table) == len(serialization.dumps("F", (table,)))
    assert _compat.encoded_table_size(table) > 100


def test_both_event_loops_start_the_task_consumer_once_per_blueprint_start() -> None:
    # start_with_task_consumer relies on asynloop and synloop calling task_consumer.consume().
    assert "self.task_consumer" in inspect.getsource(Consumer.loop_args)
    for loop in (loops.asynloop, loops.synloop):
        assert list(inspect.signature(loop).parameters)[2] == "consumer", loop.__name__
        lines = [line.strip() for line in inspect.getsource(loop).splitlines()]
        assert lines.count("consumer.consume()") == 1, loop.__name__


def test_start_with_task_consumer_runs_after_consume_and_is_idempotent() -> None:
    calls: list[str] = []

    class TaskConsumer:
        def consume(self) -> None:
            calls.append("celery")

    consumer = TaskConsumer()
    _compat.start_with_task_consumer(consumer, lambda: calls.append("ours"))
    _compat.start_with_task_consumer(consumer, lambda: calls.append("ours"))
    consumer.consume()
    assert calls == ["celery", "ours"]


def test_a_body_without_content_type_reaches_the_task_undecoded() -> None:
    # decoded_task_message relies on the tracer skipping loads() when content_type is None.
    app = Celery("canary", set_as_current=False)

    @app.task(name="canary.add")
    def add(x: int) -> int:
        return x + 1

    app.finalize()

    def loads(*_: Any, **__: Any) -> Any:
        raise AssertionError("the tracer decoded a body that was already Python")

    request = {"id": "t1", "task": "canary.add", "delivery_info": {}}
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    failed, result, _ = trace.trace_task_ret(
        "canary.add", "t1", dict(request), ([1], {}, embed), None, None, loads=loads, app=app
    )
    assert (failed, result) == (0, "2")
    # The worker's fast path has the same branch.
    assert "if content_type:" in inspect.getsource(trace.fast_trace_task)
    assert "args, kwargs, embed = body" in inspect.getsource(trace.fast_trace_task)


def test_decoded_task_message_keeps_the_delivery_and_returns_the_body_itself() -> None:
    class Delivery:
        delivery_tag = 7
        delivery_info: ClassVar[dict[str, str]] = {"routing_key": "q"}
        channel = None

    body: Any = ([], {"raw_event": "{}"}, {})
    message = _compat.decoded_task_message(Delivery(), body, {"id": "x"}, {"reply_to": ""})  # type: ignore[arg-type]
    assert message.decode() is body
    assert message.delivery_tag == 7
    assert message.content_type is None
    assert message.headers == {"id": "x"}


def test_a_batch_task_message_settles_each_delivery_once_and_then_counts_as_settled() -> None:
    # _BatchTaskMessage sets kombu's Message._state itself (it settles through its deliveries,
    # not its own channel call): kombu must still read acknowledged from that attribute.
    settled: list[tuple[int, str]] = []

    class Delivery(Message):
        def __init__(self, tag: int) -> None:
            super().__init__(body=b"{}", delivery_tag=tag, channel=None)

        def ack(self, multiple: bool = False) -> None:
            settled.append((self.delivery_tag, "ack"))
            self._state = "ACK"

        def reject(self, requeue: bool = False) -> None:
            settled.append((self.delivery_tag, f"reject requeue={requeue}"))
            self._state = "REJECTED"

    first, second, done = Delivery(1), Delivery(2), Delivery(3)
    done._state = "ACK"  # settled already (a dead letter, say): left alone
    body: Any = ([], {"batch": []}, {})
    message = _compat.batch_task_message([first, second, done], body, {"id": "b"}, {})
    assert message.decode() is body
    assert message.content_type is None
    message.ack()
    assert settled == [(1, "ack"), (2, "ack")]
    assert message.acknowledged
    with pytest.raises(MessageStateError):
        message.reject(requeue=True)
    again = _compat.batch_task_message([Delivery(4)], body, {"id": "c"}, {})
    again.reject(requeue=True)
    assert settled[-1] == (4, "reject requeue=True")
    assert again.acknowledged


def test_shared_task_registration_internals_exist() -> None:
    app = Celery("canary", set_as_current=False)
    app.finalize()
    assert app in celery_state._get_active_apps()  # type: ignore[attr-defined]
    assert hasattr(app, "_finalize_mutex")
    seen: list[Celery] = []
    _compat.on_every_app(seen.append)
    assert app in seen  # finalized already: bound now


def test_task_from_fun_wraps_run_in_autoretry_first() -> None:
    # The dead-letter wrapper must be installed after Celery's autoretry (see guard_run).
    app = Celery("canary", set_as_current=False)

    def run(x: int) -> int:
        return x

    task = _compat.task_from_fun(app, run, name="canary.retrying", autoretry_for=(KeyError,))
    assert task.run is not run
    assert getattr(task, "_orig_run", None) is run


def test_current_traced_task_sees_a_run_and_nothing_outside() -> None:
    app = Celery("canary", set_as_current=False)
    seen: list[Any] = []

    @app.task(name="canary.who")
    def who() -> None:
        seen.append(_compat.current_traced_task())

    assert _compat.current_traced_task() is None
    who.apply()
    assert seen == [who]
    assert _compat._TRACER in __import__("sys").modules


def test_the_current_app_slot_is_restored() -> None:
    before = celery_state.get_current_app()
    assert hasattr(celery_state, "_tls")
    app = Celery("canary", set_as_current=False)
    with _compat.restored_current_app():
        app.set_current()
        app.set_default()
        assert celery_state.get_current_app() is app
    assert celery_state.get_current_app() is before


def test_py_amqp_publishes_without_waiting_for_the_confirm() -> None:
    assert callable(amqp.Channel._basic_publish)
    assert amqp.Channel.basic_publish_confirm is not amqp.Channel._basic_publish

    class Channel:
        def basic_publish(self) -> None: ...

        def _basic_publish(self) -> None: ...

    channel = Channel()
    assert _compat.unconfirmed_basic_publish(channel) == channel._basic_publish


def test_kombu_keeps_the_transport_connection_in_an_attribute() -> None:
    assert "_connection" in vars(Connection)  # None until connected, then py-amqp's
    conn = Connection("amqp://guest:guest@127.0.0.1:1//")
    assert _compat.transport_connection(conn) is None  # not connected, and not connecting


@pytest.mark.parametrize("selected", [None, "celery"], ids=["all-queues", "worker-Q"])
def test_an_added_handler_queue_is_no_celery_task_queue(selected: str | None) -> None:
    # Celery 5.5 and 5.6 consume every queue in app.amqp.queues unless -Q selects some.
    queues = Celery(set_as_current=False).amqp.queues
    queues.select(selected)
    handler_queue = Queue("svc.handler", Exchange("events.retry", "topic"), "svc.handler")
    _compat.add_unconsumed_queue(queues, handler_queue)
    assert queues["svc.handler"] is handler_queue  # seen by quorum detection, DelayedDelivery
    assert "svc.handler" not in queues.consume_from  # never read by Celery's task consumer
    assert list(queues.consume_from) == ["celery"]


def test_sqlalchemy_awaits_a_coroutine_from_inside_an_async_session_call_only() -> None:
    import asyncio

    from sqlalchemy.exc import MissingGreenlet
    from sqlalchemy.util import greenlet_spawn

    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    def sync_hook() -> int:  # what an AsyncSession's event hook is
        return _compat.sqlalchemy_await(answer())

    assert asyncio.run(greenlet_spawn(sync_hook)) == 42
    coroutine = answer()
    with pytest.raises(MissingGreenlet):
        _compat.sqlalchemy_await(coroutine)
    coroutine.close()


def test_celery_remote_control_goes_through_the_consumer_methods_we_route() -> None:
    # route_queue_control relies on cancel_consumer / add_consumer calling these two methods.
    assert "state.consumer.cancel_task_queue" in inspect.getsource(control.cancel_consumer)
    assert "state.consumer.add_task_queue" in inspect.getsource(control.add_consumer)
    calls: list[tuple[str, str]] = []

    class WorkerConsumer:
        def cancel_task_queue(self, queue: str) -> None:
            calls.append(("celery-cancel", queue))

        def add_task_queue(self, queue: str, *args: Any, **kwargs: Any) -> None:
            calls.append(("celery-add", queue))

    consumer = WorkerConsumer()
    for _ in range(2):  # idempotent, as on a consumer restart
        _compat.route_queue_control(
            consumer,
            lambda queue: queue.startswith("svc."),
            lambda queue: calls.append(("pause", queue)),
            lambda queue: calls.append(("resume", queue)),
        )
    consumer.cancel_task_queue("svc.h")
    consumer.add_task_queue("svc.h")
    consumer.cancel_task_queue("celery")
    consumer.add_task_queue("celery", None, "direct", None)
    assert calls == [
        ("pause", "svc.h"),
        ("resume", "svc.h"),
        ("celery-cancel", "celery"),
        ("celery-add", "celery"),
    ]


def test_the_app_behind_celerys_current_app_proxy() -> None:
    app = Celery("canary", set_as_current=False)
    assert "_get_current_object" in vars(Proxy)
    assert _compat.app_behind_proxy(app) is app
    with _compat.restored_current_app():
        app.set_current()
        assert isinstance(current_app, Proxy)
        assert current_app is not app
        assert _compat.app_behind_proxy(current_app) is app


def test_a_cold_shutdown_shows_in_celerys_worker_state(monkeypatch: pytest.MonkeyPatch) -> None:
    # HandlerRequest relies on a cold shutdown (Ctrl+C twice, SIGQUIT) setting this flag.
    assert "'Cold': 'should_terminate'" in inspect.getsource(celery_worker_app)
    assert "should_terminate" in inspect.getsource(worker_state.maybe_shutdown)
    assert worker_state.should_terminate is None
    assert not _compat.worker_terminating()
    monkeypatch.setattr(worker_state, "should_terminate", 0)  # what start_worker sets at exit
    assert not _compat.worker_terminating()
    monkeypatch.setattr(worker_state, "should_terminate", True)
    assert _compat.worker_terminating()


def test_kombus_loop_polls_after_the_tick_hooks_and_keeps_ready_callbacks_in_a_set() -> None:
    # flush_ready_before_poll relies on both: on_tick hooks run right before poll(), and ready
    # callbacks wait in hub._ready until _pop_ready() takes them.
    source = inspect.getsource(Hub.create_loop)
    assert source.index("on_tick") < source.index("poll(poll_timeout)")
    hub = Hub()
    try:
        ran: list[int] = []
        hook = _compat.flush_ready_before_poll(hub)
        hub.call_soon(ran.append, 1)
        assert hub._ready
        hook()
        assert ran == [1]
        assert not hub._ready
        assert hook in hub.on_tick
    finally:
        hub.close()


def test_prometheus_client_picks_its_value_class_from_a_module_attribute(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import prometheus_client
    from prometheus_client import values

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MutexValue)
    assert values.MutexValue._multiprocess is False
    _compat.prometheus_multiprocess_values()
    assert values.ValueClass._multiprocess is True
    registry = prometheus_client.CollectorRegistry()
    prometheus_client.Counter("compat_canary", "x", registry=registry).inc()
    assert [p.name for p in tmp_path.iterdir()] == [f"counter_{os.getpid()}.db"]
    values.ValueClass.close_all_files()


def test_a_histogram_takes_many_observations_at_once_as_observe_records_them() -> None:
    import prometheus_client

    registry = prometheus_client.CollectorRegistry()
    one_by_one = prometheus_client.Histogram("compat_h1", "x", ["l"], registry=registry)
    at_once = prometheus_client.Histogram("compat_h2", "x", ["l"], registry=registry)
    values = [0.001, 0.3, 0.3, 7.0, 1e9]
    for v in values:
        one_by_one.labels("a").observe(v)
    child = at_once.labels("a")
    bounds = _compat.histogram_bounds(child)
    assert bounds[-1] == float("inf")
    counts = [0.0] * len(bounds)
    for v in values:
        counts[next(i for i, bound in enumerate(bounds) if v <= bound)] += 1
    _compat.histogram_add(child, counts, sum(values))

    def samples(name: str) -> list[tuple[str, dict[str, str], float]]:
        [family] = [m for m in registry.collect() if m.name == name]
        return [
            (s.name.removeprefix(name), s.labels, s.value)
            for s in family.samples
            if not s.name.endswith("_created")
        ]

    assert samples("compat_h2") == samples("compat_h1")


def test_opentelemetry_keeps_its_global_tracer_provider_in_a_module_attribute() -> None:
    from opentelemetry import trace

    # Set by set_tracer_provider() (once per process: another test may have); None until then.
    assert hasattr(trace, "_TRACER_PROVIDER")
    provider = trace.get_tracer_provider()
    if "OTEL_PYTHON_TRACER_PROVIDER" not in os.environ:
        assert _compat.otel_provider_set(trace) == (
            not isinstance(provider, trace.ProxyTracerProvider)
        )
    if _compat.otel_provider_set(trace):
        assert trace._TRACER_PROVIDER is provider


def test_pools_in_the_workers_process_hand_a_task_its_body_as_the_same_objects() -> None:
    # runs_in_process: the worker passes its request's body to the pool (execute_using_pool),
    # and solo and threads call the task with those very objects (no pickling).
    assert "self._body" in inspect.getsource(Request.execute_using_pool)
    body = ([], {"raw_event": object()}, {})
    for pool in (solo.TaskPool(), thread.TaskPool(limit=1)):
        seen: list[Any] = []
        done = threading.Event()

        def target(received: Any, seen: list[Any] = seen, done: threading.Event = done) -> None:
            seen.append(received)
            done.set()

        pool.start()
        try:
            pool.apply_async(target, args=(body,), callback=lambda _: None)
            assert done.wait(5)
        finally:
            pool.stop()
        assert seen[0] is body
        assert _compat.runs_in_process(pool)
    assert not _compat.runs_in_process(prefork.TaskPool(limit=1))
    assert not _compat.runs_in_process(None)


def test_telling_in_process_pools_apart_needs_no_greenlet(monkeypatch: pytest.MonkeyPatch) -> None:
    # eventlet's and gevent's pool modules import greenlet, which a worker need not have.
    for module in ("greenlet", "celery.concurrency.eventlet", "celery.concurrency.gevent"):
        monkeypatch.setitem(sys.modules, module, None)
    assert _compat.runs_in_process(solo.TaskPool())
    assert not _compat.runs_in_process(prefork.TaskPool(limit=1))
    assert {f"celery.concurrency.{name}" for name in ("eventlet", "gevent")} <= set(
        _compat._IN_PROCESS_POOLS
    )


def test_cpythons_own_sha1_is_sha1() -> None:
    data = b"\x6f\x1c" * 20 + "évent/handler".encode()
    assert _compat.sha1(data).digest() == hashlib.sha1(data).digest()
    assert _compat.sha1 is not hashlib.sha1  # the built-in one is there


# prometheus-client's multiprocess files (merged by a worker serving metrics)

_CHILD = """
import sys
from prometheus_client import Counter, Histogram
runs = Counter("t_runs", "runs", ["handler"])
seconds = Histogram("t_seconds", "seconds", ["handler"], buckets=(0.1, 1.0))
for handler, n in (("a", int(sys.argv[1])), ("b", 1)):
    runs.labels(handler).inc(n)
    seconds.labels(handler).observe(0.5 * n)
"""


def _collected(directory: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import multiprocess

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in multiprocess.MultiProcessCollector(None, str(directory)).collect()
        for sample in family.samples
    }


def test_the_files_of_exited_processes_merge_into_one_per_type_with_the_same_totals(
    tmp_path: Path,
) -> None:
    # Real prometheus-client processes write the files (a canary of their format).
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}

    def child(n: int) -> None:
        subprocess.run([sys.executable, "-c", _CHILD, str(n)], env=env, check=True)

    for n in (1, 2, 3):
        child(n)
    assert len(list(tmp_path.glob("counter_*.db"))) == 3
    before = _collected(tmp_path)
    assert before[("t_runs_total", (("handler", "a"),))] == 6
    le_1 = ("t_seconds_bucket", (("handler", "a"), ("le", "1.0")))
    assert before[le_1] == 2  # 0.5 and 1.0 of 0.5, 1.0 and 1.5

    assert _compat.compact_metric_files(str(tmp_path), lambda pid: True) == 6
    assert sorted(f.name for f in tmp_path.iterdir()) == [
        "counter_compacted.db",
        "histogram_compacted.db",
    ]
    assert _collected(tmp_path) == before

    child(4)  # a later one merges into what was merged before
    later = _collected(tmp_path)
    assert later[("t_runs_total", (("handler", "a"),))] == 10
    assert _compat.compact_metric_files(str(tmp_path), lambda pid: True) == 2
    assert _collected(tmp_path) == later
    # A process still running is left alone.
    child(5)
    assert _compat.compact_metric_files(str(tmp_path), lambda pid: False) == 0
    assert len(list(tmp_path.glob("counter_*.db"))) == 2
    # A file that cannot be read stops the merge of its type, and every file is back in sight.
    # 100 bytes used, then a 5-byte key and no value after it.
    (tmp_path / "counter_999999.db").write_bytes(
        b"\x64\x00\x00\x00" + b"\x00" * 4 + b"\x05\x00\x00\x00" + b"\xff" * 5
    )
    with pytest.raises(Exception):  # noqa: B017, PT011 (whatever the format's reader raises)
        _compat.compact_metric_files(str(tmp_path), lambda pid: True)
    counters = sorted(f.name for f in tmp_path.glob("counter_*.db"))
    assert len(counters) == 3  # the merged one, the last child's, the unreadable one
    assert {"counter_compacted.db", "counter_999999.db"} <= set(counters)
    assert not list(tmp_path.glob("*.merging"))
    assert not list(tmp_path.glob("*.partial"))
