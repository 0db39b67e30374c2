"""`catalogue diff` and `catalogue check`: breaking-change rules between catalogues, in process.

Catalogues are built from registries of their own (no broker); a case that no model can
express (a required field with a default) edits the JSON by hand.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar, Literal

import pytest
from click.testing import CliRunner
from pydantic import BaseModel, ConfigDict

from celery_domain_events import DomainEvent, GenericEvent, domain_event_handler
from celery_domain_events.events import default_events
from celery_domain_events.exceptions import CatalogueError
from celery_domain_events.ops import catalogue, schema_diff
from celery_domain_events.ops.cli import domain_events
from celery_domain_events.registry import HandlerRegistry
from celery_domain_events.upcasting import UpcasterRegistry, upcaster

from .conftest import ROOT
from .test_catalogue import errors, isolated_app
from .test_upcasting import PlacedV1, PlacedV2, PlacedV3, PlacedV4, add_currency, to_cents

Untyped = DomainEvent | GenericEvent


def event(name: str, version: int, cls: str, **fields: Any) -> type[DomainEvent]:
    """An event class made here, kept out of the default registry (other cases reuse its key).

    A field is a type, or (type, default).
    """
    annotations: dict[str, Any] = {"event_name": ClassVar[str], "event_version": ClassVar[int]}
    namespace: dict[str, Any] = {
        "__module__": __name__,
        "__qualname__": cls,
        "event_name": name,
        "event_version": version,
    }
    for key, spec in fields.items():
        if isinstance(spec, tuple):
            annotations[key], namespace[key] = spec
        else:
            annotations[key] = spec
    namespace["__annotations__"] = annotations
    with default_events.isolated():
        made: type[DomainEvent] = type(cls, (DomainEvent,), namespace)
    return made


def handler(name: str, pattern: str, takes: Any = Untyped) -> Any:
    """A handler taking ``takes`` (an event class or a union), in a registry of its own."""

    def fn(event: Any) -> None: ...

    fn.__annotations__ = {"event": takes, "return": None}
    fn.__name__ = fn.__qualname__ = name
    return domain_event_handler(pattern, name=name, registry=HandlerRegistry())(fn)


Status = Literal["new", "paid"]
BASE = {"order_id": int, "amount": float, "status": Status}
OrderV1 = event("order.placed", 1, "OrderPlaced", **BASE)
OrderV2 = event("order.placed", 2, "OrderPlacedV2", **BASE, currency=str)
Refunded = event("order.refunded", 1, "OrderRefunded", order_id=int)


class Address(BaseModel):
    street: str
    zip: str


class AddressNoZip(BaseModel):
    model_config = ConfigDict(title="Address")
    street: str


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sku: str


class ClosedPlus(BaseModel):
    model_config = ConfigDict(extra="forbid", title="Closed")
    sku: str
    qty: int = 1


@dataclass(frozen=True)
class Service:
    """One release of a service, as a catalogue is built from it."""

    models: tuple[type[DomainEvent], ...]
    handlers: tuple[Any, ...] = ()
    upcasters: tuple[tuple[str, int], ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    #: edits the built document by hand (a case no model expresses)
    edit: Callable[[dict[str, Any]], None] | None = None

    def document(self, version: str = "3.0.0") -> dict[str, Any]:
        upcasters = UpcasterRegistry()
        for name, from_version in self.upcasters:
            upcaster(name, from_version, registry=upcasters)(add_currency)
        ext = isolated_app(
            models=self.models,
            handler_fns=self.handlers,
            upcasters=upcasters,
            **self.settings,
        )
        document = catalogue.build(ext, version)
        if self.edit is not None:
            self.edit(document)
        assert errors(document, version) == []
        return document


def data_schema(document: dict[str, Any], message: str) -> dict[str, Any]:
    schema: dict[str, Any] = document["components"]["messages"][message]["payload"]
    return schema["properties"]["data"]  # type: ignore[no-any-return]


def required_with_default(document: dict[str, Any]) -> None:
    data = data_schema(document, "OrderPlacedV1")
    data["properties"]["currency"] = {"type": "string", "default": "EUR"}
    data["required"].append("currency")


def fields(**changed: Any) -> dict[str, Any]:
    return {k: v for k, v in {**BASE, **changed}.items() if v is not None}


on_orders = handler("bill", "order.placed")
on_v2 = handler("bill", "order.placed", OrderV2)
other = handler("audit", "user.*")
V1 = Service((OrderV1,))
V1_V2 = Service((OrderV1, OrderV2))

# (id, OLD, NEW, breaking, the kinds of change reported)
CASES: list[tuple[str, Service, Service, bool, set[str]]] = [
    ("unchanged", V1, V1, False, set()),
    (
        "removed field",
        V1,
        Service((event("order.placed", 1, "OrderPlaced", **fields(amount=None)),)),
        True,
        {"field-removed"},
    ),
    (
        "renamed field",
        V1,
        Service((event("order.placed", 1, "OrderPlaced", **fields(amount=None), total=float),)),
        True,
        {"field-renamed"},
    ),
    (
        "changed type",
        V1,
        Service((event("order.placed", 1, "OrderPlaced", **fields(amount=str)),)),
        True,
        {"type-changed"},
    ),
    (
        "made nullable",
        V1,
        Service((event("order.placed", 1, "OrderPlaced", **fields(amount=float | None)),)),
        True,
        {"type-changed"},
    ),
    (
        "new required field without default",
        V1,
        Service((event("order.placed", 1, "OrderPlaced", **BASE, currency=str),)),
        True,
        {"required-field-added"},
    ),
    (
        "new required field with a default",
        V1,
        Service((OrderV1,), edit=required_with_default),
        False,
        {"field-added"},
    ),
    (
        "new field with a default",
        V1,
        Service((event("order.placed", 1, "OrderPlaced", **BASE, currency=(str, "EUR")),)),
        False,
        {"field-added"},
    ),
    (
        "new optional field",
        V1,
        Service((event("order.placed", 1, "OrderPlaced", **BASE, note=(str | None, None)),)),
        False,
        {"field-added"},
    ),
    (
        "optional field made required",
        Service((event("order.placed", 1, "OrderPlaced", **BASE, note=(str | None, None)),)),
        Service((event("order.placed", 1, "OrderPlaced", **BASE, note=str | None),)),
        True,
        {"field-now-required"},
    ),
    (
        "narrowed enum",
        V1,
        Service((event("order.placed", 1, "OrderPlaced", **fields(status=Literal["new"])),)),
        True,
        {"enum-narrowed"},
    ),
    (
        "widened enum",
        V1,
        Service(
            (
                event(
                    "order.placed",
                    1,
                    "OrderPlaced",
                    **fields(status=Literal["new", "paid", "refunded"]),
                ),
            )
        ),
        False,
        {"enum-widened"},
    ),
    (
        "free field made an enum",
        Service((event("order.placed", 1, "OrderPlaced", **fields(status=str)),)),
        V1,
        True,
        {"enum-narrowed"},
    ),
    (
        "enum made a free field",
        V1,
        Service((event("order.placed", 1, "OrderPlaced", **fields(status=str)),)),
        False,
        {"enum-widened"},
    ),
    (
        "removed version still consumed",
        Service((OrderV1, OrderV2), handlers=(on_orders,)),
        Service((OrderV2,), handlers=(on_orders,)),
        True,
        {"version-removed-consumed"},
    ),
    (
        "removed version no longer consumed",
        Service((OrderV1, OrderV2), handlers=(other,)),
        Service((OrderV2,), handlers=(other,)),
        False,
        {"version-removed"},
    ),
    (
        "removed version still upcast",
        Service((OrderV1, OrderV2), handlers=(on_v2,), upcasters=(("order.placed", 1),)),
        Service((OrderV2,), handlers=(on_v2,), upcasters=(("order.placed", 1),)),
        False,
        {"version-removed"},
    ),
    (
        "removed event a typed handler is still bound to",
        Service((OrderV1, Refunded), handlers=(handler("bill", "order.*", OrderV1 | Refunded),)),
        Service((OrderV1,), handlers=(handler("bill", "order.*", OrderV1),)),
        True,
        {"version-removed-consumed"},
    ),
    (
        "removed event an untyped handler is still bound to",
        Service((OrderV1, Refunded), handlers=(handler("audit", "#"),)),
        Service((OrderV1,), handlers=(handler("audit", "#"),)),
        False,
        {"version-removed"},
    ),
    (
        "upcaster removed",
        Service((OrderV1, OrderV2), handlers=(on_v2,), upcasters=(("order.placed", 1),)),
        Service((OrderV1, OrderV2), handlers=(on_v2,)),
        True,
        {"accepts-narrowed"},
    ),
    ("new version", V1, V1_V2, False, {"version-added"}),
    (
        "changed routing key",
        V1,
        Service((OrderV1,), settings={"key_format": "petisco", "organization": "acme"}),
        True,
        {"routing-key-changed"},
    ),
    ("new event", V1, Service((OrderV1, Refunded)), False, {"event-added"}),
    ("new handler", V1, Service((OrderV1,), handlers=(other,)), False, {"handler-added"}),
    (
        "no longer published",
        V1_V2,
        Service((OrderV1, OrderV2), settings={"publishes": [OrderV2]}),
        False,
        {"send-removed"},
    ),
    (
        "$ref'd nested model changed",
        Service((event("order.placed", 1, "OrderPlaced", **BASE, address=Address),)),
        Service((event("order.placed", 1, "OrderPlaced", **BASE, address=AddressNoZip),)),
        True,
        {"field-removed"},
    ),
    (
        "field added to a closed nested model",
        Service((event("order.placed", 1, "OrderPlaced", **BASE, lines=list[Closed]),)),
        Service((event("order.placed", 1, "OrderPlaced", **BASE, lines=list[ClosedPlus]),)),
        True,
        {"field-added-closed"},
    ),
]


@pytest.mark.parametrize("asyncapi", catalogue.ASYNCAPI_VERSIONS)
@pytest.mark.parametrize(
    ("old", "new", "breaking", "kinds"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_diff_rules(
    old: Service, new: Service, breaking: bool, kinds: set[str], asyncapi: str
) -> None:
    changes = schema_diff.diff(
        schema_diff.read(old.document(asyncapi)), schema_diff.read(new.document(asyncapi))
    )
    assert {c.kind for c in changes} == kinds, [c.line() for c in changes]
    assert any(c.breaking for c in changes) is breaking
    for change in changes:
        assert change.line().startswith("BREAKING" if change.breaking else "compatible")


def test_the_changes_name_the_field_and_why() -> None:
    nested_old = Service((event("order.placed", 1, "OrderPlaced", **BASE, address=Address),))
    nested_new = Service(
        (event("order.placed", 1, "OrderPlaced", **fields(amount=str), address=AddressNoZip),)
    )
    old_doc, new_doc = nested_old.document(), nested_new.document()
    assert data_schema(old_doc, "OrderPlacedV1")["properties"]["address"] == {
        "$ref": "#/components/schemas/Address"
    }
    changes = schema_diff.diff(schema_diff.read(old_doc), schema_diff.read(new_doc))
    by_field = {c.field: c for c in changes}
    assert by_field["address.zip"].kind == "field-removed"
    assert by_field["address.zip"].detail == "removed (it was required)"
    assert by_field["amount"].detail == "number -> string"
    assert (
        by_field["amount"]
        .line()
        .startswith("BREAKING    order.placed v1, field amount: number -> string [type-changed: ")
    )


def test_a_renamed_event_class_is_the_same_message() -> None:
    # Messages are compared by (event name, version), not by the class's name.
    renamed = Service((event("order.placed", 1, "PlacedOrder", **BASE),))
    changes = schema_diff.diff(
        schema_diff.read(V1.document()), schema_diff.read(renamed.document())
    )
    assert changes == []


def test_a_recursive_model_is_compared_once() -> None:
    class Node(BaseModel):
        name: str
        children: list[Node] = []

    class NodeRenamed(BaseModel):
        model_config = ConfigDict(title="Node")
        label: str
        children: list[NodeRenamed] = []

    old = Service((event("tree.grown", 1, "Grown", root=Node),))
    new = Service((event("tree.grown", 1, "Grown", root=NodeRenamed),))
    changes = schema_diff.diff(schema_diff.read(old.document()), schema_diff.read(new.document()))
    assert [(c.kind, c.field) for c in changes] == [("field-renamed", "root.name")]


def test_unreadable_documents_are_catalogue_errors() -> None:
    with pytest.raises(CatalogueError, match="OLD: not an AsyncAPI document"):
        schema_diff.read({"openapi": "3.1.0"}, "OLD")
    with pytest.raises(CatalogueError, match=r"AsyncAPI 1\.2\.0 is not supported"):
        schema_diff.read({"asyncapi": "1.2.0"})
    document = V1.document()
    data_schema(document, "OrderPlacedV1")["properties"]["status"] = {"$ref": "#/nowhere"}
    with pytest.raises(CatalogueError, match="points at nothing"):
        schema_diff.diff(schema_diff.read(V1.document()), schema_diff.read(document))


# --- The CLI ---------------------------------------------------------------------------------


def run(tmp_path: Path, args: list[str], **documents: dict[str, Any]) -> Any:
    for name, document in documents.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(document))
    # No -A: diff and check only read files (the group's app is celery's default one).
    return CliRunner().invoke(
        domain_events, ["catalogue", *args], obj=SimpleNamespace(app=None), catch_exceptions=False
    )


def test_diff_exits_1_on_a_breaking_change_with_a_line_each(tmp_path: Path) -> None:
    old = Service((OrderV1,), handlers=(on_orders,)).document()
    new = Service(
        (event("order.placed", 1, "OrderPlaced", **fields(amount=None), note=(str, "")), Refunded),
        handlers=(on_orders,),
    ).document()
    result = run(
        tmp_path, ["diff", str(tmp_path / "old.json"), str(tmp_path / "new.json")], old=old, new=new
    )
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[-1] == "1 breaking, 2 compatible change(s)"
    assert any(
        line.startswith("BREAKING    order.placed v1, field amount: removed (it was required)")
        for line in lines
    )
    assert "compatible  order.placed v1, field note: new optional field" in result.output
    assert "compatible  order.refunded v1: new (published) [event-added" in result.output

    as_json = run(
        tmp_path, ["diff", "--json", str(tmp_path / "old.json"), str(tmp_path / "new.json")]
    )
    assert as_json.exit_code == 1
    report = json.loads(as_json.output)
    assert report["breaking"] is True
    assert report["summary"] == {"breaking": 1, "compatible": 2}
    removed = next(c for c in report["changes"] if c["kind"] == "field-removed")
    assert removed == {
        "kind": "field-removed",
        "breaking": True,
        "event": "order.placed",
        "version": 1,
        "field": "amount",
        "handler": None,
        "detail": "removed (it was required)",
        "rule": schema_diff.RULES["field-removed"][1],
    }


def test_diff_exits_0_on_compatible_changes_and_across_asyncapi_versions(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        ["diff", str(tmp_path / "old.json"), str(tmp_path / "new.json")],
        old=V1.document("2.6.0"),
        new=V1_V2.document("3.0.0"),
    )
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"compatible  order.placed v2: new (published) [version-added: "
        f"{schema_diff.RULES['version-added'][1]}]",
        "0 breaking, 1 compatible change(s)",
    ]
    same = run(tmp_path, ["diff", "--json", str(tmp_path / "old.json"), str(tmp_path / "old.json")])
    assert same.exit_code == 0
    assert json.loads(same.output) == {
        "breaking": False,
        "summary": {"breaking": 0, "compatible": 0},
        "changes": [],
    }


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file"),
        ("{not json", "Expecting property name"),
        ('{"openapi": "3.1.0"}', "not an AsyncAPI document"),
        ('{"asyncapi": "3.0.0", "components": {"messages": {"X": {"name": 1}}}}', "no event name"),
    ],
)
def test_unreadable_input_exits_2_in_one_line(
    tmp_path: Path, content: str | None, message: str
) -> None:
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    (tmp_path / "good.json").write_text(json.dumps(V1.document()))
    for args in (
        ["diff", str(tmp_path / "good.json"), str(bad)],
        ["check", "--producer", str(bad), "--consumer", str(tmp_path / "good.json")],
    ):
        result = CliRunner().invoke(domain_events, ["catalogue", *args], obj=None)
        assert result.exit_code == 2, result.output
        [line] = result.output.strip().splitlines()
        assert line.startswith("Error: "), line
        assert message in line, line
        assert str(bad) in line


def test_diff_runs_from_the_celery_command_without_an_app(tmp_path: Path) -> None:
    (tmp_path / "old.json").write_text(json.dumps(V1_V2.document()))
    (tmp_path / "new.json").write_text(json.dumps(V1.document()))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery",
            "domain-events",
            "catalogue",
            "diff",
            str(tmp_path / "old.json"),
            str(tmp_path / "new.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "compatible  order.placed v2: removed; no handler here is bound to it" in result.stdout


# --- catalogue check: a producer against a consumer ------------------------------------------


def upcasters_1_to_3() -> UpcasterRegistry:
    registry = UpcasterRegistry()
    upcaster("up.order.placed", 1, registry=registry)(add_currency)
    upcaster(to_cents, registry=registry)
    return registry


PRODUCER = Service((), settings={"publishes": [PlacedV1, PlacedV4], "service": "shop"})


def consumer(
    *handlers: Any, models: tuple[type[DomainEvent], ...] = (PlacedV1, PlacedV2, PlacedV3)
) -> dict[str, Any]:
    ext = isolated_app(
        models=models,
        handler_fns=handlers,
        upcasters=upcasters_1_to_3(),
        service="billing",
        publishes=[],
    )
    return catalogue.build(ext, "3.0.0")


up_v3 = handler("up_v3", "up.order.placed", PlacedV3)
up_any = handler("up_any", "up.order.*")
up_shipped = handler("up_shipped", "up.order.shipped")


def test_check_reports_a_version_a_bound_handler_cannot_decode() -> None:
    deliveries = schema_diff.check(
        schema_diff.read(PRODUCER.document()),
        schema_diff.read(consumer(up_v3, up_shipped)),
    )
    # up_shipped is bound to another routing key: it is not considered.
    assert [(d.handler, d.version, d.decodable) for d in deliveries] == [
        ("up_v3", 1, True),  # upcast v1 -> v2 -> v3
        ("up_v3", 4, False),  # newer than v3: never downcast
    ]
    assert deliveries[0].accepts == {1, 2, 3}
    assert deliveries[0].reason == "decodes it, upcast to v3 (it takes v1, v2, v3)"
    assert "v4 is newer than every version it decodes (v1, v2, v3)" in deliveries[1].reason
    assert deliveries[1].queue == "billing.up_v3"
    assert deliveries[1].line().startswith("PROBLEM   up.order.placed v4 -> handler up_v3: ")


def test_check_an_untyped_handler_decodes_what_its_service_has_models_for() -> None:
    producer = schema_diff.read(PRODUCER.document())
    knows_v4 = schema_diff.check(
        producer, schema_diff.read(consumer(up_any, models=(PlacedV1, PlacedV4)))
    )
    assert [(d.version, d.decodable) for d in knows_v4] == [(1, True), (4, True)]
    no_model = schema_diff.check(producer, schema_diff.read(consumer(up_any, models=())))
    assert [(d.version, d.decodable) for d in no_model] == [(1, True), (4, True)]
    assert "received untyped (GenericEvent)" in no_model[0].reason
    # With models of v1-v3 only, a worker refuses v4 as unknown: so does the check.
    knows_v3 = schema_diff.check(producer, schema_diff.read(consumer(up_any)))
    assert [(d.version, d.decodable) for d in knows_v3] == [(1, True), (4, False)]


def test_check_without_upcasters_reports_the_old_version() -> None:
    ext = isolated_app(models=(PlacedV1, PlacedV2, PlacedV3), handler_fns=(up_v3,), publishes=[])
    deliveries = schema_diff.check(
        schema_diff.read(PRODUCER.document()), schema_diff.read(catalogue.build(ext, "2.6.0"))
    )
    assert [(d.version, d.decodable) for d in deliveries] == [(1, False), (4, False)]
    assert "no upcaster chain from v1 to a version it takes" in deliveries[0].reason
    assert "@upcaster('up.order.placed', from_version=...)" in deliveries[0].reason


def test_check_cli_exit_codes_and_json(tmp_path: Path) -> None:
    producer = tmp_path / "producer.json"
    producer.write_text(json.dumps(PRODUCER.document("2.6.0")))
    bad, good = tmp_path / "bad.json", tmp_path / "good.json"
    bad.write_text(json.dumps(consumer(up_v3, up_any)))
    good.write_text(json.dumps(consumer(up_any, models=(PlacedV1, PlacedV4))))

    result = CliRunner().invoke(
        domain_events, ["catalogue", "check", "--producer", str(producer), "--consumer", str(bad)]
    )
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[-1] == (
        "2 problem(s) in 4 pairing(s) of a sent event version with a handler bound to it "
        "(shop -> billing)"
    )
    assert lines[0].startswith("ok        up.order.placed v1 -> handler up_any: decodes it")

    report = CliRunner().invoke(
        domain_events,
        ["catalogue", "check", "--json", "--producer", str(producer), "--consumer", str(good)],
    )
    assert report.exit_code == 0, report.output
    parsed = json.loads(report.output)
    assert parsed["ok"] is True
    assert (parsed["producer"], parsed["consumer"]) == ("shop", "billing")
    assert parsed["deliveries"][1] == {
        "event": "up.order.placed",
        "version": 4,
        "routing_key": "up.order.placed",
        "handler": "up_any",
        "queue": "billing.up_any",
        "accepts": [1, 4],
        "decodable": True,
        "reason": "decodes it (it takes v1, v4)",
    }


def test_check_needs_the_accepts_of_a_bound_handler(tmp_path: Path) -> None:
    document = consumer(up_v3)
    del document["operations"]["up_v3"]["x-celery-domain-events"]["accepts"]
    with pytest.raises(CatalogueError, match="handler up_v3 does not say which versions"):
        schema_diff.check(schema_diff.read(PRODUCER.document()), schema_diff.read(document))


def strip_extensions(document: dict[str, Any]) -> dict[str, Any]:
    """The document as catalogues written before #14 were: no extension but on handlers."""
    document.pop("x-celery-domain-events")
    for message in document["components"]["messages"].values():
        message.pop("x-celery-domain-events")
    operations = list(document.get("operations", {}).values()) + [
        c["publish"] for c in document["channels"].values() if "publish" in c
    ]
    for operation in operations:
        operation.get("x-celery-domain-events", {}).pop("accepts", None)
        operation.get("x-celery-domain-events", {}).pop("declares", None)
    return document


@pytest.mark.parametrize("asyncapi", catalogue.ASYNCAPI_VERSIONS)
def test_an_old_catalogue_without_the_new_fields_is_read(asyncapi: str) -> None:
    service = Service((OrderV1, OrderV2), handlers=(on_orders,))
    old = schema_diff.read(strip_extensions(service.document(asyncapi)))
    assert old.service is None
    # Routing keys come from the channels then; which versions handlers decode is unknown.
    assert {m.routing_key for m in old.messages.values()} == {"order.placed"}
    assert old.handlers["bill"].accepts is None
    assert old.sent == {("order.placed", 1), ("order.placed", 2)}
    assert schema_diff.diff(old, schema_diff.read(service.document(asyncapi))) == []
    # Without accepts, a removed version a handler is bound to counts as still consumed.
    changes = schema_diff.diff(old, schema_diff.read(strip_extensions(V1.document(asyncapi))))
    assert [c.kind for c in changes] == ["version-removed", "handler-removed"]
    bound = Service((OrderV1,), handlers=(on_orders,)).document(asyncapi)
    changes = schema_diff.diff(old, schema_diff.read(strip_extensions(bound)))
    assert [c.kind for c in changes] == ["version-removed-consumed"]


def test_the_docs_list_every_rule_as_the_code_applies_it() -> None:
    page = (ROOT / "docs" / "operations" / "catalogue.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([a-z-]+)` \| (breaking|compatible) \| (.+) \|$", page, re.M)
    documented = {
        kind: (verdict == "breaking", rule.replace("`", "")) for kind, verdict, rule in rows
    }
    assert documented == {k: (b, r.replace("`", "")) for k, (b, r) in schema_diff.RULES.items()}


def test_diff_refuses_catalogues_of_two_services(tmp_path: Path) -> None:
    old = Service((OrderV1,), handlers=(on_orders,)).document()
    new = Service((OrderV1,), handlers=(on_orders,), settings={"service": "billing"}).document()
    result = run(
        tmp_path, ["diff", str(tmp_path / "old.json"), str(tmp_path / "new.json")], old=old, new=new
    )
    assert result.exit_code == 2, result.output
    assert "compares two releases of one service" in result.output
