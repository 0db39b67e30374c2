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
    GenericEvent,
    domain_event_handler,
)
from celery_domain_events.events import EventRegistry, default_events
from celery_domain_events.ops import catalogue
from celery_domain_events.ops.cli import domain_events
from celery_domain_events.registry import HandlerRegistry
from celery_domain_events.upcasting import UpcasterRegistry, default_upcasters

from . import handlers
from .test_upcasting import PlacedV1, PlacedV2, PlacedV3, PlacedV4, up_untyped, up_v3

SCHEMAS = Path(__file__).parent / "data" / "asyncapi"


@domain_event_handler("up.order.*", name="up_untyped_any", registry=HandlerRegistry())
def up_untyped_any(event: DomainEvent | GenericEvent) -> None: ...


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


@pytest.mark.parametrize("version", catalogue.ASYNCAPI_VERSIONS)
def test_a_publish_only_service_lists_what_it_sends(version: str) -> None:
    ext = isolated_app(publishes=[handlers.UserCreated, PlacedV2])
    document = catalogue.build(ext, version)
    assert errors(document, version) == []
    if version == "3.0.0":
        sends = {k: v for k, v in document["operations"].items() if v["action"] == "send"}
        assert set(sends) == {"send_UserCreatedV1", "send_PlacedV2"}
        assert sends["send_PlacedV2"]["channel"] == {"$ref": "#/channels/PlacedV2"}
        assert document["channels"]["PlacedV2"]["address"] == "up.order.placed"
        assert sends["send_PlacedV2"]["messages"] == [
            {"$ref": "#/channels/PlacedV2/messages/PlacedV2"}
        ]
    else:
        # AsyncAPI 2 names what the application sends "subscribe" (others subscribe to it).
        channel = document["channels"]["up.order.placed"]
        assert channel["subscribe"]["message"] == {"$ref": "#/components/messages/PlacedV2"}
        assert "publish" not in channel
        assert document["channels"]["test.user.created"]["subscribe"]["operationId"]
    message = document["components"]["messages"]["PlacedV2"]
    assert message["x-celery-domain-events"] == {
        "event": "up.order.placed",
        "version": 2,
        "routingKey": "up.order.placed",
    }
    assert document["x-celery-domain-events"]["service"] == "shop"
    assert document["x-celery-domain-events"]["publishes"] == "declared"


@pytest.mark.parametrize("version", catalogue.ASYNCAPI_VERSIONS)
def test_publishes_defaults_to_every_model_and_narrows_it(version: str) -> None:
    models = (PlacedV1, PlacedV2, PlacedV3)
    everything = catalogue.build(isolated_app(models=models), version)
    narrowed = catalogue.build(isolated_app(models=models, publishes=[PlacedV3]), version)
    for document in (everything, narrowed):
        assert errors(document, version) == []
        # Every model stays a message: the service may receive the ones it does not send.
        assert set(document["components"]["messages"]) == {"PlacedV1", "PlacedV2", "PlacedV3"}
    assert everything["x-celery-domain-events"]["publishes"] == "registry"
    if version == "3.0.0":
        assert sorted(everything["operations"]) == [
            "send_PlacedV1",
            "send_PlacedV2",
            "send_PlacedV3",
        ]
        assert sorted(narrowed["operations"]) == ["send_PlacedV3"]
    else:
        # One channel per routing key: the versions of an event share it.
        [channel] = everything["channels"].values()
        assert len(channel["subscribe"]["message"]["oneOf"]) == 3
        [channel] = narrowed["channels"].values()
        assert channel["subscribe"]["message"] == {"$ref": "#/components/messages/PlacedV3"}


def test_publishes_with_no_events_sends_nothing() -> None:
    document = catalogue.build(isolated_app(models=(PlacedV1,), publishes=[]), "3.0.0")
    assert document["operations"] == {}
    assert errors(document, "3.0.0") == []


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


# --- What each handler decodes ----------------------------------------------------------------


@pytest.mark.parametrize("version", catalogue.ASYNCAPI_VERSIONS)
def test_receive_operations_say_which_versions_each_handler_decodes(version: str) -> None:
    upcasters = UpcasterRegistry()
    for step in default_upcasters.all():
        if step.event_name == "up.order.placed":
            upcasters.register(step)
    ext = isolated_app(
        models=(PlacedV1, PlacedV2, PlacedV3, PlacedV4, handlers.UserCreated),
        handler_fns=(up_v3, up_untyped, handlers.w_user_hash),
        upcasters=upcasters,
        publishes=[],
    )
    document = catalogue.build(ext, version)
    assert errors(document, version) == []
    if version == "3.0.0":
        docs = {k: op["x-celery-domain-events"] for k, op in document["operations"].items()}
    else:
        docs = {
            c["publish"]["operationId"]: c["publish"]["x-celery-domain-events"]
            for c in document["channels"].values()
            if "publish" in c
        }
    assert docs["up_v3"]["accepts"] == {"up.order.placed": [1, 2, 3]}  # v4 is newer
    assert docs["up_v3"]["queue"] == "shop.up_v3"
    assert docs["up_untyped"]["accepts"] == {"up.order.placed": [1, 2, 3, 4]}
    # user.# matches no event here (test.user.created starts with "test"): nothing to decode.
    assert docs["w_user_hash"]["accepts"] == {}
    assert document["x-celery-domain-events"]["upcasters"] == [
        {
            "event": "up.order.placed",
            "from": 1,
            "to": 2,
            "function": "tests.test_upcasting.add_currency",
        },
        {
            "event": "up.order.placed",
            "from": 2,
            "to": 3,
            "function": "tests.test_upcasting.to_cents",
        },
    ]


def test_an_untyped_handler_of_an_event_without_a_model_accepts_any_version() -> None:
    with default_events.isolated():

        class Shipped(DomainEvent):
            event_name: ClassVar[str] = "up.order.shipped"
            order_id: int

    # Shipped is published, but the registry (what a worker decodes with) has no model of it.
    ext = isolated_app(handler_fns=(up_untyped_any,), publishes=[Shipped])
    document = catalogue.build(ext, "3.0.0")
    accepts = document["operations"]["up_untyped_any"]["x-celery-domain-events"]["accepts"]
    assert accepts == {"up.order.shipped": "*"}


def test_a_class_named_after_its_version_keeps_its_name_as_the_message_id() -> None:
    from celery_domain_events.ops.catalogue import _message_id

    from .evolving import EvolveV1, EvolveV2

    class Renamed(EvolveV2):  # a subclass keeps the name and version of its base
        pass

    assert _message_id(EvolveV1) == "EvolveV1"
    assert _message_id(EvolveV2) == "EvolveV2"
    assert _message_id(Renamed) == "RenamedV2"
