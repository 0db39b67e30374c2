"""Compare catalogues: a service's old and new release, or a producer and a consumer.

Pure: it reads the AsyncAPI documents :func:`celery_domain_events.ops.catalogue.build` writes
(2.6.0 or 3.0.0, parsed JSON), and returns findings; the CLI prints them.

* :func:`diff` compares two catalogues of one service (old release, new release) and lists each
  change with its kind, whether it breaks, and why (:data:`RULES`). Schemas are compared on the
  JSON schema of each event's ``data``, ``$ref`` resolved, field by field.
* :func:`check` pairs every event version a producer sends with every handler of a consumer
  bound to its routing key, and says whether the handler can decode that version (its
  ``accepts``, which counts upcasters).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from celery_domain_events.exceptions import CatalogueError
from celery_domain_events.routing import matches

from .catalogue import ANY_VERSION, EXTENSION

__all__ = [
    "RULES",
    "Catalogue",
    "Change",
    "Delivery",
    "Handler",
    "Message",
    "check",
    "diff",
    "read",
]

#: Every kind of change :func:`diff` reports: kind -> (breaking, the rule).
RULES: dict[str, tuple[bool, str]] = {
    "field-removed": (
        True,
        "a field of the data is gone: readers on the old schema that require it reject new "
        "events, and code reading it gets its default or fails",
    ),
    "field-renamed": (
        True,
        "a field is gone and another with the same schema is new: readers of the old name "
        "break as for a removed field",
    ),
    "type-changed": (
        True,
        "the JSON type of a field changed (made nullable, a union, integer to number "
        "included): one side rejects what the other writes",
    ),
    "required-field-added": (
        True,
        "a new required field without a default: events without it (from an older producer, "
        "an outbox, a DLQ) fail validation",
    ),
    "field-now-required": (
        True,
        "an optional field is now required, without a default: events without it fail",
    ),
    "field-added-closed": (
        True,
        "a field was added to a nested object that forbids unknown fields "
        "(additionalProperties: false): readers on the old schema reject new events",
    ),
    "enum-narrowed": (
        True,
        "an enum lost values (or a free field became an enum): events with those values fail",
    ),
    "routing-key-changed": (
        True,
        "the event is published with another routing key (channel address): queues bound to "
        "the old one no longer receive it",
    ),
    "version-removed-consumed": (
        True,
        "an event version is gone while a handler here is bound to its routing key and "
        "cannot decode it any more (no model, no upcaster chain; a whole event gone reaches a "
        "handler typed for it untyped): such events in queues, DLQs or still published become "
        "poison",
    ),
    "accepts-narrowed": (
        True,
        "a handler no longer decodes a version it did (an upcaster or a model removed, an "
        "annotation changed): such events in its queue, its DLQ or still published become "
        "poison",
    ),
    "field-added": (
        False,
        "a new optional field, or a required one with a default: readers ignore fields they "
        "do not know, and new readers fill the default",
    ),
    "field-no-longer-required": (False, "a required field became optional"),
    "enum-widened": (
        False,
        "an enum gained values: new readers read every old event (consumers still on the old "
        "schema reject the new values: upgrade them before sending those)",
    ),
    "event-added": (False, "a new event"),
    "version-added": (False, "a new version of an event"),
    "version-removed": (
        False,
        "an event version is gone and no handler here still needs it (other services may: "
        "run `catalogue check` against them)",
    ),
    "send-added": (False, "the service now publishes this version"),
    "send-removed": (
        False,
        "the service no longer publishes this version (its consumers elsewhere stop getting "
        "it: run `catalogue check` against them)",
    ),
    "handler-added": (False, "a new handler"),
    "handler-removed": (
        False,
        "a handler is gone (its queue stays until `topology diff --prune` and a manual delete)",
    ),
    "accepts-widened": (False, "a handler decodes versions it did not"),
}

#: A version set meaning "any version" (an untyped handler of an event with no model).
Versions = frozenset[int] | None


@dataclass(frozen=True)
class Message:
    """One version of an event in a catalogue."""

    event: str
    version: int
    #: None when the catalogue does not say (no extension field, no routing-key channel).
    routing_key: str | None
    #: The JSON schema of the event's ``data`` (``$ref`` left as written).
    data: Mapping[str, Any]


@dataclass(frozen=True)
class Handler:
    """A handler (a ``receive`` operation) in a catalogue."""

    name: str
    queue: str | None
    patterns: tuple[str, ...]
    #: event name -> versions it decodes (None: any); None if the catalogue does not say.
    accepts: Mapping[str, Versions] | None
    #: event name -> versions its annotation names ({} if untyped); None if not said.
    declares: Mapping[str, frozenset[int]] | None = None

    def binds(self, routing_key: str) -> bool:
        """Whether one of the handler's binding patterns matches ``routing_key``."""
        return any(matches(p, routing_key) for p in self.patterns)


@dataclass(frozen=True)
class Catalogue:
    """What :func:`diff` and :func:`check` need of one catalogue document."""

    document: Mapping[str, Any]
    service: str | None
    messages: Mapping[tuple[str, int], Message]
    #: (event, version) of every message a ``send`` operation lists.
    sent: frozenset[tuple[str, int]]
    handlers: Mapping[str, Handler]


@dataclass(frozen=True)
class Change:
    """One difference between two catalogues."""

    kind: str
    #: What changed, in words: "removed", "integer -> string", ...
    detail: str
    event: str | None = None
    version: int | None = None
    #: Dotted path of the field in ``data`` (``lines[].sku``); None for the whole event.
    field: str | None = None
    handler: str | None = None

    @property
    def breaking(self) -> bool:
        """Whether the change breaks a reader or a writer (:data:`RULES`)."""
        return RULES[self.kind][0]

    @property
    def rule(self) -> str:
        """Why a change of this kind breaks, or does not."""
        return RULES[self.kind][1]

    def line(self) -> str:
        """The change as one line of the report."""
        if self.handler is not None:
            subject = f"handler {self.handler}"
            if self.event is not None:
                subject += f", {self.event}"
                subject += "" if self.version is None else f" v{self.version}"
        else:
            subject = f"{self.event}" + ("" if self.version is None else f" v{self.version}")
            if self.field is not None:
                subject += f", field {self.field}"
        verdict = "BREAKING  " if self.breaking else "compatible"
        return f"{verdict}  {subject}: {self.detail} [{self.kind}: {self.rule}]"

    def as_dict(self) -> dict[str, Any]:
        """The change for ``--json``."""
        return {
            "kind": self.kind,
            "breaking": self.breaking,
            "event": self.event,
            "version": self.version,
            "field": self.field,
            "handler": self.handler,
            "detail": self.detail,
            "rule": self.rule,
        }


@dataclass(frozen=True)
class Delivery:
    """One event version a producer sends, reaching one handler of a consumer."""

    event: str
    version: int
    routing_key: str
    handler: str
    queue: str | None
    #: The versions the handler decodes (None: any).
    accepts: Versions
    decodable: bool
    reason: str

    def line(self) -> str:
        """The delivery as one line of the report."""
        verdict = "ok      " if self.decodable else "PROBLEM "
        return f"{verdict}  {self.event} v{self.version} -> handler {self.handler}: {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        """The delivery for ``--json``."""
        return {
            "event": self.event,
            "version": self.version,
            "routing_key": self.routing_key,
            "handler": self.handler,
            "queue": self.queue,
            "accepts": ANY_VERSION if self.accepts is None else sorted(self.accepts),
            "decodable": self.decodable,
            "reason": self.reason,
        }


# --- Reading a catalogue -----------------------------------------------------------------------


def read(document: Any, source: str = "catalogue") -> Catalogue:
    """Read a catalogue document (parsed JSON) of either AsyncAPI version.

    Catalogues written before the ``x-celery-domain-events`` fields on messages existed are
    read too: routing keys come from the channels then, and handlers have no ``accepts``.

    Raises:
        CatalogueError: ``document`` is not an AsyncAPI 2 or 3 document with readable messages;
            the message starts with ``source``.
    """
    if not isinstance(document, dict) or not isinstance(document.get("asyncapi"), str):
        raise CatalogueError(f"{source}: not an AsyncAPI document (no 'asyncapi' version)")
    major = document["asyncapi"].split(".", 1)[0]
    if major not in ("2", "3"):
        raise CatalogueError(f"{source}: AsyncAPI {document['asyncapi']} is not supported")
    try:
        return _Reader(document, source, v3=major == "3").catalogue()
    except CatalogueError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CatalogueError(
            f"{source}: malformed catalogue ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None


def _pointer(document: Mapping[str, Any], ref: Any, source: str) -> Any:
    if not isinstance(ref, str) or not ref.startswith("#/"):
        raise CatalogueError(f"{source}: only local $refs are supported, got {ref!r}")
    node: Any = document
    for escaped in ref[2:].split("/"):
        part = escaped.replace("~1", "/").replace("~0", "~")
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise CatalogueError(f"{source}: $ref {ref} points at nothing")
    return node


def _deref(document: Mapping[str, Any], node: Any, source: str) -> Any:
    for _ in range(32):
        if not (isinstance(node, dict) and "$ref" in node):
            return node
        node = _pointer(document, node["$ref"], source)
    raise CatalogueError(f"{source}: $ref chain too long (a cycle?)")


class _Reader:
    def __init__(self, document: dict[str, Any], source: str, *, v3: bool) -> None:
        self.doc = document
        self.source = source
        self.v3 = v3
        self.messages: dict[tuple[str, int], Message] = {}
        self.by_id: dict[int, tuple[str, int]] = {}  # id() of a message object -> its key

    def catalogue(self) -> Catalogue:
        components = self.doc.get("components") or {}
        for message in (components.get("messages") or {}).values():
            self._message(_deref(self.doc, message, self.source), None)
        channels: dict[str, Any] = self.doc.get("channels") or {}
        sent: set[tuple[str, int]] = set()
        handlers: dict[str, Handler] = {}
        for name, written in channels.items():
            channel = _deref(self.doc, written, self.source)
            self._routing_keys(name, channel)
            if not self.v3:
                # AsyncAPI 2: "subscribe" is what the application sends, "publish" what it gets.
                sent.update(self._keys(channel.get("subscribe", {}).get("message"), None))
                self._handler(channel.get("publish"), handlers)
        if self.v3:
            for written in (self.doc.get("operations") or {}).values():
                operation = _deref(self.doc, written, self.source)
                if operation.get("action") == "send":
                    sent.update(self._sent_v3(operation))
                elif operation.get("action") == "receive":
                    self._handler(operation, handlers)
        root = self.doc.get(EXTENSION) or {}
        return Catalogue(
            document=self.doc,
            service=root.get("service") if isinstance(root, dict) else None,
            messages=self.messages,
            sent=frozenset(sent),
            handlers=handlers,
        )

    def _message(self, message: Any, routing_key: str | None) -> tuple[str, int]:
        """Record a message object; return its (event, version)."""
        if not isinstance(message, dict):
            raise CatalogueError(f"{self.source}: a message is not an object")
        if id(message) in self.by_id:
            return self.by_id[id(message)]
        written = message.get(EXTENSION)
        ext: dict[str, Any] = written if isinstance(written, dict) else {}
        payload = _deref(self.doc, message.get("payload") or {}, self.source)
        properties = payload.get("properties") or {}
        event = ext.get("event", message.get("name") or properties.get("type", {}).get("const"))
        version = ext.get("version", properties.get("eventversion", {}).get("const"))
        if not isinstance(event, str) or not isinstance(version, int):
            raise CatalogueError(
                f"{self.source}: message {message.get('title') or message.get('name')!r} "
                "has no event name and version (name, payload eventversion)"
            )
        key = (event, version)
        known = self.messages.get(key)
        data = _deref(self.doc, properties.get("data") or {}, self.source)
        routing_key = ext.get("routingKey") or routing_key or (known.routing_key if known else None)
        self.messages[key] = Message(event, version, routing_key or None, data)
        self.by_id[id(message)] = key
        return key

    def _keys(self, refs: Any, routing_key: str | None) -> Iterator[tuple[str, int]]:
        """The (event, version) of a message, a $ref, a list of them or ``oneOf``."""
        if refs is None:
            return
        if isinstance(refs, list):
            for ref in refs:
                yield from self._keys(ref, routing_key)
            return
        node = _deref(self.doc, refs, self.source)
        if isinstance(node, dict) and "oneOf" in node and "payload" not in node:
            yield from self._keys(node["oneOf"], routing_key)
            return
        yield self._message(node, routing_key)

    def _routing_keys(self, name: str, channel: dict[str, Any]) -> None:
        """Fill in the routing keys of messages on a routing-key channel (older catalogues)."""
        amqp = (channel.get("bindings") or {}).get("amqp") or {}
        if amqp.get("is", "routingKey") != "routingKey":
            return
        if self.v3:
            address = channel.get("address")
            refs: Any = list((channel.get("messages") or {}).values())
        else:
            address = name
            refs = (channel.get("subscribe") or {}).get("message")
        if not isinstance(address, str):
            return
        for key in list(self._keys(refs, address)):
            message = self.messages[key]
            if message.routing_key is None:
                self.messages[key] = Message(key[0], key[1], address, message.data)

    def _sent_v3(self, operation: dict[str, Any]) -> Iterator[tuple[str, int]]:
        refs = operation.get("messages")
        if not refs:  # no list: every message of the channel
            channel = _deref(self.doc, operation.get("channel"), self.source)
            refs = list((channel.get("messages") or {}).values())
        yield from self._keys(refs, None)

    def _handler(self, operation: Any, handlers: dict[str, Handler]) -> None:
        if not isinstance(operation, dict) or not isinstance(operation.get(EXTENSION), dict):
            return  # not a handler this library wrote
        ext = operation[EXTENSION]
        name, patterns = ext.get("handler"), ext.get("patterns")
        if not isinstance(name, str) or not isinstance(patterns, list):
            raise CatalogueError(f"{self.source}: a handler has no name or no patterns")
        accepts, declares = ext.get("accepts"), ext.get("declares")
        handlers[name] = Handler(
            name=name,
            queue=ext.get("queue"),
            patterns=tuple(str(p) for p in patterns),
            accepts=None if accepts is None else self._accepts(name, accepts),
            declares=None if declares is None else self._declares(name, declares),
        )

    def _declares(self, handler: str, declares: Any) -> dict[str, frozenset[int]]:
        parsed = self._accepts(handler, declares)
        return {event: frozenset(versions or ()) for event, versions in parsed.items()}

    def _accepts(self, handler: str, accepts: Any) -> dict[str, Versions]:
        if not isinstance(accepts, dict):
            raise CatalogueError(f"{self.source}: accepts of handler {handler} is not an object")
        parsed: dict[str, Versions] = {}
        for event, versions in accepts.items():
            if versions == ANY_VERSION:
                parsed[event] = None
            elif isinstance(versions, list) and all(type(v) is int for v in versions):
                parsed[event] = frozenset(versions)
            else:
                raise CatalogueError(
                    f"{self.source}: accepts of handler {handler} for {event!r} is neither "
                    f"{ANY_VERSION!r} nor a list of versions"
                )
        return parsed


# --- Comparing two schemas ---------------------------------------------------------------------

_MAX_DEPTH = 16  # of nested unions, before a schema counts as unrestricted
_IGNORED = frozenset({"title", "description", "examples", "default"})


def _show(values: Any) -> str:
    return ", ".join(json.dumps(v) for v in sorted(values, key=json.dumps))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


@dataclass
class _Side:
    """One catalogue's view of a schema: its document, to resolve ``$ref`` in."""

    document: Mapping[str, Any]
    source: str

    def resolve(self, node: Any) -> tuple[dict[str, Any], str | None]:
        """The schema behind ``node`` (its $ref and a lone allOf followed), and its ref."""
        ref = None
        for _ in range(32):
            if not isinstance(node, dict):
                return {}, ref
            if "$ref" in node:
                ref = node["$ref"]
                target = _pointer(self.document, ref, self.source)
                # Siblings of $ref (a description, a default) describe the same value.
                node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
                continue
            parts = node.get("allOf")
            if isinstance(parts, list) and len(parts) == 1 and "type" not in node:
                node = {**parts[0], **{k: v for k, v in node.items() if k != "allOf"}}
                continue
            return node, ref
        raise CatalogueError(f"{self.source}: $ref chain too long (a cycle?)")

    def types(self, node: Any, depth: int = 0) -> frozenset[str]:
        """The JSON types a schema admits (``any`` for an unconstrained one)."""
        schema, _ = self.resolve(node)
        found: set[str] = set()
        if "type" in schema:
            kind = schema["type"]
            found.update(kind if isinstance(kind, list) else [kind])
        elif "const" in schema:
            found.add(_json_type(schema["const"]))
        elif "enum" in schema:
            found.update(_json_type(v) for v in schema["enum"])
        elif "properties" in schema:
            found.add("object")
        elif "items" in schema:
            found.add("array")
        for key in ("anyOf", "oneOf"):
            for member in (schema.get(key) or []) if depth < _MAX_DEPTH else []:
                found.update(self.types(member, depth + 1))
        return frozenset(found or {"any"})

    def values(self, node: Any, depth: int = 0) -> frozenset[str] | None:
        """The JSON-encoded values an enum or const allows; None if not restricted."""
        schema, _ = self.resolve(node)
        if "const" in schema:
            return frozenset({json.dumps(schema["const"])})
        if "enum" in schema:
            return frozenset(json.dumps(v) for v in schema["enum"])
        members = schema.get("anyOf") or schema.get("oneOf") or []
        if depth >= _MAX_DEPTH:
            return None
        if not members:
            return None
        found: set[str] = set()
        for member in members:
            if self.types(member) == {"null"}:
                found.add("null")
                continue
            allowed = self.values(member, depth + 1)
            if allowed is None:
                return None
            found.update(allowed)
        return frozenset(found)

    def objects(self, node: Any) -> list[tuple[dict[str, Any], str | None]]:
        """The object schemas a schema is, or is a union of (``Optional[Model]``)."""
        schema, ref = self.resolve(node)
        if "properties" in schema or schema.get("type") == "object":
            return [(schema, ref)]
        found = []
        for member in schema.get("anyOf") or schema.get("oneOf") or []:
            inner, inner_ref = self.resolve(member)
            if "properties" in inner or inner.get("type") == "object":
                found.append((inner, inner_ref))
        return found

    def normalized(self, node: Any) -> str:
        """The schema as text, without titles and descriptions (to spot renamed fields)."""
        schema = {k: v for k, v in (node or {}).items() if k not in _IGNORED}
        return json.dumps(schema, sort_keys=True)


@dataclass
class _SchemaDiff:
    old: _Side
    new: _Side
    event: str
    version: int
    changes: list[Change] = field(default_factory=list)

    def add(self, kind: str, path: str, detail: str) -> None:
        self.changes.append(Change(kind, detail, self.event, self.version, path or None))

    def compare(self, old: Any, new: Any, path: str, seen: frozenset[tuple[str, str]]) -> None:
        old_schema, old_ref = self.old.resolve(old)
        new_schema, new_ref = self.new.resolve(new)
        if old_ref is not None and new_ref is not None:
            if (old_ref, new_ref) in seen:
                return  # a recursive model, already being compared
            seen = seen | {(old_ref, new_ref)}
        old_types, new_types = self.old.types(old_schema), self.new.types(new_schema)
        if old_types != new_types:
            self.add(
                "type-changed",
                path,
                f"{'|'.join(sorted(old_types))} -> {'|'.join(sorted(new_types))}",
            )
            return
        self._enum(old_schema, new_schema, path)
        old_objects, new_objects = self.old.objects(old_schema), self.new.objects(new_schema)
        for (old_object, _), (new_object, _) in _pair(old_objects, new_objects):
            self._object(old_object, new_object, path, seen)
        if "array" in old_types and isinstance(old_schema.get("items"), dict):
            self.compare(old_schema["items"], new_schema.get("items"), f"{path}[]", seen)
        old_extra, new_extra = (
            old_schema.get("additionalProperties"),
            new_schema.get("additionalProperties"),
        )
        if isinstance(old_extra, dict) and isinstance(new_extra, dict):
            self.compare(old_extra, new_extra, f"{path}{{}}", seen)

    def _enum(self, old: dict[str, Any], new: dict[str, Any], path: str) -> None:
        before, after = self.old.values(old), self.new.values(new)
        if before == after:
            return
        if after is None:
            self.add("enum-widened", path, "no longer restricted to a set of values")
            return
        if before is None:
            self.add("enum-narrowed", path, f"now only {_show(json.loads(v) for v in after)}")
            return
        if before - after:
            removed = _show(json.loads(v) for v in before - after)
            self.add("enum-narrowed", path, f"value(s) removed: {removed}")
        if after - before:
            added = _show(json.loads(v) for v in after - before)
            self.add("enum-widened", path, f"value(s) added: {added}")

    def _object(
        self,
        old: dict[str, Any],
        new: dict[str, Any],
        path: str,
        seen: frozenset[tuple[str, str]],
    ) -> None:
        old_props: dict[str, Any] = old.get("properties") or {}
        new_props: dict[str, Any] = new.get("properties") or {}
        old_required = set(old.get("required") or [])
        new_required = set(new.get("required") or [])
        removed = [p for p in old_props if p not in new_props]
        added = [p for p in new_props if p not in old_props]
        prefix = f"{path}." if path else ""
        for name in removed:
            twin = next(
                (
                    a
                    for a in added
                    if self.new.normalized(new_props[a]) == self.old.normalized(old_props[name])
                ),
                None,
            )
            if twin is not None:
                added.remove(twin)
                self.add("field-renamed", prefix + name, f"renamed to {twin}?")
                continue
            required = "required" if name in old_required else "optional"
            self.add("field-removed", prefix + name, f"removed (it was {required})")
        for name in added:
            has_default = "default" in self.new.resolve(new_props[name])[0]
            # The top level of data is read tolerantly (unknown fields are ignored); a nested
            # object is read by its own model, which may forbid them.
            if path and old.get("additionalProperties") is False:
                self.add("field-added-closed", prefix + name, "new field in a closed object")
            elif name in new_required and not has_default:
                self.add("required-field-added", prefix + name, "new required field, no default")
            elif name in new_required:
                self.add("field-added", prefix + name, "new required field with a default")
            else:
                self.add("field-added", prefix + name, "new optional field")
        for name in (p for p in old_props if p in new_props):
            was, now = name in old_required, name in new_required
            has_default = "default" in self.new.resolve(new_props[name])[0]
            if now and not was and not has_default:
                self.add("field-now-required", prefix + name, "now required, no default")
            elif was and not now:
                self.add("field-no-longer-required", prefix + name, "now optional")
            self.compare(old_props[name], new_props[name], prefix + name, seen)


def _pair(
    old: list[tuple[dict[str, Any], str | None]], new: list[tuple[dict[str, Any], str | None]]
) -> Iterator[tuple[tuple[dict[str, Any], str | None], tuple[dict[str, Any], str | None]]]:
    """Pair the object members of two unions: one each, or by title."""
    if len(old) == 1 and len(new) == 1:
        yield old[0], new[0]
        return
    titles = {schema.get("title"): (schema, ref) for schema, ref in new}
    for schema, ref in old:
        match = titles.get(schema.get("title"))
        if match is not None and schema.get("title") is not None:
            yield (schema, ref), match


def _schema_changes(old: Catalogue, new: Catalogue, key: tuple[str, int]) -> list[Change]:
    differ = _SchemaDiff(_Side(old.document, "OLD"), _Side(new.document, "NEW"), key[0], key[1])
    differ.compare(old.messages[key].data, new.messages[key].data, "", frozenset())
    return differ.changes


# --- diff and check ------------------------------------------------------------------------


def _decodes(accepts: Mapping[str, Versions], event: str, version: int) -> bool:
    """Whether a handler that ``accepts`` these versions decodes ``version`` of ``event``."""
    if event not in accepts:
        return True  # no model of the event in its registry: any version, as GenericEvent
    versions = accepts[event]
    return versions is None or version in versions


def _versions(versions: Versions) -> str:
    return "any version" if versions is None else ", ".join(f"v{v}" for v in sorted(versions))


def diff(old: Catalogue, new: Catalogue) -> list[Change]:
    """The changes from ``old`` to ``new``, two catalogues of one service (:data:`RULES`).

    Raises:
        CatalogueError: the two catalogues are of different services.
    """
    if old.service and new.service and old.service != new.service:
        raise CatalogueError(
            f"OLD is a catalogue of service {old.service!r} and NEW of {new.service!r}: diff "
            "compares two releases of one service; for a producer and a consumer use "
            "catalogue check --producer P --consumer C"
        )
    changes: list[Change] = []
    consumed: set[tuple[str, str, int]] = set()  # (handler, event, version) reported removed
    old_events = {e for e, _ in old.messages}
    for key in sorted(old.messages.keys() | new.messages.keys()):
        event, version = key
        before, after = old.messages.get(key), new.messages.get(key)
        if before is not None and after is not None:
            if before.routing_key and after.routing_key and before.routing_key != after.routing_key:
                changes.append(
                    Change(
                        "routing-key-changed",
                        f"{before.routing_key} -> {after.routing_key}",
                        event,
                        version,
                    )
                )
            changes.extend(_schema_changes(old, new, key))
            if key in old.sent and key not in new.sent:
                changes.append(Change("send-removed", "no longer published", event, version))
            elif key in new.sent and key not in old.sent:
                changes.append(Change("send-added", "now published", event, version))
        elif after is not None:
            sent = " (published)" if key in new.sent else ""
            kind = "version-added" if event in old_events else "event-added"
            changes.append(Change(kind, f"new{sent}", event, version))
        elif before is not None:
            changes.extend(_removed(before, old, new, consumed))
    changes.extend(_handler_changes(old, new, consumed))
    return changes


def _removed(
    before: Message, old: Catalogue, new: Catalogue, consumed: set[tuple[str, str, int]]
) -> list[Change]:
    event, version = before.event, before.version
    event_kept = any(e == event for e, _ in new.messages)
    breaking, fine = [], []
    for handler in sorted(new.handlers.values(), key=lambda h: h.name):
        if before.routing_key is None or not handler.binds(before.routing_key):
            continue
        accepts = handler.accepts
        if not event_kept:
            # No model of the event is left: the handler would get a GenericEvent. That breaks
            # one that took the typed event before, not one that never did.
            was = old.handlers.get(handler.name)
            declared = None if was is None else was.declares
            if declared is not None and event not in declared:
                fine.append(f"{handler.name} (untyped) gets it as a GenericEvent")
                continue
            why = "bound to it: it would receive it untyped (GenericEvent)"
        elif accepts is None:
            why = "bound to it (its catalogue does not say which versions it decodes)"
        elif not _decodes(accepts, event, version):
            why = f"bound to it and decodes only {_versions(accepts.get(event))}"
        else:
            fine.append(f"{handler.name} still decodes it")
            continue
        consumed.add((handler.name, event, version))
        breaking.append(
            Change(
                "version-removed-consumed",
                f"removed, but handler {handler.name} is {why}",
                event,
                version,
            )
        )
    if breaking:
        return breaking
    detail = "removed; " + ("; ".join(fine) if fine else "no handler here is bound to it")
    return [Change("version-removed", detail, event, version)]


def _handler_changes(
    old: Catalogue, new: Catalogue, consumed: set[tuple[str, str, int]]
) -> list[Change]:
    changes = []
    for name in sorted(old.handlers.keys() | new.handlers.keys()):
        before, after = old.handlers.get(name), new.handlers.get(name)
        if before is None:
            changes.append(Change("handler-added", "new", handler=name))
            continue
        if after is None:
            changes.append(Change("handler-removed", "removed", handler=name))
            continue
        if before.accepts is None or after.accepts is None:
            continue
        for event in sorted(before.accepts.keys() & after.accepts.keys()):
            was, now = before.accepts[event], after.accepts[event]
            if was == now:
                continue
            if now is None:
                changes.append(
                    Change(
                        "accepts-widened",
                        f"now decodes any version (was {_versions(was)})",
                        event,
                        handler=name,
                    )
                )
                continue
            if was is None:
                changes.append(
                    Change(
                        "accepts-narrowed",
                        f"decoded any version, now only {_versions(now)}",
                        event,
                        handler=name,
                    )
                )
                continue
            for version in sorted(was - now):
                if (name, event, version) not in consumed:
                    changes.append(
                        Change(
                            "accepts-narrowed",
                            f"no longer decoded (it decodes {_versions(now)})",
                            event,
                            version,
                            handler=name,
                        )
                    )
            if now - was:
                changes.append(
                    Change(
                        "accepts-widened",
                        f"now also decodes {_versions(now - was)}",
                        event,
                        handler=name,
                    )
                )
    return changes


def check(producer: Catalogue, consumer: Catalogue) -> list[Delivery]:
    """Each event version ``producer`` sends, paired with each ``consumer`` handler bound to it.

    Raises:
        CatalogueError: a handler bound to a sent event has no ``accepts`` in the consumer's
            catalogue (written before it existed): export it again.
    """
    deliveries = []
    for key in sorted(producer.sent):
        message = producer.messages[key]
        if message.routing_key is None:
            raise CatalogueError(
                f"producer: no routing key for {key[0]!r} v{key[1]}; export the catalogue again"
            )
        for handler in sorted(consumer.handlers.values(), key=lambda h: h.name):
            if not handler.binds(message.routing_key):
                continue
            if handler.accepts is None:
                raise CatalogueError(
                    f"consumer: handler {handler.name} does not say which versions it decodes "
                    "(a catalogue from before accepts existed); export the catalogue again"
                )
            deliveries.append(_delivery(message, handler, handler.accepts))
    return deliveries


def _delivery(message: Message, handler: Handler, accepts: Mapping[str, Versions]) -> Delivery:
    event, version = message.event, message.version
    if event not in accepts:
        versions: Versions = None
        ok, reason = True, f"no model of {event} there: received untyped (GenericEvent)"
    else:
        versions = accepts[event]
        ok = versions is None or version in versions
        declared = sorted((handler.declares or {}).get(event, ()))
        if ok and declared and version not in declared and max(declared) > version:
            target = min(v for v in declared if v > version)
            reason = f"decodes it, upcast to v{target} (it takes {_versions(versions)})"
        elif ok:
            reason = f"decodes it (it takes {_versions(versions)})"
        elif versions and version > max(versions):
            reason = (
                f"v{version} is newer than every version it decodes ({_versions(versions)}); "
                "events are never downcast: deploy the consumer's new version first"
            )
        else:
            reason = (
                f"no upcaster chain from v{version} to a version it takes (it decodes "
                f"{_versions(versions)}): the event would be poison; add "
                f"@upcaster({event!r}, from_version=...) steps in the consumer"
            )
    return Delivery(
        event=event,
        version=version,
        routing_key=message.routing_key or "",
        handler=handler.name,
        queue=handler.queue,
        accepts=versions,
        decodable=ok,
        reason=reason,
    )
