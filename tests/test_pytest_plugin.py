"""The opt-in pytest plugin, run by pytester on a generated test file against the real broker."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from amqp.exceptions import NotFound
from kombu import Connection

pytest_plugins = ["pytester"]

pytestmark = [pytest.mark.rabbitmq, pytest.mark.worker]

# The inner session declares no markers: under --strict-markers, marking its broker test works
# only if the plugin registers rabbitmq/worker itself. pytest-celery is auto-loaded there too.
# (The generated module does not write @pytest.mark.rabbitmq: a module that opts in through its
# own pytest_plugins is imported before the plugin registers anything; a root conftest is not.)
INI = """
[pytest]
addopts = --strict-markers -p no:cacheprovider
filterwarnings =
    error
    ignore::DeprecationWarning:celery.*
    ignore::DeprecationWarning:kombu.*
    ignore::pytest.PytestUnraisableExceptionWarning
"""

GENERATED = """
import json
import pathlib
import threading

from kombu import Connection

from celery_domain_events import DomainEvents, domain_event_handler, emit, transmit

pytest_plugins = ["celery_domain_events.testing.pytest_plugin"]

SEEN = []
DONE = threading.Event()


@domain_event_handler("pp.greeting.#", name="pp_greeter", retry=None)
def pp_greeter(event):
    SEEN.append(event)
    DONE.set()


def test_a_real_worker_handles_the_event(
    domain_events_app, domain_events_worker, domain_events_prefix, domain_events_broker_url
):
    app = domain_events_app(handlers=[pp_greeter])
    ext = DomainEvents.of(app)
    queue = ext.topology.handler_queue_name(ext.handlers[0])
    assert queue == f"{domain_events_prefix}-svc.pp_greeter"
    with domain_events_worker(app):
        with Connection(domain_events_broker_url) as conn:
            conn.default_channel.queue_declare(queue, passive=True)  # the worker declared it
        event = emit("pp.greeting", {"to": "ada"})
        transmit(app)
        assert DONE.wait(20)
    assert SEEN == [event]
    prefix = domain_events_prefix
    pathlib.Path("entities.json").write_text(json.dumps({
        "queues": [queue, queue + ".dlq", f"{prefix}.unrouted", f"{prefix}.celery"],
        "exchanges": [f"{prefix}.events", f"{prefix}.events.retry", f"{prefix}.unrouted"],
    }))


def test_in_process_capture_needs_no_broker(domain_events_capture):
    from celery import Celery

    app = Celery("pp", broker="memory://", set_as_current=False)
    DomainEvents(app, service="pp", handlers=[pp_greeter])
    events = domain_events_capture(app)
    event = emit("pp.greeting.loud", {})
    transmit(app)
    events.join()
    assert events.handled(pp_greeter) == [event]
"""


def _gone(conn: Connection, declare: Callable[[Any], Any]) -> bool:
    channel = conn.channel()
    try:
        declare(channel)
    except NotFound:  # and the broker closed the channel
        return True
    channel.close()
    return False


def test_generated_suite_passes_and_deletes_its_entities(
    pytester: pytest.Pytester, broker_url: str
) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(test_generated=GENERATED)
    # A subprocess: the handler registry and Celery's current app are process-global.
    result = pytester.runpytest_subprocess("-v", timeout=120)
    result.assert_outcomes(passed=2)
    entities = json.loads((pytester.path / "entities.json").read_text())
    with Connection(broker_url) as conn:
        left = [
            q
            for q in entities["queues"]
            if not _gone(conn, lambda c, q=q: c.queue_declare(q, passive=True))
        ] + [
            x
            for x in entities["exchanges"]
            if not _gone(conn, lambda c, x=x: c.exchange_declare(x, "topic", passive=True))
        ]
    assert left == []

    # The plugin marked the broker test: it is deselected with the other tests on the broker.
    result = pytester.runpytest_subprocess("-m", "not rabbitmq and not worker", timeout=120)
    result.assert_outcomes(passed=1, deselected=1)
