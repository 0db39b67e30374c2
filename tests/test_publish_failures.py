"""Publishing when the broker is unreachable, refuses us, or the URL is wrong."""

from __future__ import annotations

import logging
import time

import pytest
from celery import Celery

from celery_domain_events import ConfigurationError, DomainEvents, PublishError, emit, transmit
from celery_domain_events.publisher import buffered

pytestmark = [pytest.mark.rabbitmq]

FAST = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.1, "interval_max": 0.2}


def app_for(url: str) -> Celery:
    app = Celery("failing", broker=url, set_as_current=False)
    app.conf.update(broker_heartbeat=None, domain_events_publish_retry_policy=FAST)
    DomainEvents(app, service="failing")
    return app


def test_unreachable_broker_raises_publish_error_and_keeps_the_events(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = app_for("amqp://guest:s3cretpw@127.0.0.1:5999//")  # nothing listens there
    event = emit("test.fail.unreachable", {})
    with caplog.at_level(logging.DEBUG), pytest.raises(PublishError) as info:
        transmit(app)
    assert info.value.events == (event,)
    assert buffered() == [event]  # still there for the caller to retry or store
    assert "127.0.0.1:5999" in str(info.value)
    assert "s3cretpw" not in str(info.value)
    assert "s3cretpw" not in caplog.text
    assert "retrying 1 message(s)" in caplog.text


def test_refused_credentials_fail_fast_without_leaking_them(
    caplog: pytest.LogCaptureFixture, broker_url: str
) -> None:
    app = app_for(broker_url.replace("guest:guest@", "guest:wr0ngpw@"))
    emit("test.fail.auth", {})
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG), pytest.raises(PublishError) as info:
        transmit(app)
    assert time.monotonic() - started < 5  # no pointless retries
    assert "ACCESS_REFUSED" in str(info.value)
    assert "wr0ngpw" not in str(info.value)
    assert "wr0ngpw" not in caplog.text


def test_unknown_broker_scheme_is_a_configuration_error() -> None:
    app = app_for("nosuch://user:pw@host//")
    emit("test.fail.scheme", {})
    with pytest.raises(ConfigurationError, match=r"unusable broker URL nosuch://user:\*\*@host"):
        transmit(app)
