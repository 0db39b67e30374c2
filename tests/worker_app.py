"""A Celery app for tests that run a real `celery worker` subprocess.

Configured from the environment by tests.conftest.WorkerProcess; its handlers leave files in
$TEST_MARKER_DIR so the test process can see what happened inside the worker's pool.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import ClassVar

from celery import Celery

from celery_domain_events import DomainEvent, DomainEvents, RetryPolicy, domain_event_handler

app = Celery("worker_app", broker=os.environ["TEST_BROKER_URL"])
app.conf.update(
    broker_heartbeat=None,
    worker_send_task_events=True,
    task_send_sent_event=False,
    domain_events_exchange=os.environ["TEST_EXCHANGE"],
    domain_events_unrouted_queue=os.environ["TEST_UNROUTED"],
    domain_events_queue_type=os.environ.get("TEST_QUEUE_TYPE", "classic"),
    # Celery's own task queue, one per test (never the shared "celery" queue); in a cluster
    # it must survive a node too (quorum, set on private clusters only).
    task_default_queue=os.environ.get("TEST_TASK_QUEUE", "celery"),
    task_default_queue_type=os.environ.get("TEST_CELERY_QUEUE_TYPE", "classic"),
    domain_events_delivery_limit=int(os.environ["TEST_DELIVERY_LIMIT"])
    if os.environ.get("TEST_DELIVERY_LIMIT")
    else None,
)
if os.environ.get("TEST_UNROUTED_MAX"):
    app.conf.domain_events_unrouted_max_length = int(os.environ["TEST_UNROUTED_MAX"])
if os.environ.get("TEST_MANAGEMENT_URL"):
    app.conf.domain_events_management_url = os.environ["TEST_MANAGEMENT_URL"]
if os.environ.get("TEST_PUBLISH_TIMEOUT"):
    app.conf.domain_events_publish_timeout = float(os.environ["TEST_PUBLISH_TIMEOUT"])
DomainEvents(
    app,
    service=os.environ["TEST_SERVICE"],
    handlers=[h for h in os.environ["TEST_HANDLERS"].split(",") if h],
)


class Probe(DomainEvent):
    event_name: ClassVar[str] = "probe.crash"
    n: int = 0


def _marker(*parts: str) -> Path:
    return Path(os.environ["TEST_MARKER_DIR"], "-".join(parts))


def _append(name: str, event: DomainEvent) -> None:
    with _marker(name, str(event.event_id)).open("a") as f:
        f.write(f"{time.time()} {os.getpid()}\n")


@domain_event_handler("probe.crash.once", retry=None)
def crash_once(event: DomainEvent) -> None:
    """The first delivery kills its pool process; the redelivery completes."""
    _append("crash_once", event)
    first = _marker("crash_once", str(event.event_id), "crashed")
    if not first.exists():
        first.touch()
        os.kill(os.getpid(), signal.SIGKILL)


@domain_event_handler("probe.crash.always", retry=None)
def crash_always(event: DomainEvent) -> None:
    """Every delivery kills its pool process: a crash loop."""
    _append("crash_always", event)
    os.kill(os.getpid(), signal.SIGKILL)


@domain_event_handler("probe.hang", retry=None)
def hang_once(event: DomainEvent) -> None:
    """The first delivery hangs (the test SIGKILLs the whole worker); the next completes."""
    _append("hang_once", event)
    first = _marker("hang_once", str(event.event_id), "started")
    if not first.exists():
        first.touch()
        time.sleep(120)


@domain_event_handler("probe.retry", retry=RetryPolicy(max_retries=2, backoff=False, countdown=1))
def flaky(event: DomainEvent) -> None:
    """Always fails: retried twice, 1 s apart, then dead-lettered."""
    _append("flaky", event)
    raise RuntimeError("flaky handler failed")


@domain_event_handler("probe.fail", retry=None)
def fails(event: DomainEvent) -> None:
    """Always fails, without retries: dead-lettered at once."""
    _append("fails", event)
    raise RuntimeError("fails handler failed")


@domain_event_handler("probe.fail.later", retry=None)
def fails_later(event: DomainEvent) -> None:
    """Fails once the test creates the marker ``go`` (waits for it for at most 60 s)."""
    _append("fails_later", event)
    go, deadline = _marker("go"), time.time() + 60
    while not go.exists() and time.time() < deadline:
        time.sleep(0.05)
    raise RuntimeError("fails_later handler failed")


@domain_event_handler("probe.retry", retry=None)
def sibling(event: DomainEvent) -> None:
    """Shares the routing key with `flaky`; must run exactly once."""
    _append("sibling", event)


@app.task(name="tests.plant_marker")
def plant_marker(path: str) -> None:
    """A task no message on a handler queue may ever cause to run: it leaves a file."""
    Path(path).touch()


@domain_event_handler("probe.timeout", retry=None, time_limit=1)
def times_out(event: DomainEvent) -> None:
    """Runs past its hard time limit every time: the pool process is killed."""
    _append("times_out", event)
    time.sleep(30)


class Typed(DomainEvent):
    event_name: ClassVar[str] = "probe.typed"
    n: int


@domain_event_handler("probe.typed", "probe.untyped", retry=None)
def typed_or_not(event: DomainEvent) -> None:
    """Records every event it handles, typed (probe.typed) or untyped."""
    _append("typed_or_not", event)


@domain_event_handler("probe.untyped", retry=None)
def also_untyped(event: DomainEvent) -> None:
    """A second handler of probe.untyped (for pausing one and not the other)."""
    _append("also_untyped", event)
