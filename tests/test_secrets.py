"""No password of any URL reaches `celery report`, an error or a log; management URL defaults."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from celery import Celery

from celery_domain_events import ConfigurationError, DomainEvents, emit, transmit
from celery_domain_events.config import Settings
from celery_domain_events.ops.rabbitmq_api import ManagementClient
from celery_domain_events.urls import RedactedURL, default_management_url, redact

from .conftest import WorkerProcess
from .test_untrusted import POOLS


def test_redact_masks_every_url_of_a_failover_list() -> None:
    urls = "amqp://a:pw1@h1:5672//;amqp://b:pw2@h2:5673/v"
    assert redact(urls) == "amqp://a:**@h1:5672//;amqp://b:**@h2:5673/v"
    assert redact(urls.split(";")) == redact(urls)
    assert repr(RedactedURL("http://u:pw3@h:15672")) == "'http://u:********@h:15672/'"
    assert RedactedURL("http://u:pw3@h:15672") == "http://u:pw3@h:15672"  # still the URL
    assert not isinstance(RedactedURL("http://u:pw3@h:15672"), str)  # JSON takes its repr
    settings = Settings.from_conf(
        {"domain_events_service": "s", "domain_events_management_url": RedactedURL("http://u:p@h")}
    )
    assert settings.management_url == "http://u:p@h"  # what the library reads


def test_the_management_url_follows_the_broker_or_refuses_to_guess() -> None:
    assert default_management_url("amqp://u:p@rabbit.internal//") == (
        "http://u:p@rabbit.internal:15672"
    )
    assert default_management_url("amqp://u:p@rabbit.internal:5672/v") == (
        "http://u:p@rabbit.internal:15672"
    )
    with pytest.raises(ConfigurationError, match="port 5673") as info:
        default_management_url("amqp://u:s3cret@h:5673//")
    assert "s3cret" not in str(info.value)
    with pytest.raises(ConfigurationError, match="lists 2 hosts") as info:
        default_management_url("amqp://u:s3cret1@h1//;amqp://u:s3cret2@h2//")
    assert "s3cret" not in str(info.value)
    client = ManagementClient.for_broker("amqp://u:p@h:5673/shop", "http://m:pw@mgmt:15672")
    assert client.vhost == "shop"
    assert "pw" not in client.safe_url


def test_a_failover_list_never_leaks_a_password_in_errors() -> None:
    app = Celery("leak", broker="nosuch://u:s3cret1@h1//;nosuch://u:s3cret2@h2//")
    DomainEvents(app, service="leak")
    emit("test.leak.check", {})
    with pytest.raises(ConfigurationError) as info:
        transmit(app)
    assert "s3cret" not in str(info.value)
    assert "nosuch://u:**@h1//;nosuch://u:**@h2//" in str(info.value)


@pytest.mark.rabbitmq
def test_celery_report_masks_every_password(
    worker_process: Callable[..., WorkerProcess], broker_url: str
) -> None:
    worker = worker_process(
        ["typed_or_not"],
        TEST_MANAGEMENT_URL="http://admin:m4nagement@127.0.0.1:15672",
        TEST_BROKER_URL=f"{broker_url};{broker_url.replace('guest:guest', 'guest:f4ilover')}",
    )
    result = worker.celery("report")
    assert "domain_events_management_url" in result.stdout
    assert "m4nagement" not in result.stdout + result.stderr
    assert "f4ilover" not in result.stdout + result.stderr


@pytest.mark.rabbitmq
@pytest.mark.worker
def test_inspect_conf_of_a_running_worker_masks_the_management_password(
    worker_process: Callable[..., WorkerProcess],
) -> None:
    # What Flower's config page shows: the worker's settings, sent as JSON by remote control.
    worker = worker_process(
        ["typed_or_not"], TEST_MANAGEMENT_URL="http://admin:m4nagement@127.0.0.1:15672"
    ).start(*POOLS["solo"])
    result = worker.celery(
        "inspect", "conf", "--destination", worker.hostname, "--json", "--timeout", "10"
    )
    [conf] = json.loads(result.stdout).values()
    assert conf["domain_events_management_url"] == "'http://admin:********@127.0.0.1:15672/'"
    assert "m4nagement" not in result.stdout + result.stderr
    assert "m4nagement" not in worker.log()


def test_a_management_url_set_after_the_app_was_configured_is_masked_once_read() -> None:
    from celery.utils.serialization import jsonify

    app = Celery("late", set_as_current=False)
    DomainEvents(app, service="late")
    app.conf.broker_url  # noqa: B018 (configures the app)
    app.conf.domain_events_management_url = "http://u:l4te@h:15672"
    assert DomainEvents.of(app).settings.management_url == "http://u:l4te@h:15672"
    # What a worker's `inspect conf` sends (celery.worker.control.conf), and `celery report`.
    sent = json.dumps(jsonify(app.conf.table(), unknown_type_filter=repr))
    assert "l4te" not in sent
    assert "l4te" not in app.conf.humanize()
