"""Prometheus metrics: the updates, a publisher against the broker, a real worker's port."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu import Connection
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from celery_domain_events import (
    ConfigurationError,
    DomainEvents,
    PublishError,
    domain_event_handler,
    emit,
    metrics,
    transmit,
    transmit_async,
)
from celery_domain_events.config import Settings
from celery_domain_events.consuming import exposition
from celery_domain_events.registry import HandlerRegistry
from celery_domain_events.testing import capture_events
from celery_domain_events.wire.message import OutboundMessage

from .conftest import ROOT, Topology, WorkerProcess, wait_for
from .test_cli import cli
from .test_untrusted import POOLS

DOCS = ROOT / "docs" / "operations"


def _service() -> str:
    return f"m{uuid.uuid4().hex[:8]}"


def value(name: str, **labels: str) -> float:
    metrics.flush()  # handler runs reach prometheus-client through the process's buffer
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _message(name: str, source: Any = None) -> OutboundMessage:
    return OutboundMessage(
        b"{}", "x", name, "application/json", properties={"type": name}, source=source
    )


# -- unit: the updates ---------------------------------------------------------------------------


def test_publishing_counts_published_then_confirmed_or_failed_by_event_name() -> None:
    settings = Settings(service=_service(), metrics=True)
    s = settings.service
    a, b, c = _message("a.x"), _message("a.x"), _message("b.y", source=str(uuid.uuid4()))
    with metrics.publishing(settings, [a, b, c]):
        pass
    assert value("domain_events_published_total", service=s, event="a.x") == 2
    assert value("domain_events_publish_confirmed_total", service=s, event="a.x") == 2
    assert value("domain_events_publish_confirmed_total", service=s, event="b.y") == 1
    # PublishError names the sources of the unconfirmed messages: the others were confirmed.
    with pytest.raises(PublishError), metrics.publishing(settings, [a, b, c]):
        raise PublishError("lost", [a, c.source])  # an event, an outbox row's id
    assert value("domain_events_published_total", service=s, event="a.x") == 4
    assert value("domain_events_publish_failed_total", service=s, event="a.x") == 1
    assert value("domain_events_publish_confirmed_total", service=s, event="a.x") == 3
    assert value("domain_events_publish_failed_total", service=s, event="b.y") == 1
    assert value("domain_events_publish_confirmed_total", service=s, event="b.y") == 1
    with pytest.raises(ValueError, match="boom"), metrics.publishing(settings, [c]):
        raise ValueError("boom")  # not a PublishError: nothing was confirmed
    assert value("domain_events_publish_failed_total", service=s, event="b.y") == 2


def test_nothing_is_recorded_unless_metrics_are_on() -> None:
    settings = Settings(service=_service())
    assert not settings.metrics_enabled
    with metrics.publishing(settings, [_message("a.x")]):
        pass
    metrics.handler_started(settings, "h", "run", "a.x", datetime.now(timezone.utc))
    metrics.handler_outcome(settings, "h", metrics.HANDLED, "run")
    assert value("domain_events_published_total", service=settings.service, event="a.x") == 0
    assert (
        value(
            "domain_events_handler_runs_total",
            service=settings.service,
            handler="h",
            event="a.x",
            outcome="handled",
        )
        == 0
    )
    assert Settings(service="s", metrics_port=9000).metrics_enabled


def test_a_run_is_labelled_by_its_event_and_timed_only_when_its_id_matches() -> None:
    settings = Settings(service=_service(), metrics=True)
    s = settings.service
    sent = datetime.now(timezone.utc) - timedelta(seconds=3)
    metrics.handler_started(settings, "h", "run-1", "user.created", sent)
    assert value("domain_events_handler_lag_seconds_count", service=s, handler="h") == 0
    metrics.handler_outcome(settings, "h", metrics.RETRIED, "run-1")
    # The run's lag is from when it started, recorded with its outcome.
    assert value("domain_events_handler_lag_seconds_count", service=s, handler="h") == 1
    assert 3 <= value("domain_events_handler_lag_seconds_sum", service=s, handler="h") < 4
    runs = "domain_events_handler_runs_total"
    assert value(runs, service=s, handler="h", event="user.created", outcome="retried") == 1
    assert value("domain_events_handler_duration_seconds_count", service=s, handler="h") == 1
    # The run ended: a second outcome (or one of another run) has no event and no duration.
    metrics.handler_outcome(settings, "h", metrics.DEAD_LETTERED, "run-1")
    assert value(runs, service=s, handler="h", event="", outcome="dead_lettered") == 1
    assert value("domain_events_handler_duration_seconds_count", service=s, handler="h") == 1
    # A producer's clock ahead of ours is no negative lag.
    metrics.handler_started(settings, "h", "run-2", "user.created", sent + timedelta(hours=1))
    metrics.handler_outcome(settings, "h", metrics.HANDLED, "run-2")
    assert value("domain_events_handler_lag_seconds_bucket", service=s, handler="h", le="0.01") == 1


def test_a_metric_that_cannot_be_recorded_is_logged_once_and_never_fails_the_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(service=_service(), metrics=True)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("the multiprocess directory is gone")

    monkeypatch.setattr(metrics._pending, "run", broken)
    monkeypatch.setattr(metrics._pending, "observe", broken)
    monkeypatch.setattr(metrics, "_failed", False)
    with caplog.at_level(logging.ERROR, logger=metrics.__name__):
        for run_id in ("r1", "r2"):
            metrics.handler_started(settings, "h", run_id, "user.created", None)
            metrics.handler_outcome(settings, "h", metrics.HANDLED, run_id)
        metrics.batch_ran(settings, "h", [], {"handled": []}, time.monotonic())
    assert [r.getMessage() for r in caplog.records] == [
        "Domain events: could not record a metric; handlers run on"
    ]


def test_buffered_runs_reach_prometheus_client_within_the_flush_interval() -> None:
    settings = Settings(service=_service(), metrics=True)
    s = settings.service
    metrics.handler_started(settings, "h", "run-1", "user.created", datetime.now(timezone.utc))
    metrics.handler_outcome(settings, "h", metrics.HANDLED, "run-1")
    runs = "domain_events_handler_runs_total"
    labels = {"service": s, "handler": "h", "event": "user.created", "outcome": "handled"}
    started = time.monotonic()
    # No flush() here: the process's flushing thread applies the buffer.
    wait_for(
        lambda: REGISTRY.get_sample_value(runs, labels) == 1, timeout=3 * metrics.FLUSH_SECONDS
    )
    assert time.monotonic() - started <= 3 * metrics.FLUSH_SECONDS
    duration = "domain_events_handler_duration_seconds_count"
    assert REGISTRY.get_sample_value(duration, {"service": s, "handler": "h"}) == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_forked_process_does_not_apply_what_its_parent_buffered() -> None:
    settings = Settings(service=_service(), metrics=True)
    s = settings.service
    metrics.flush()
    metrics.handler_outcome(settings, "h", metrics.HANDLED)  # buffered, not applied yet
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: what it applies lands in its copy of the registry
        metrics.flush()
        got = REGISTRY.get_sample_value(
            "domain_events_handler_runs_total",
            {"service": s, "handler": "h", "event": "", "outcome": "handled"},
        )
        os.write(write, repr(got or 0.0).encode())  # the label exists (0) from the parent
        os._exit(0)
    os.close(write)
    assert os.read(read, 100) == b"0.0"  # the child had nothing of its parent's to apply
    os.waitpid(pid, 0)
    assert (
        value(
            "domain_events_handler_runs_total", service=s, handler="h", event="", outcome="handled"
        )
        == 1
    )


def test_a_batch_counts_each_event_by_outcome() -> None:
    settings = Settings(service=_service(), metrics=True)
    s = settings.service

    class Ev:
        def __init__(self, name: str) -> None:
            self.event_id = uuid.uuid4()
            self.event_name = name
            self.occurred_at = datetime.now(timezone.utc) - timedelta(seconds=1)

    events = [Ev("a.x"), Ev("a.x"), Ev("b.y")]
    outcome = {
        "handled": [str(events[0].event_id)],
        "retried": [str(events[1].event_id)],
        "dead_lettered": [str(events[2].event_id), "undecodable-id"],
    }
    metrics.batch_ran(settings, "hb", events, outcome, time.monotonic() - 0.2)
    runs = "domain_events_handler_runs_total"
    assert value(runs, service=s, handler="hb", event="a.x", outcome="handled") == 1
    assert value(runs, service=s, handler="hb", event="a.x", outcome="retried") == 1
    assert value(runs, service=s, handler="hb", event="b.y", outcome="dead_lettered") == 1
    assert value(runs, service=s, handler="hb", event="", outcome="dead_lettered") == 1
    assert value("domain_events_handler_lag_seconds_count", service=s, handler="hb") == 3
    assert value("domain_events_handler_duration_seconds_count", service=s, handler="hb") == 1
    assert value("domain_events_handler_duration_seconds_sum", service=s, handler="hb") >= 0.2


def test_event_names_past_the_limit_are_counted_as_other(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(service=_service(), metrics=True)
    with metrics.publishing(settings, [_message("known.one")]):
        pass
    state = metrics._get()
    monkeypatch.setattr(metrics, "MAX_EVENT_NAMES", len(state._names))
    with metrics.publishing(settings, [_message(f"hostile.{uuid.uuid4().hex}")]):
        pass
    with metrics.publishing(settings, [_message("known.one")]):
        pass
    s = settings.service
    assert value("domain_events_published_total", service=s, event="other") == 1
    assert value("domain_events_published_total", service=s, event="known.one") == 2


def test_metrics_without_prometheus_client_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.setattr(metrics, "_metrics", None)
    with pytest.raises(ConfigurationError, match=r"celery-domain-events\[metrics\]"):
        metrics.publishing(Settings(service="s", metrics=True), [_message("a.x")]).__enter__()


def test_in_process_transmit_and_handler_runs_are_counted() -> None:
    registry = HandlerRegistry()
    service = _service()

    @domain_event_handler("probe.m", registry=registry, retry=None)
    def counted(event: Any) -> None:
        pass

    app = Celery("m", broker="memory://", set_as_current=False)
    DomainEvents(app, service=service, handler_registry=registry, metrics=True)
    with capture_events(app) as events:
        emit("probe.m", {"n": 1})
        transmit(app)
        events.join()
    assert value("domain_events_published_total", service=service, event="probe.m") == 1
    assert value("domain_events_publish_confirmed_total", service=service, event="probe.m") == 1
    labels = {"service": service, "handler": "counted", "event": "probe.m", "outcome": "handled"}
    assert value("domain_events_handler_runs_total", **labels) == 1


# -- the docs and the dashboard cannot drift from the metric list ---------------------------------


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bdomain_events_[a-z_]+", expr))


def _base(name: str) -> str:
    kinds = {m.name: m.kind for m in metrics.METRICS}
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and kinds.get(name.removesuffix(suffix)) == "histogram":
            return name.removesuffix(suffix)
    return name


def _exprs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for v in node.values() for e in _exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _exprs(v)]
    return []


def test_the_dashboard_queries_only_metrics_of_the_library_and_each_of_them() -> None:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exprs = _exprs(dashboard["panels"])
    assert exprs
    used = {_base(n) for e in exprs for n in _metric_names(e)}
    known = {m.name for m in metrics.METRICS}
    assert used - known == set()
    assert known - used == set()


def test_the_metrics_page_lists_every_metric_with_its_labels() -> None:
    page = (DOCS / "metrics.md").read_text()
    rows = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^\| `(domain_events_[a-z_]+)` \| \w+ \| ([^|]+) \|", page, re.M)
    }
    assert set(rows) == {m.name for m in metrics.METRICS}
    for info in metrics.METRICS:
        assert re.findall(r"`(\w+)`", rows[info.name]) == list(info.labels), info.name
    for expr in re.findall(r"expr: (.+)", page):
        assert {_base(n) for n in _metric_names(expr)} <= set(rows), expr


# -- a publisher against the real broker ---------------------------------------------------------


@pytest.mark.rabbitmq
def test_a_publisher_counts_confirmed_events_sync_and_async(topology: Topology) -> None:
    app = topology.app("pub", domain_events_metrics=True)
    service = DomainEvents.of(app).settings.service
    emit("probe.pub", {"n": 1})
    emit("probe.pub", {"n": 2})
    transmit(app)

    async def publish() -> None:
        emit("probe.pub.async", {"n": 3})
        await transmit_async(app)
        await DomainEvents.of(app).aclose()

    asyncio.run(publish())
    for event, count in (("probe.pub", 2), ("probe.pub.async", 1)):
        assert value("domain_events_published_total", service=service, event=event) == count
        confirmed = value("domain_events_publish_confirmed_total", service=service, event=event)
        assert confirmed == count
        assert value("domain_events_publish_failed_total", service=service, event=event) == 0


@pytest.mark.rabbitmq
def test_a_publisher_counts_events_the_broker_did_not_confirm() -> None:
    app = Celery("down", broker="amqp://guest:guest@127.0.0.1:1//", set_as_current=False)
    service = _service()
    DomainEvents(app, service=service, metrics=True, publish_timeout=0.5)
    emit("probe.down", {"n": 1})
    with pytest.raises(PublishError):
        transmit(app)
    assert value("domain_events_published_total", service=service, event="probe.down") == 1
    assert value("domain_events_publish_failed_total", service=service, event="probe.down") == 1
    assert value("domain_events_publish_confirmed_total", service=service, event="probe.down") == 0


# -- a real worker's port ------------------------------------------------------------------------


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(scraped: dict[Any, float], name: str, **labels: str) -> float | None:
    return scraped.get((name, tuple(sorted(labels.items()))))


@pytest.mark.rabbitmq
@pytest.mark.worker
@pytest.mark.slow
@pytest.mark.parametrize("pool", list(POOLS))
def test_a_worker_serves_outcomes_lag_and_dlq_depth_of_all_its_processes(
    topology: Topology, worker_process: Callable[..., WorkerProcess], pool: str
) -> None:
    worker = worker_process(["typed_or_not", "flaky", "fails"], TEST_METRICS_PORT="0")
    worker.start(*POOLS[pool])
    found = re.search(r"serving metrics on http://[\d.]+:(\d+)/metrics", worker.log())
    assert found, worker.log()
    port = int(found.group(1))
    publisher = topology.app("pub")
    emit("probe.untyped", {"n": 1})
    emit("probe.retry", {"n": 2})
    emit("probe.fail", {"n": 3})
    transmit(publisher)
    with Connection(topology.broker_url) as conn:  # poison, dead-lettered by the main process
        conn.default_channel.basic_publish(
            conn.default_channel.prepare_message(b"not json", content_type="application/json"),
            exchange="",
            routing_key=worker.queue("typed_or_not"),
        )
    service = topology.service("proc")
    runs = "domain_events_handler_runs_total"

    def run_count(handler: str, event: str, outcome: str) -> float | None:
        return sample(
            scrape(port), runs, service=service, handler=handler, event=event, outcome=outcome
        )

    wait_for(lambda: run_count("flaky", "probe.retry", "dead_lettered") == 1, timeout=60)
    scraped = scrape(port)
    assert run_count("typed_or_not", "probe.untyped", "handled") == 1
    assert run_count("typed_or_not", "", "dead_lettered") == 1  # the poison
    assert run_count("flaky", "probe.retry", "retried") == 2
    assert run_count("fails", "probe.fail", "dead_lettered") == 1
    lag = "domain_events_handler_lag_seconds_count"
    assert sample(scraped, lag, service=service, handler="typed_or_not") == 1
    assert sample(scraped, lag, service=service, handler="flaky") == 3  # each attempt
    duration = "domain_events_handler_duration_seconds_count"
    assert sample(scraped, duration, service=service, handler="flaky") == 3
    dlq = "domain_events_dead_letter_queue_messages"

    def dlq_depths() -> dict[str, float | None]:
        now = scrape(port)
        return {h: sample(now, dlq, service=service, handler=h) for h in ("fails", "flaky")}

    wait_for(lambda: dlq_depths() == {"fails": 1, "flaky": 1}, timeout=15)
    queued = sample(
        scrape(port), "domain_events_queue_messages", service=service, handler="typed_or_not"
    )
    assert queued == 0
    worker.stop()
    assert "exposition" not in worker.log()  # no error of the port or the depth reads
    multiproc_dirs = re.findall(r"multiprocess directory (\S+)\)", worker.log())
    assert multiproc_dirs
    assert not Path(multiproc_dirs[0]).exists()  # the worker's own: removed at shutdown


@pytest.mark.rabbitmq
@pytest.mark.worker
@pytest.mark.slow
def test_a_worker_replacing_its_pool_processes_keeps_few_metric_files_and_every_count(
    topology: Topology, worker_process: Callable[..., WorkerProcess]
) -> None:
    # One run per pool process (worker_max_tasks_per_child=1): each run's process exits and
    # leaves its files; the worker merges them, and the totals stay.
    worker = worker_process(["typed_or_not"], TEST_METRICS_PORT="0")
    worker.start(*POOLS["prefork"], "--max-tasks-per-child", "1")
    port = int(re.findall(r"serving metrics on http://[\d.]+:(\d+)/metrics", worker.log())[0])
    directory = Path(re.findall(r"multiprocess directory (\S+)\)", worker.log())[0])
    publisher = topology.app("pub")
    runs = 12
    for n in range(runs):
        emit("probe.untyped", {"n": n})
    transmit(publisher)
    service = topology.service("proc")

    def handled() -> float | None:
        return sample(
            scrape(port),
            "domain_events_handler_runs_total",
            service=service,
            handler="typed_or_not",
            event="probe.untyped",
            outcome="handled",
        )

    wait_for(lambda: handled() == runs, timeout=60)
    # The main process's, the two running children's and the merged ones: not one per run,
    # within the merge interval the metrics page states (plus the last child's exit).
    wait_for(
        lambda: len(list(directory.glob("counter_*.db"))) <= 4,
        timeout=exposition.COMPACT_SECONDS + 5,
    )
    assert (directory / "counter_compacted.db").exists()
    assert len(list(directory.glob("histogram_*.db"))) <= 4
    assert handled() == runs
    duration = sample(
        scrape(port),
        "domain_events_handler_duration_seconds_count",
        service=service,
        handler="typed_or_not",
    )
    assert duration == runs


# -- dlq check on the real broker ----------------------------------------------------------------


@pytest.mark.rabbitmq
def test_dlq_check_exits_1_with_one_line_per_dlq_over_the_limit(
    topology: Topology, worker_process: Callable[..., WorkerProcess]
) -> None:
    worker = worker_process(["flaky", "fails"])  # its app and env; no worker runs
    cli(worker, "topology", "declare")
    ok = cli(worker, "dlq", "check")
    assert ok.stdout == ""
    dlq = worker.queue("fails") + ".dlq"
    with Connection(topology.broker_url) as conn:
        for n in range(2):
            conn.default_channel.basic_publish(
                conn.default_channel.prepare_message(f"letter {n}".encode()),
                exchange="",
                routing_key=dlq,
            )
    over = cli(worker, "dlq", "check", check=False)
    assert over.returncode == 1, over.stderr
    assert over.stdout.splitlines() == [f"{dlq}  (fails): 2 message(s), over 0"]
    assert cli(worker, "dlq", "check", "--max", "2").stdout == ""
    report = cli(worker, "dlq", "check", "--max", "1", "--json", check=False)
    assert report.returncode == 1
    parsed = json.loads(report.stdout)
    assert parsed["over"] == [{"handler": "fails", "queue": dlq, "depth": 2}]
    assert {row["handler"]: row["depth"] for row in parsed["queues"]} == {"fails": 2, "flaky": 0}
    assert cli(worker, "dlq", "check", "--handler", "flaky").returncode == 0
    assert cli(worker, "dlq", "check", "--max", "-1", check=False).returncode == 2


@pytest.mark.rabbitmq
def test_dlq_check_without_a_broker_exits_3(worker_process: Callable[..., WorkerProcess]) -> None:
    worker = worker_process(
        ["fails"], TEST_BROKER_URL="amqp://guest:guest@127.0.0.1:1//", TEST_PUBLISH_TIMEOUT="1"
    )
    result = cli(worker, "dlq", "check", check=False)
    assert result.returncode == 3, result.stderr
