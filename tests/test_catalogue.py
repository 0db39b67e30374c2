"""The AsyncAPI catalogue validates against the official AsyncAPI JSON Schemas."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import jsonschema
import pytest
from celery import Celery
from click.testing import CliRunner

from celery_domain_events import (
    ConfigurationError,
    DomainEvent,
    DomainEvents,
)
from celery_domain_events.events import EventRegistry, default_events
from celery_domain_events.ops import catalogue
from celery_domain_events.ops.cli import domain_events
from celery_domain_events.registry import HandlerRegistry
from celery_domain_events.upcasting import UpcasterRegistry

from . import handlers
from .test_upcasting import PlacedV1, PlacedV2

SCHEMAS = Path(__file__).parent / "data" / "asyncapi"


def errors(document: dict[str, Any], version: str) -> list[str]:
    schema = json.loads((SCHEMAS / f"{version}.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{list(e.path)}: {e.message[:200]}" for e in validator.iter_errors(document)]


@pytest.fixture
def app() -> Celery:
    # No broker I/O: the catalogue is built from code only.
    app = Celery("catalogue", broker="amqp://guest:guest@127.0.0.1:5672//", set_as_current=False)
    chosen = [handlers.welcome_mail, handlers.w_user_hash, handlers.poison_target]
    DomainEvents(app, service="cat", handlers=chosen)
    return app


@pytest.mark.parametrize("version", catalogue.ASYNCAPI_VERSIONS)
def test_catalogue_is_valid_asyncapi(app: Any, version: str) -> None:
    document = catalogue.build(DomainEvents.of(app), version)
    assert errors(document, version) == []
    broken = {k: v for k, v in document.items() if k != "info"}
    assert errors(broken, version)  # the validator does catch a broken document


def test_catalogue_lists_events_schemas_handlers_and_queues(app: Any, tmp_path: Path) -> None:
    out = tmp_path / "catalogue.json"
    result = CliRunner().invoke(
        domain_events, ["catalogue", "-o", str(out)], obj=SimpleNamespace(app=app)
    )
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    service = DomainEvents.of(app).settings.service
    message = document["components"]["messages"]["UserCreatedV1"]
    assert message["name"] == "test.user.created"
    data = message["payload"]["properties"]["data"]
    assert set(data["properties"]) == {"user_id", "email"}
    assert data["required"] == ["user_id"]
    assert message["payload"]["properties"]["eventversion"] == {"const": 1}
    channel = document["channels"]["UserCreatedV1"]
    assert channel["address"] == "test.user.created"
    assert channel["bindings"]["amqp"]["exchange"]["type"] == "topic"
    queue = document["channels"][f"{service}.welcome_mail"]
    assert queue["bindings"]["amqp"]["queue"]["durable"] is True
    op = document["operations"]["welcome_mail"]
    assert op["action"] == "receive"
    assert op["x-celery-domain-events"]["deadLetterQueue"] == f"{service}.welcome_mail.dlq"
    # `user.#` does not match test.user.created: no messages for that handler's channel.
    assert document["operations"]["w_user_hash"]["messages"] == []
    poison = document["operations"]["poison_target"]["messages"]
    assert poison == [{"$ref": f"#/channels/{service}.poison_target/messages/PoisonTargetV1"}]


# --- The publishing side (#14) --------------------------------------------------------------


def isolated_app(
    *,
    models: tuple[type[DomainEvent], ...] = (),
    handler_fns: tuple[Any, ...] = (),
    upcasters: UpcasterRegistry | None = None,
    **options: Any,
) -> DomainEvents:
    """An app on registries of its own: only these models, handlers and upcasters."""
    events = EventRegistry()
    for model in models:
        events.register(model)
    registry = HandlerRegistry()
    for fn in handler_fns:
        registry.register(fn.spec)
    app = Celery("catalogue", broker="amqp://guest:guest@127.0.0.1:5672//", set_as_current=False)
    return DomainEvents(
        app,
        service=options.pop("service", "shop"),
        events=events,
        handler_registry=registry,
        upcasters=upcasters or UpcasterRegistry(),
        discover_handlers=False,
        **options,
    )


class _AbstractBase(DomainEvent):
    tenant: str = "t"


@pytest.mark.parametrize(
    ("publishes", "message"),
    [
        (["up.order.placed"], r"not names: for 'up.order.placed' pass PlacedV1 or PlacedV2"),
        ([dict], r"takes DomainEvent subclasses, got <class 'dict'>: pass the event class"),
        ([PlacedV1(order_id=1, amount=2.0)], r"got a PlacedV1 event: pass the class, PlacedV1$"),
        ([_AbstractBase], r"_AbstractBase, which declares no event_name"),
        ([PlacedV1, PlacedV1], None),
        (PlacedV1, r"takes a list of event classes, got ModelMetaclass"),
        ("up.order.placed", r"takes a list of event classes, got str"),
    ],
)
def test_publishes_is_checked_when_the_app_is_set_up(publishes: Any, message: str | None) -> None:
    if message is None:  # the same class twice is one
        assert isolated_app(publishes=publishes).publishes == (PlacedV1,)
        return
    with pytest.raises(ConfigurationError, match=message) as info:
        isolated_app(models=(PlacedV1, PlacedV2), publishes=publishes)
    assert "\n" not in str(info.value)


def test_two_classes_for_one_version_are_refused() -> None:
    with default_events.isolated():

        class Again(DomainEvent):
            event_name: ClassVar[str] = "up.order.placed"
            event_version: ClassVar[int] = 1
            order_id: int

    with pytest.raises(ConfigurationError, match="lists both PlacedV1 and Again"):
        isolated_app(publishes=[PlacedV1, Again])
