"""Pure functions and value objects: routing, wire format, settings, errors, public API."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from celery import Celery

import celery_domain_events as cde
from celery_domain_events import DomainEvents, emit, exceptions, tracing, transmit
from celery_domain_events.config import Settings, misspelled_setting
from celery_domain_events.consuming import delivery as bridge
from celery_domain_events.events import DomainEvent, GenericEvent
from celery_domain_events.registry import EventRegistry, default_events
from celery_domain_events.routing import matches, validate_event_name, validate_pattern
from celery_domain_events.wire import envelope as serialization


@pytest.fixture(autouse=True)
def _isolated_events() -> Iterator[None]:
    # Defining a DomainEvent subclass registers it in the default registry.
    with default_events.isolated():
        yield


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("user.created", "user.created", True),
        ("user.created", "user.deleted", False),
        ("user.*", "user.created", True),
        ("user.*", "user", False),
        ("user.*", "user.a.b", False),
        ("user.#", "user", True),
        ("user.#", "user.a.b", True),
        ("#.created", "created", True),
        ("#.created", "a.b.created", True),
        ("#", "anything.at.all", True),
        ("*.*", "a.b", True),
        ("*.*", "a", False),
        ("user.#.done", "user.done", True),
        ("user.#.done", "user.x.y.done", True),
        ("user.#.done", "user.x.y", False),
        ("*.#.*", "a", False),
        ("*.#.*", "a.b", True),
        ("#.#", "a", True),
    ],
)
def test_matches_is_amqp_exact(pattern: str, key: str, expected: bool) -> None:
    assert matches(pattern, key) is expected


@pytest.mark.parametrize("bad", ["", "user..created", "user.cre ated", "user.*x", "a" * 256])
def test_invalid_patterns_are_rejected(bad: str) -> None:
    with pytest.raises(cde.InvalidRoutingPattern):
        validate_pattern(bad)


@pytest.mark.parametrize("bad", ["user.*", "user.#", "", ".user"])
def test_event_names_have_no_wildcards(bad: str) -> None:
    with pytest.raises(cde.InvalidRoutingPattern):
        validate_event_name(bad)


def test_envelope_round_trip_into_the_typed_model() -> None:
    registry = EventRegistry()

    class Paid(DomainEvent):
        event_name: ClassVar[str] = "unit.paid"
        event_version: ClassVar[int] = 2
        amount: int

    registry.register(Paid)
    event = Paid(amount=3)
    body = serialization.encode(event, "billing", traceparent="00-abc-def-01")
    raw = json.loads(body)
    assert raw["eventversion"] == 2
    assert raw["traceparent"] == "00-abc-def-01"
    assert raw["data"] == {"amount": 3}
    back = serialization.to_event(serialization.decode(body), registry)
    assert back == event
    assert isinstance(back, Paid)


def test_unregistered_name_gives_a_generic_event() -> None:
    event = GenericEvent(event_name="unit.other", data={"a": 1})
    back = serialization.to_event(
        serialization.decode(serialization.encode(event, "s")), EventRegistry()
    )
    assert isinstance(back, GenericEvent)
    assert back == event


def test_unknown_version_and_invalid_payload_are_poison() -> None:
    registry = EventRegistry()

    class V1(DomainEvent):
        event_name: ClassVar[str] = "unit.versioned"
        n: int

    registry.register(V1)
    envelope = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "s",
        "type": "unit.versioned",
        "eventversion": 9,
        "data": {"n": 1},
    }
    with pytest.raises(cde.UnknownEventError, match="known versions: 1"):
        serialization.to_event(serialization.decode(json.dumps(envelope)), registry)
    envelope |= {"eventversion": 1, "data": {"n": "not a number"}}
    with pytest.raises(cde.EventValidationError, match="n: Input should be a valid integer"):
        serialization.to_event(serialization.decode(json.dumps(envelope)), registry)


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"id": "x"}',
        b'{"id": "x", "source": "s", "type": "a.b"}',
        b'{"specversion": "0.3", "id": "x", "source": "s", "type": "a.b"}',
    ],
)
def test_malformed_bodies_raise_event_decode_error(body: bytes) -> None:
    with pytest.raises(cde.EventDecodeError):
        serialization.decode(body)


def test_duplicate_event_declarations_are_rejected() -> None:
    class A(DomainEvent):
        event_name: ClassVar[str] = "unit.dup"

    with pytest.raises(cde.RegistrationError, match="declared by both"):

        class B(DomainEvent):
            event_name: ClassVar[str] = "unit.dup"


def test_settings_reject_unknown_keys_and_bad_values() -> None:
    with pytest.raises(cde.ConfigurationError, match="domain_events_exchnage"):
        Settings.from_conf({"domain_events_exchnage": "x"}, service="s")
    with pytest.raises(cde.ConfigurationError, match="service"):
        Settings.from_conf({})
    with pytest.raises(cde.ConfigurationError):
        Settings.from_conf({"domain_events_queue_type": "lazy"}, service="s")
    settings = Settings.from_conf({"domain_events_exchange": "ev"}, service="billing")
    assert settings.exchange == "ev"


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        (
            {},
            "invalid domain events settings: domain_events_service is required "
            '(DomainEvents(app, service="billing"), or the setting)',
        ),
        (
            {"DOMAIN_EVENTS_SERVICE": "s", "DOMAIN_EVENTS_QUEUE_TYPE": "Quorum"},
            "invalid domain events settings: DOMAIN_EVENTS_QUEUE_TYPE: "
            "Input should be 'classic' or 'quorum'",
        ),
        (
            {"domain_events_service": "s", "domain_events_delivery_limit": 3},
            "invalid domain events settings: domain_events_delivery_limit needs "
            "domain_events_queue_type='quorum' (classic queues have no delivery limit)",
        ),
        (
            {"domain_events_service": "s", "domain_events_exchnage": "x"},
            "unknown setting 'domain_events_exchnage': did you mean 'domain_events_exchange'?",
        ),
        (
            {"DOMAIN_EVENTS_SERVICE": "s", "DOMAIN_EVENTS_QUEUETYPE": "x"},
            "unknown setting 'DOMAIN_EVENTS_QUEUETYPE': did you mean 'DOMAIN_EVENTS_QUEUE_TYPE'?",
        ),
    ],
)
def test_a_settings_error_is_one_line_naming_the_setting_as_written(
    conf: dict[str, Any], message: str
) -> None:
    with pytest.raises(cde.ConfigurationError) as info:
        Settings.from_conf(conf)
    assert str(info.value) == message
    assert info.value.__cause__ is None  # pydantic's text repeats the values


def test_a_settings_error_never_shows_a_value() -> None:
    with pytest.raises(cde.ConfigurationError) as info:
        Settings.from_conf(
            {"domain_events_service": "s", "domain_events_management_url": ["http://u:s3cret@h"]}
        )
    assert "domain_events_management_url: Input should be a valid string" in str(info.value)
    assert "s3cret" not in str(info.value)
    with pytest.raises(cde.ConfigurationError) as info:
        Settings.from_conf({"domain_events_publish_timeout": 5}, service="s", publish_timeout=-1)
    assert "DomainEvents(publish_timeout=...): Input should be greater than 0" in str(info.value)
    quorum = {"domain_events_queue_type": "quorum", "domain_events_delivery_limit": 3}
    assert Settings.from_conf(quorum, service="s").delivery_limit == 3
    assert (
        Settings.from_conf({"domain_events_exchange": "ev"}, service="b", exchange="o").exchange
        == "o"
    )


@pytest.mark.parametrize("discover", [True, False])
def test_handler_discovery_asks_celery_for_handlers_modules_unless_turned_off(
    discover: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = Celery("discovery", broker="memory://", set_as_current=False)
    asked: list[dict[str, Any]] = []
    monkeypatch.setattr(app, "autodiscover_tasks", lambda **kwargs: asked.append(kwargs))
    DomainEvents(app, service="disc", discover_handlers=discover)
    # Celery's own lazy discovery (Django's installed apps, or the packages it is given).
    assert asked == ([{"related_name": "handlers"}] if discover else [])


@pytest.mark.parametrize(
    ("key", "namespace"),
    [
        ("domain_events_exchange", None),  # Celery's own form
        ("DOMAIN_EVENTS_EXCHANGE", None),  # Django settings, no namespace
        ("DOMAIN_EVENTS_EXCHANGE", "CELERY"),  # Django settings, plain, with a namespace
        ("CELERY_DOMAIN_EVENTS_EXCHANGE", "CELERY"),  # the Celery docs' Django layout
    ],
)
def test_settings_are_read_in_every_form_django_users_write(
    key: str, namespace: str | None
) -> None:
    settings = Settings.from_conf({key: "djw_events", "X": 1}, namespace=namespace, service="s")
    assert settings.exchange == "djw_events"
    misspelled = key.replace("EXCHANGE", "EXCHNAGE").replace("exchange", "exchnage")
    with pytest.raises(cde.ConfigurationError, match=misspelled):
        Settings.from_conf({misspelled: "x"}, namespace=namespace, service="s")


@pytest.mark.parametrize(
    ("key", "namespace", "meant"),
    [
        ("domain_event_exchange", None, "domain_events_exchange"),  # the singular
        ("domainevents_queue_type", None, "domain_events_queue_type"),
        ("domain_evnets_exchange", None, "domain_events_exchange"),
        ("Domain_Events_Exchange", None, "domain_events_exchange"),  # neither Celery's nor Django's
        ("DOMAIN_EVENT_EXCHANGE", None, "domain_events_exchange"),
        ("CELERY_DOMAIN_EVENT_EXCHANGE", "CELERY", "domain_events_exchange"),
        ("domain_event_metrics_port", None, "domain_events_metrics_port"),  # not ..._port
        ("omain_events_service", None, "domain_events_service"),
    ],
)
def test_a_misspelled_prefix_is_an_error_that_names_the_setting_meant(
    key: str, namespace: str | None, meant: str
) -> None:
    with pytest.raises(cde.ConfigurationError, match=f"{key!r}: did you mean {meant!r}"):
        Settings.from_conf({key: "x"}, namespace=namespace, service="s")


def test_no_key_of_celery_itself_is_taken_for_a_misspelled_setting() -> None:
    app = Celery("units-near-miss", broker="memory://", set_as_current=False)
    keys = list(app.conf.keys())
    for key in keys + [key.upper() for key in keys] + ["CELERY_" + key.upper() for key in keys]:
        assert misspelled_setting(key, "CELERY") is None, key
        assert misspelled_setting(key) is None, key
    # Without the namespace, the Celery docs' Django form is someone else's key, as Celery reads it.
    assert misspelled_setting("CELERY_DOMAIN_EVENTS_EXCHANGE") is None


@pytest.mark.parametrize(
    "key",
    [
        "MAIN_EVENTS_EXCHANGE",  # Django settings of an app's own, read through app.conf
        "MAIN_EVENTS_QUEUE_TYPE",
        "DOMAIN_EVENT_BUS_EXCHANGE",
        "DOMAIN_EVENT_BUS_SERVICE",
        "MY_DOMAIN_EVENTS_SERVICE",
        "APP_DOMAIN_EVENTS_EXCHANGE",
        "OLD_DOMAIN_EVENTS_EXCHANGE",
    ],
)
def test_a_key_of_its_own_that_ends_like_a_setting_is_not_a_misspelling(key: str) -> None:
    assert misspelled_setting(key) is None
    assert misspelled_setting(key, "CELERY") is None
    assert Settings.from_conf({key: "x"}, namespace="CELERY", service="s").exchange


def test_a_misspelled_keyword_argument_is_an_error_too() -> None:
    app = Celery("units-kwargs", broker="memory://", set_as_current=False)
    with pytest.raises(cde.ConfigurationError, match=r"unknown DomainEvents option.*exchnage"):
        DomainEvents(app, service="s", exchnage="x")
    with pytest.raises(cde.ConfigurationError, match="exchnage"):
        Settings.from_conf({}, service="s", exchnage="x")


def test_a_setting_given_twice_must_agree_and_others_namespaces_are_not_ours() -> None:
    conf = {"DOMAIN_EVENTS_EXCHANGE": "a", "CELERY_DOMAIN_EVENTS_EXCHANGE": "b"}
    with pytest.raises(cde.ConfigurationError, match="twice"):
        Settings.from_conf(conf, namespace="CELERY", service="s")
    conf = {"DOMAIN_EVENTS_EXCHANGE": "a", "CELERY_DOMAIN_EVENTS_EXCHANGE": "a"}
    assert Settings.from_conf(conf, namespace="CELERY", service="s").exchange == "a"
    # Without that namespace, CELERY_DOMAIN_EVENTS_* is someone else's key (as Celery reads it).
    assert Settings.from_conf({"CELERY_DOMAIN_EVENTS_EXCHNAGE": "x"}, service="s")
    # A Django setting read by contrib.django, not a setting of ours.
    assert Settings.from_conf({"DOMAIN_EVENTS_CELERY_APP": "proj.celery.app"}, service="s")
    # Mixed case is no Django setting (Django ignores it) and no Celery one.
    assert Settings.from_conf({"Domain_Events_Exchnage": "x"}, service="s")


def test_every_error_derives_from_the_root_and_pickles() -> None:
    errors = [
        exceptions.ConfigurationError("bad"),
        exceptions.InvalidRoutingPattern("bad"),
        exceptions.RegistrationError("dup"),
        exceptions.PublishError("down", [GenericEvent(event_name="a.b")]),
        exceptions.NoActiveScope("none"),
        exceptions.EventDecodeError("json"),
        exceptions.UnknownEventError("v9"),
        exceptions.EventValidationError("schema"),
        exceptions.RejectEvent("nope"),
    ]
    for error in errors:
        assert isinstance(error, cde.DomainEventsError)
        clone = pickle.loads(pickle.dumps(error))
        assert type(clone) is type(error)
        assert str(clone) == str(error)
    assert pickle.loads(pickle.dumps(errors[3])).events == errors[3].events
    assert issubclass(cde.ConfigurationError, ValueError)
    assert issubclass(cde.UnknownEventError, LookupError)


def test_public_api_is_exported_and_sorted() -> None:
    public = sorted(
        (
            n
            for n in vars(cde)
            if not n.startswith("_")
            and n not in {"annotations"}
            and not isinstance(getattr(cde, n), type(cde))
        ),
        key=str,
    )

    # ruff's RUF022 order: CONSTANTS, Classes, functions.
    def isort_key(name: str) -> tuple[int, str]:
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert cde.__all__ == sorted(cde.__all__, key=isort_key)
    assert set(public) <= set(cde.__all__)
    for name in cde.__all__:
        assert hasattr(cde, name)


def test_domain_event_metadata_defaults_and_freezing() -> None:
    class E(DomainEvent):
        event_name: ClassVar[str] = "unit.frozen"
        n: int

    e = E(n=1)
    assert uuid.UUID(e.event_id).version == 4  # a CloudEvents id: a string, a UUID by default
    assert e.occurred_at.tzinfo is not None
    assert e.occurred_at <= datetime.now(timezone.utc)
    with pytest.raises(ValueError, match="frozen"):
        e.n = 2  # type: ignore[misc]


def test_handler_options_are_checked_when_decorating() -> None:
    with pytest.raises(cde.ConfigurationError, match="unknown handler option"):
        cde.domain_event_handler("a.b", tiem_limit=3)
    with pytest.raises(cde.ConfigurationError, match="at least one"):
        cde.domain_event_handler()
    with pytest.raises(cde.InvalidRoutingPattern):
        cde.domain_event_handler("a..b")


def test_every_setting_is_documented_in_the_settings_reference() -> None:
    root = Path(__file__).resolve().parent.parent
    reference = (root / "docs" / "operations" / "settings.md").read_text()
    documented = set(re.findall(r"^\| `domain_events_(\w+)` \|", reference, flags=re.MULTILINE))
    assert documented == set(Settings.model_fields)


@pytest.mark.parametrize("event_id", ["8e7a75a7-44d2-46be-b0bd-327f7691c97e", "not-a-uuid", "é/ü"])
def test_task_ids_are_uuid5_of_event_and_handler(event_id: str) -> None:
    expected = uuid.uuid5(bridge.TASK_ID_NAMESPACE, f"{event_id}/send_welcome")
    assert bridge.task_id_for(event_id, "send_welcome") == str(expected)


class UnitShipped(DomainEvent):
    event_name: ClassVar[str] = "unit.order.shipped"
    event_version: ClassVar[int] = 2

    order_id: int


def test_batch_encoder_writes_the_same_envelope_as_encode() -> None:
    typed = UnitShipped(order_id=7)
    untyped = GenericEvent(event_name="x.y", event_version=3, data={"at": datetime(2026, 1, 1)})
    encode = serialization.encoder("billing", traceparent="00-abc-def-01")
    for event in (typed, untyped):
        body, event_id = encode(event)
        assert event_id == str(event.event_id)
        assert json.loads(body) == json.loads(
            serialization.encode(event, "billing", traceparent="00-abc-def-01")
        )
        envelope = serialization.decode(body)
        assert (envelope.id, envelope.type, envelope.eventversion, envelope.source) == (
            event_id,
            event.event_name,
            event.event_version,
            "billing",
        )
        assert envelope.time == event.occurred_at
        assert envelope.traceparent == "00-abc-def-01"
    assert json.loads(encode(untyped)[0])["data"] == {"at": "2026-01-01T00:00:00"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"id": ', "not valid UTF-8 JSON"),
        (b"\xff\xfe{}", "not valid UTF-8 JSON"),
        (b"[1, 2]", "must be a JSON object, got list"),
        (
            b'{"id": "x", "source": "s"}',
            "not a CloudEvents 1.0 envelope: specversion: Field required",
        ),
    ],
)
def test_decode_errors_say_what_is_wrong(body: bytes, message: str) -> None:
    with pytest.raises(exceptions.EventDecodeError, match=re.escape(message)):
        serialization.decode(body)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"time": "2026-01-01T00:00:00"},
            "time: Value error, time must be an RFC 3339 timestamp such as 2026-01-31T12:00:00Z",
        ),
        ({"time": 1767225600}, "time: Value error, time must be an RFC 3339 timestamp"),
        ({"time": "2026-02-30T00:00:00Z"}, "time: Input should be a valid datetime or date, day"),
        ({"myext": 1.5}, "<root>: Value error, extension attribute 'myext' must be a string"),
        ({"Bad": "x"}, "<root>: Value error, extension attribute 'Bad' is not lower-case"),
        ({"myext": 2**31}, "<root>: Value error, extension attribute 'myext' is outside 32-bit"),
        (
            {"data_base64": "eyJhIjoxfQ=="},
            "<root>: Value error, data and data_base64 are mutually exclusive",
        ),
        ({"id": None}, "id: Field required"),
    ],
)
def test_envelope_errors_keep_their_wording(changes: dict[str, Any], message: str) -> None:
    # Dead-letter reasons are read by people and matched by scripts: the wording is kept from
    # when these rules were pydantic validators.
    event = {"specversion": "1.0", "id": "e1", "source": "s", "type": "a.b", "data": {}}
    with pytest.raises(exceptions.EventDecodeError) as raised:
        serialization.decode(json.dumps({**event, **changes}))
    assert str(raised.value).startswith(f"not a CloudEvents 1.0 envelope: {message}")


def test_child_spans_keep_the_trace_and_flags_and_reject_invalid_parents() -> None:
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    child = tracing.child_of(parent)
    assert re.fullmatch(r"00-4bf92f3577b34da6a3ce929d0e0e4736-[0-9a-f]{16}-01", child)
    assert child != parent
    assert tracing.child_of(parent.replace("-01", "-00"))[-3:] == "-00"
    zero_trace = "00-" + "0" * 32 + "-00f067aa0ba902b7-01"
    for invalid in (None, "", "garbage", zero_trace, parent.upper(), parent + "x"):
        root = tracing.child_of(invalid)
        assert tracing.trace_id(root) not in (None, "4bf92f3577b34da6a3ce929d0e0e4736")
    assert tracing.trace_id(zero_trace) is None
    assert tracing.trace_id(parent) == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_a_handler_runs_child_span_is_made_when_first_asked_for_then_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    made: list[str | None] = []
    child_of = tracing.child_of
    monkeypatch.setattr(tracing, "child_of", lambda tp: made.append(tp) or child_of(tp))
    with tracing.child_context(parent):
        pass  # a run that emits and logs nothing
    assert made == []
    with tracing.child_context(parent):
        first = tracing.current_traceparent()
        assert tracing.current_traceparent() == first
        assert tracing.explicit_traceparent() == first
        with tracing.use_traceparent(None):
            assert tracing.current_traceparent() != first
        assert tracing.current_traceparent() == first
    assert made == [parent]
    assert first is not None
    assert tracing.trace_id(first) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert first != parent
    assert tracing.explicit_traceparent() is None
    with tracing.child_context("garbage"):
        root = tracing.current_traceparent()
        assert tracing.trace_id(root) not in (None, "4bf92f3577b34da6a3ce929d0e0e4736")


def test_message_id_is_the_cloudevents_id_even_with_json_escapes() -> None:
    import json as _json

    from celery import Celery

    from celery_domain_events import DomainEvents, GenericEvent
    from celery_domain_events.publishing.send import outbound_messages

    app = Celery("ids", broker="memory://", set_as_current=False)
    ext = DomainEvents(app, service="ids")
    event = GenericEvent(event_name="unit.ids", event_id='crm "7" \\ x', data={})
    [message] = outbound_messages(ext, [event])
    assert message.properties["message_id"] == 'crm "7" \\ x'
    assert _json.loads(message.body)["id"] == 'crm "7" \\ x'


def test_hard_time_limits_follow_acks_on_failure_or_timeout_on_any_celery() -> None:
    from types import SimpleNamespace

    from celery_domain_events.consuming.task import _acks_on_timeout

    assert _acks_on_timeout(SimpleNamespace(acks_on_timeout=None))  # type: ignore[arg-type]
    assert not _acks_on_timeout(
        SimpleNamespace(acks_on_timeout=None, acks_on_failure_or_timeout=False)  # type: ignore[arg-type]
    )
    assert not _acks_on_timeout(SimpleNamespace(acks_on_timeout=False))  # type: ignore[arg-type]


def test_a_web_process_never_imports_the_worker_side() -> None:
    # The bootsteps are registered by dotted path: Celery imports them when a worker starts.
    code = (
        "import sys\n"
        "from celery import Celery\n"
        "from celery_domain_events import DomainEvents, domain_event_handler, emit\n"
        "from celery_domain_events.contrib.sqlalchemy import install\n"
        "app = Celery('web', broker='memory://', set_as_current=False)\n"
        "DomainEvents(app, service='web')\n"
        "@domain_event_handler('web.thing')\n"
        "def on_thing(event): ...\n"
        "app.finalize()\n"
        "emit('web.thing', {})\n"
        "worker = [m for m in sys.modules if m.endswith(('.bootstep', '.delivery'))]\n"
        "print(worker)\n"
        "steps = sorted(str(s) for s in app.steps['consumer'] | app.steps['worker'])\n"
        "print(steps)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded, steps = result.stdout.splitlines()
    assert loaded == "[]"
    assert "celery_domain_events.consuming.bootstep:DomainEventsStep" in steps


def test_a_transport_passed_in_receives_every_publish() -> None:
    from celery_domain_events.amqp.transport import Transport
    from celery_domain_events.wire.message import OutboundMessage

    class Recording:
        def __init__(self) -> None:
            self.batches: list[list[OutboundMessage]] = []

        def publish(self, messages: Any, declare: Any = ()) -> None:
            self.batches.append(list(messages))

    transport = Recording()
    assert isinstance(transport, Transport)
    app = Celery("seam", broker="amqp://guest:guest@127.0.0.1:1//", set_as_current=False)
    DomainEvents(app, service="seam", transport=transport)
    emit("seam.thing", {"n": 1})
    [sent] = transmit(app)
    [[message]] = transport.batches
    assert message.routing_key == "seam.thing"
    assert message.properties["message_id"] == sent.event_id


def test_a_refused_dead_letter_holds_the_queue_15_s_doubling_to_300_s() -> None:
    # The README's numbers for the hold, and that operators' pause/resume override it.
    from celery_domain_events.consuming import bootstep

    class Timer:
        def __init__(self) -> None:
            self.delays: list[float] = []

        def call_after(self, delay: float, fun: Any, args: Any) -> Any:
            self.delays.append(delay)
            return type("Entry", (), {"cancel": lambda self: None})()

    class Consumer:
        def __init__(self) -> None:
            self.consuming = True

        def consuming_from(self, queue: str) -> bool:
            return self.consuming

        def cancel_by_queue(self, queue: str) -> None:
            self.consuming = False

        def add_queue(self, queue: Any) -> None:
            self.consuming = True

        def consume(self) -> None: ...

    step = bootstep.DomainEventsStep.__new__(bootstep.DomainEventsStep)
    consumer = Consumer()
    step.by_queue = {"svc.h": (consumer, SimpleNamespace(name="svc.h"))}
    step.paused, step.held, step.backoff, step.timer = set(), {}, {}, Timer()
    step.aliases, step.transient = {}, {}
    for _ in range(8):
        step.hold("svc.h")
        assert not consumer.consuming  # held: not consumed
        step._end_hold("svc.h")
        assert consumer.consuming
    assert step.timer.delays == [15, 30, 60, 120, 240, 300, 300, 300]
    step.hold("svc.h")
    step.resume("svc.h")  # an operator's add_consumer ends the hold at once
    assert step.held == {}
    assert consumer.consuming


def test_the_default_retry_policy_backs_off_exponentially_with_jitter() -> None:
    from celery_domain_events import RetryPolicy, domain_event_handler
    from celery_domain_events.consuming.task import _countdown

    @domain_event_handler("units.retry.default", name="units_retry_default")
    def default_policy(event: GenericEvent) -> None: ...

    app = Celery("units_retry", set_as_current=False)
    DomainEvents(app, service="units", handlers=["units_retry_default"])
    app.finalize()
    task = app.tasks[DomainEvents.of(app).handlers[0].task_name]
    # Celery's autoretry reads these: 2**n seconds (n retries made), at most 600, jittered.
    assert (task.max_retries, task.retry_backoff, task.retry_backoff_max, task.retry_jitter) == (
        3,
        True,
        600,
        True,
    )
    assert set(task.autoretry_for) == {Exception}
    # A batch handler's items are retried by the same formula, computed by the library.
    assert [_countdown(RetryPolicy(jitter=False), n) for n in range(5)] == [1, 2, 4, 8, 16]
    assert _countdown(RetryPolicy(jitter=False, backoff_max=5), 10) == 5
    assert all(0 <= _countdown(RetryPolicy(), n) <= 2**n for n in range(8) for _ in range(20))
    assert _countdown(RetryPolicy(backoff=False, countdown=7), 3) == 7
