"""Transient handlers without a worker: decoration, topology, retries, catalogue and CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from click.testing import CliRunner
from kombu import Connection

from celery_domain_events import ConfigurationError, DomainEvent, DomainEvents, domain_event_handler
from celery_domain_events.consuming.task import retry_message
from celery_domain_events.ops import catalogue
from celery_domain_events.ops.cli import domain_events
from celery_domain_events.registry import HandlerRegistry
from celery_domain_events.wire.inbound import RETRY_AT_HEADER
from celery_domain_events.wire.topology import diff_bindings, transient_instance

from .conftest import BROKER_URL, Topology
from .test_catalogue import errors


def handlers() -> HandlerRegistry:
    registry = HandlerRegistry()

    @domain_event_handler("cache.*", "user.deleted", transient=True, registry=registry)
    def invalidate(event: DomainEvent) -> None: ...

    @domain_event_handler("user.*", registry=registry)
    def durable(event: DomainEvent) -> None: ...

    return registry


def ext_of(queue_type: str = "quorum") -> DomainEvents:
    app = Celery("transient", broker=BROKER_URL, set_as_current=False)
    app.conf.domain_events_queue_type = queue_type
    return DomainEvents(app, service="svc", handler_registry=handlers())


def spec(ext: DomainEvents, name: str = "invalidate") -> Any:
    return next(s for s in ext.handlers if s.name == name)


def test_a_transient_handler_cannot_be_idempotent() -> None:
    inbox = SimpleNamespace(claim=lambda *a: None)
    with pytest.raises(ConfigurationError, match="transient handler cannot be idempotent"):
        domain_event_handler(
            "cache.*", transient=True, idempotent=inbox, registry=HandlerRegistry()
        )  # type: ignore[arg-type]


def test_the_transient_queue_is_exclusive_classic_and_bound_for_its_own_retries() -> None:
    ext = ext_of("quorum")
    queue = ext.topology.transient_queue(spec(ext), "celery@web-1-abc123")
    assert queue.name == "svc.invalidate.celery@web-1-abc123"
    assert (queue.exclusive, queue.auto_delete, queue.durable) == (True, True, False)
    assert queue.queue_arguments == {"x-queue-type": "classic"}  # quorum setting or not: no DLQ
    keys = {(b.exchange.name, b.routing_key) for b in queue.bindings}
    exchange = ext.settings.exchange
    assert keys == {
        (exchange, "cache.*"),
        (exchange, "user.deleted"),
        (exchange + ".retry", queue.name),
    }
    # The worker's topology has no durable queue and no DLQ for it.
    declared = {getattr(e, "name", None) for e in ext.topology.worker_entities(ext.handlers)}
    assert "svc.durable" in declared
    assert not {n for n in declared if n and n.startswith("svc.invalidate")}


def test_the_instance_is_one_word() -> None:
    instance = transient_instance("celery@web-1.example.com/x*#", "abc123")
    assert instance == "celery@web-1_example_com_x__-abc123"
    assert len(transient_instance("h" * 300, "abc123")) == 107


def test_a_transient_retry_goes_back_to_its_own_queue_held_by_the_worker() -> None:
    ext = ext_of("quorum")
    meta = {"queue": "svc.invalidate.celery@w-abc123", "exchange": "e", "routing_key": "cache.x"}
    message = retry_message(ext, spec(ext), "{}", meta, retries=1, countdown=5)
    # Not the native delayed delivery exchanges a durable quorum queue's retry uses.
    assert (message.exchange, message.routing_key) == (
        ext.settings.exchange + ".retry",
        meta["queue"],
    )
    assert RETRY_AT_HEADER in message.headers
    durable = retry_message(ext, spec(ext, "durable"), "{}", meta, retries=1, countdown=5)
    assert durable.exchange.startswith("celery_delayed")


def test_diff_judges_running_transient_queues_by_their_patterns() -> None:
    expected = {"svc.durable": ("user.*",)}
    transient = {"svc.invalidate": ("cache.*",)}
    actual = [
        ("svc.durable", "user.*"),
        ("svc.invalidate.w1-aaaaaa", "cache.*"),
        ("svc.invalidate.w2-bbbbbb", "cache.#"),  # an older worker, other patterns
    ]
    diff = diff_bindings(expected, actual, "svc", transient=transient)
    assert diff.missing == (("svc.invalidate.w2-bbbbbb", "cache.*"),)
    assert diff.stale == (("svc.invalidate.w2-bbbbbb", "cache.#"),)
    assert diff.orphaned_queues == ()
    assert diff_bindings(expected, actual[:2], "svc", transient=transient).clean
    # None running is no difference; without the transient map, they would be orphans.
    assert diff_bindings(expected, actual[:1], "svc", transient=transient).clean
    assert diff_bindings(expected, actual[:2], "svc").orphaned_queues == (
        "svc.invalidate.w1-aaaaaa",
    )


@pytest.mark.parametrize("version", catalogue.ASYNCAPI_VERSIONS)
def test_the_catalogue_marks_transient_handlers(version: str) -> None:
    document = catalogue.build(ext_of(), version)
    assert errors(document, version) == []
    if version == "3.0.0":
        binding = document["channels"]["svc.invalidate"]["bindings"]["amqp"]["queue"]
        record = document["operations"]["invalidate"]["x-celery-domain-events"]
        durable = document["operations"]["durable"]["x-celery-domain-events"]
    else:
        binding = document["channels"]["svc.invalidate"]["bindings"]["amqp"]["queue"]
        record = document["channels"]["svc.invalidate"]["publish"]["x-celery-domain-events"]
        durable = document["channels"]["svc.durable"]["publish"]["x-celery-domain-events"]
    assert (binding["durable"], binding["exclusive"], binding["autoDelete"]) == (False, True, True)
    assert record["transient"] is True
    assert record["deadLetterQueue"] is None
    assert (durable["transient"], durable["deadLetterQueue"]) == (False, "svc.durable.dlq")


def run(app: Any, *args: str) -> Any:
    return CliRunner().invoke(domain_events, list(args), obj=SimpleNamespace(app=app))


@pytest.mark.rabbitmq
def test_topology_and_dlq_commands_handle_transient_handlers(topology: Topology) -> None:
    app = topology.app("svc", registry=handlers())
    ext = DomainEvents.of(app)
    service = topology.service("svc")
    declared = run(app, "topology", "declare")
    assert declared.exit_code == 0, declared.output
    assert f"skipped  {service}.invalidate (transient" in declared.output
    assert run(app, "topology", "diff").exit_code == 0  # no worker runs: nothing missing

    with Connection(topology.broker_url) as conn:  # a running worker's queue, held open
        queue = ext.topology.transient_queue(spec(ext), "w1-aaaaaa")
        queue(conn.default_channel).declare()
        diff = run(app, "topology", "diff")
        assert diff.exit_code == 0, diff.output
        shown = json.loads(run(app, "topology", "show", "--json").output)
        row = next(r for r in shown["queues"] if r["handler"] == "invalidate")
        assert row["transient"] is True
        assert row["dlq"] is None
        assert [i["queue"] for i in row["instances"]] == [queue.name]
        assert row["bindings"] == ["cache.*", "user.deleted"]
        text = run(app, "topology", "show").output
        assert "transient, no DLQ, 1 running worker queue(s)" in text
        # An older worker's pattern: reported, but only its worker can drop it.
        conn.default_channel.queue_bind(queue.name, ext.settings.exchange, "cache.#")
        stale = run(app, "topology", "diff", "--prune")
        assert f"stale    {queue.name}  cache.#" in stale.output
        assert f"skipped  {queue.name}  cache.#  (transient: restart its worker)" in stale.output

    listed = json.loads(run(app, "dlq", "list", "--json").output)
    assert [r["handler"] for r in listed] == ["durable"]
    refused = run(app, "dlq", "replay", "--handler", "invalidate")
    assert refused.exit_code == 2
    assert "transient, so no dead-letter queue" in refused.output
