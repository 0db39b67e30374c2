"""Publishing when the broker is unreachable, refuses us, stops mid-batch, or the URL is wrong.

Every failure is a ``PublishError`` within ``domain_events_publish_timeout`` (+ 1 s), with the
default deadline; the buffer and ``error.events`` then hold exactly the unconfirmed events.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery
from kombu import Connection

from celery_domain_events import ConfigurationError, DomainEvents, PublishError, emit, transmit
from celery_domain_events.config import Settings
from celery_domain_events.publishing.api import buffered, discard

from .conftest import Topology, probe

pytestmark = [pytest.mark.rabbitmq]

DEADLINE = Settings.model_fields["publish_timeout"].default


def app_for(url: str, **conf: Any) -> Celery:
    app = Celery("failing", broker=url, set_as_current=False)
    app.conf.update(broker_heartbeat=None, **conf)
    DomainEvents(app, service="failing")
    return app


def test_the_default_deadline_suits_a_web_request() -> None:
    assert DEADLINE == 10.0


def test_unreachable_broker_raises_publish_error_within_the_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = app_for("amqp://guest:s3cretpw@127.0.0.1:5999//")  # nothing listens there
    event = emit("test.fail.unreachable", {})
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG), pytest.raises(PublishError) as info:
        transmit(app)
    elapsed = time.monotonic() - started
    assert DEADLINE - 1 <= elapsed <= DEADLINE + 1, elapsed  # retried, and no longer
    assert info.value.events == (event,)
    assert buffered() == [event]  # still there for the caller to retry or store
    assert "127.0.0.1:5999" in str(info.value)
    assert "s3cretpw" not in str(info.value)
    assert "s3cretpw" not in caplog.text
    assert "Cannot reach" in caplog.text


def test_an_unanswering_broker_cannot_hold_publish_past_the_deadline() -> None:
    # A port that accepts TCP connections but never speaks AMQP (a hung broker, a firewall).
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    port = server.getsockname()[1]
    try:
        app = app_for(f"amqp://guest:guest@127.0.0.1:{port}//", domain_events_publish_timeout=3)
        emit("test.fail.silent", {})
        started = time.monotonic()
        with pytest.raises(PublishError):
            transmit(app)
        assert time.monotonic() - started <= 3 + 1
    finally:
        server.close()


def test_refused_credentials_fail_at_once_without_leaking_them(
    caplog: pytest.LogCaptureFixture, broker_url: str
) -> None:
    app = app_for(broker_url.replace("guest:guest@", "guest:wr0ngpw@"))
    emit("test.fail.auth", {})
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG), pytest.raises(PublishError) as info:
        transmit(app)
    assert time.monotonic() - started < 1  # no pointless retries
    assert "ACCESS_REFUSED" in str(info.value)
    assert "wr0ngpw" not in str(info.value)
    assert "wr0ngpw" not in caplog.text


def test_unknown_broker_scheme_is_a_configuration_error() -> None:
    app = app_for("nosuch://user:pw@host//")
    emit("test.fail.scheme", {})
    with pytest.raises(ConfigurationError, match=r"unusable broker URL nosuch://user:\*\*@host"):
        transmit(app)


EVENTS = 30_000


def copies_by_id(url: str, queue: str) -> dict[str, int]:
    """Drain ``queue``: how many copies of each event id it held."""
    seen: dict[str, int] = {}
    with Connection(url) as conn:
        channel = conn.channel()
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            event_id = message.properties["message_id"]
            seen[event_id] = seen.get(event_id, 0) + 1
    return seen


#: How long the broker-stop tests keep re-transmitting what a restarted node has not confirmed.
RESEND_SECONDS = 120


def resend_until_sent(send: Callable[[], Any], node: Any) -> None:
    """Call ``send`` (a transmit) until it raises no ``PublishError``, for up to RESEND_SECONDS."""
    deadline = time.monotonic() + RESEND_SECONDS
    while True:
        try:
            send()
            return
        except PublishError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"re-transmit failed: {exc}\n{node.log_tail()}") from exc
            time.sleep(0.5)


@pytest.mark.slow
def test_a_broker_stopped_mid_batch_loses_nothing_and_resends_only_the_unconfirmed(
    private_node: Any, record_property: Any
) -> None:
    topology = Topology(private_node.url)
    app = topology.app()
    probe_queue = probe(topology, app)  # durable: it keeps what a stopped broker had
    events: list[Any] = []
    outcome: dict[str, Any] = {}

    def run() -> None:  # emit() buffers per thread: emit and transmit here
        events.extend(emit("test.stop.tick", {"n": n}) for n in range(EVENTS))
        started = time.monotonic()
        try:
            transmit(app)
        except PublishError as exc:
            outcome["error"] = exc
        outcome["elapsed"] = time.monotonic() - started
        outcome["buffered"] = buffered()
        discard()

    publisher = threading.Thread(target=run)
    with Connection(private_node.url) as conn:
        conn.connect()
        publisher.start()
        # Stop the broker while the batch is on the wire, once some confirms are back.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            _, count, _ = conn.default_channel.queue_declare(probe_queue, passive=True)
            if count >= 2_000:
                break
            time.sleep(0.01)
    stopped_at = time.monotonic()
    private_node.stop_app()
    publisher.join(timeout=DEADLINE + 30)
    assert not publisher.is_alive()
    error = outcome.get("error")
    assert isinstance(error, PublishError), outcome
    assert time.monotonic() - stopped_at <= DEADLINE + 1 + 10  # stop_app itself takes seconds
    assert outcome["elapsed"] <= DEADLINE + 1
    unconfirmed = list(error.events)
    assert outcome["buffered"] == unconfirmed  # exactly the unconfirmed ones, in order
    assert 0 < len(unconfirmed) < EVENTS
    record_property("unconfirmed", len(unconfirmed))
    record_property("transmit_seconds", round(outcome["elapsed"], 2))

    private_node.start_app()
    # The probe queue holds ~30,000 persistent messages: the restarted node serves it a while
    # after it accepts connections, and this test is about what is resent, not about that.
    private_node.wait_for_queue(probe_queue)
    for event in unconfirmed:
        emit(event)
    # The re-transmit sends only what RabbitMQ had not confirmed. A node just restarted on a
    # loaded machine may confirm thousands of persistent events slower than the deadline: what
    # it confirmed leaves the buffer, so transmitting again sends only the rest, as a caller
    # (or the outbox) would.
    resend_until_sent(lambda: transmit(app), private_node)

    confirmed_ids = {e.event_id for e in events} - {e.event_id for e in unconfirmed}
    seen = copies_by_id(private_node.url, probe_queue)
    assert set(seen) == {e.event_id for e in events}  # 0 lost
    assert [i for i in confirmed_ids if seen[i] > 1] == []  # 0 confirmed events sent twice
    record_property("duplicates_of_unconfirmed", sum(n - 1 for n in seen.values()))
