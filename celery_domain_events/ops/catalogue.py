"""The event catalogue of an app as an AsyncAPI document (2.6.0 or 3.0.0).

It lists every event model the code declares (name, version, JSON schema of its ``data``, the
CloudEvents envelope around it) as channels and messages, and the AMQP bindings (topic exchange,
routing keys, durable queues). Operations are what this service does:

* ``send`` (``subscribe`` in AsyncAPI 2's inverted terms) for each event it publishes:
  ``DomainEvents(publishes=[...])``, or every model in its registry if that is not given;
* ``receive`` (AsyncAPI 2: ``publish``) for each handler, with its queue, DLQ, patterns, task,
  whether it is ``transient`` (per-worker exclusive queues ``<queue>.<instance>``, no DLQ),
  retry policy, the event versions its annotation names (``declares``) and, in ``accepts``,
  the versions of each event it can decode (upcasters included).

The document's root ``x-celery-domain-events`` names the service and lists the upcasters.
``celery_domain_events.ops.schema_diff`` reads these documents back to compare them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from kombu.utils.url import url_to_parts

from celery_domain_events import __version__
from celery_domain_events.events import METADATA_FIELDS, DomainEvent
from celery_domain_events.extension import DomainEvents
from celery_domain_events.registry import HandlerSpec
from celery_domain_events.routing import matches
from celery_domain_events.upcasting import as_mapping, decodable_versions
from celery_domain_events.wire.envelope import CONTENT_TYPE

__all__ = ["ANY_VERSION", "ASYNCAPI_VERSIONS", "EXTENSION", "build"]

#: AsyncAPI versions :func:`build` writes.
ASYNCAPI_VERSIONS = ("2.6.0", "3.0.0")
#: The specification extension this library writes on the root, messages and operations.
EXTENSION = "x-celery-domain-events"
#: What ``accepts`` says for a handler that takes any version of an event.
ANY_VERSION = "*"
_REF = "#/components/schemas/{model}"
_AMQP_BINDING = "0.3.0"


@dataclass(frozen=True)
class _Parts:
    """What both AsyncAPI versions are built from."""

    ext: DomainEvents
    info: dict[str, Any]
    host: str
    vhost: str
    models: list[type[DomainEvent]]
    published: list[type[DomainEvent]]
    messages: dict[str, Any]
    handled: dict[str, list[str]]
    schemas: dict[str, Any]
    root: dict[str, Any]


def _message_id(model: type[DomainEvent]) -> str:
    suffix = f"V{model.event_version}"
    # OrderPaidV2 stays OrderPaidV2, not OrderPaidV2V2.
    return model.__name__ if model.__name__.endswith(suffix) else model.__name__ + suffix


def _data_schema(model: type[DomainEvent], schemas: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=_REF)
    schemas.update(schema.pop("$defs", {}))
    for name in METADATA_FIELDS:
        schema.get("properties", {}).pop(name, None)
    schema["required"] = [r for r in schema.get("required", []) if r not in METADATA_FIELDS]
    return schema


def _envelope_schema(model: type[DomainEvent], data: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["specversion", "id", "source", "type", "data"],
        "properties": {
            "specversion": {"const": "1.0"},
            "id": {"type": "string", "format": "uuid"},
            "source": {"type": "string", "description": "the publishing service"},
            "type": {"const": model.event_name},
            "time": {"type": "string", "format": "date-time"},
            "datacontenttype": {"const": "application/json"},
            "eventversion": {"const": model.event_version},
            "traceparent": {"type": "string", "description": "W3C trace context"},
            "data": data,
        },
    }


def _message(
    ext: DomainEvents, model: type[DomainEvent], schemas: dict[str, Any]
) -> dict[str, Any]:
    return {
        "name": model.event_name,
        "title": f"{model.event_name} v{model.event_version}",
        "summary": (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else "",
        "contentType": CONTENT_TYPE,
        "payload": _envelope_schema(model, _data_schema(model, schemas)),
        "bindings": {"amqp": {"messageType": model.event_name, "bindingVersion": _AMQP_BINDING}},
        EXTENSION: {
            "event": model.event_name,
            "version": model.event_version,
            "routingKey": ext.topology.routing_key(model),
        },
    }


def _exchange_binding(ext: DomainEvents, vhost: str) -> dict[str, Any]:
    return {
        "name": ext.settings.exchange,
        "type": "topic",
        "durable": True,
        "autoDelete": False,
        "vhost": vhost,
    }


def _queue_binding(ext: DomainEvents, spec: HandlerSpec, vhost: str) -> dict[str, Any]:
    # A transient handler's queues are each worker's own: <name>.<instance>, named at start.
    return {
        "name": ext.topology.handler_queue_name(spec),
        "durable": not spec.transient,
        "exclusive": spec.transient,
        "autoDelete": spec.transient,
        "vhost": vhost,
    }


def _matched(ext: DomainEvents, spec: HandlerSpec, model: type[DomainEvent]) -> bool:
    key = ext.topology.routing_key(model)
    return any(matches(p, key) for p in ext.topology.binding_patterns(spec))


def _accepts(
    ext: DomainEvents, spec: HandlerSpec, models: list[type[DomainEvent]]
) -> dict[str, list[int] | str]:
    """The versions of each event the catalogue knows, and the handler is bound to, it decodes."""
    declared = spec.event_versions()
    accepts: dict[str, list[int] | str] = {}
    for model in models:
        if model.event_name in accepts or not _matched(ext, spec, model):
            continue
        versions = decodable_versions(declared, model.event_name, ext.events, ext.upcasters)
        accepts[model.event_name] = ANY_VERSION if versions is None else sorted(versions)
    return accepts


def _handler_doc(
    ext: DomainEvents, spec: HandlerSpec, models: list[type[DomainEvent]]
) -> dict[str, Any]:
    retry = spec.retry
    return {
        "handler": spec.name,
        "task": spec.task_name,
        "queue": ext.topology.handler_queue_name(spec),
        "patterns": list(ext.topology.binding_patterns(spec)),
        "declares": as_mapping(spec.event_versions()),
        "accepts": _accepts(ext, spec, models),
        "deadLetterQueue": None if spec.transient else ext.topology.dead_letter_queue(spec).name,
        "maxRetries": retry.max_retries if retry else 0,
        "transient": spec.transient,
    }


def _models(ext: DomainEvents) -> list[type[DomainEvent]]:
    """The registry's models and the published ones, one per name and version, in order."""
    found: dict[tuple[str, int], type[DomainEvent]] = {}
    for model in [*ext.events.all(), *ext.published_events]:
        found.setdefault((model.event_name, model.event_version), model)
    return [found[k] for k in sorted(found)]


def _root_extension(ext: DomainEvents) -> dict[str, Any]:
    return {
        "service": ext.settings.service,
        "exchange": ext.settings.exchange,
        "keyFormat": ext.settings.key_format.value,
        "publishes": "declared" if ext.publishes is not None else "registry",
        "upcasters": [
            {
                "event": step.event_name,
                "from": step.from_version,
                "to": step.to_version,
                "function": step.origin,
            }
            for step in ext.upcasters.all()
        ],
    }


def _unique(key: str, taken: dict[str, Any]) -> str:
    while key in taken:
        key += "_"
    return key


def build(ext: DomainEvents, asyncapi: str = "3.0.0") -> dict[str, Any]:
    """Return the AsyncAPI document of ``ext``'s events and handlers.

    Raises:
        ValueError: ``asyncapi`` is not one of :data:`ASYNCAPI_VERSIONS`.
    """
    if asyncapi not in ASYNCAPI_VERSIONS:
        raise ValueError(f"AsyncAPI {asyncapi} is not supported: {', '.join(ASYNCAPI_VERSIONS)}")
    parts = url_to_parts(str(ext.app.conf.broker_write_url or ext.app.conf.broker_url))
    vhost = parts.path or "/"
    host = f"{parts.hostname or 'localhost'}:{parts.port or 5672}"
    schemas: dict[str, Any] = {}
    models = _models(ext)
    messages = {_message_id(m): _message(ext, m, schemas) for m in models}
    handled = {
        spec.name: [_message_id(m) for m in models if _matched(ext, spec, m)]
        for spec in ext.handlers
    }
    info = {
        "title": f"{ext.settings.service} domain events",
        "version": __version__,
        "description": f"Events on the topic exchange {ext.settings.exchange!r}; "
        "generated by celery-domain-events.",
    }
    sent = {(m.event_name, m.event_version) for m in ext.published_events}
    parts_ = _Parts(
        ext,
        info,
        host,
        vhost,
        models,
        [m for m in models if (m.event_name, m.event_version) in sent],
        messages,
        handled,
        schemas,
        _root_extension(ext),
    )
    return _v3(parts_) if asyncapi == "3.0.0" else _v2(parts_)


def _v3(d: _Parts) -> dict[str, Any]:
    channels: dict[str, Any] = {}
    for model in d.models:
        mid = _message_id(model)
        channels[mid] = {
            "address": d.ext.topology.routing_key(model),
            "messages": {mid: {"$ref": f"#/components/messages/{mid}"}},
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": _exchange_binding(d.ext, d.vhost),
                    "bindingVersion": _AMQP_BINDING,
                }
            },
        }
    operations: dict[str, Any] = {}
    for spec in d.ext.handlers:
        queue = d.ext.topology.handler_queue_name(spec)
        channels[queue] = {
            "address": queue,
            "messages": {m: {"$ref": f"#/components/messages/{m}"} for m in d.handled[spec.name]},
            "bindings": {
                "amqp": {
                    "is": "queue",
                    "queue": _queue_binding(d.ext, spec, d.vhost),
                    "bindingVersion": _AMQP_BINDING,
                }
            },
        }
        operations[spec.name] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{queue}"},
            "summary": f"{spec.name} handles {', '.join(spec.patterns)}",
            "messages": [
                {"$ref": f"#/channels/{queue}/messages/{m}"} for m in d.handled[spec.name]
            ],
            EXTENSION: _handler_doc(d.ext, spec, d.models),
        }
    for model in d.published:
        mid = _message_id(model)
        operations[_unique(f"send_{mid}", operations)] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{mid}"},
            "summary": f"{d.ext.settings.service} publishes {model.event_name} "
            f"v{model.event_version}",
            "messages": [{"$ref": f"#/channels/{mid}/messages/{mid}"}],
        }
    return {
        "asyncapi": "3.0.0",
        "info": d.info,
        "defaultContentType": CONTENT_TYPE,
        "servers": {
            "rabbitmq": {
                "host": d.host,
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "pathname": d.vhost,
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": d.messages, "schemas": d.schemas},
        EXTENSION: d.root,
    }


def _one_or_many(refs: list[dict[str, str]]) -> dict[str, Any]:
    return refs[0] if len(refs) == 1 else {"oneOf": refs}


def _v2(d: _Parts) -> dict[str, Any]:
    # A channel is a routing key: with plain keys every version of an event shares one.
    by_key: dict[str, list[type[DomainEvent]]] = {}
    for model in d.models:
        by_key.setdefault(d.ext.topology.routing_key(model), []).append(model)
    channels: dict[str, Any] = {}
    operation_ids: dict[str, None] = {}
    for key, group in by_key.items():
        versions = ", ".join(f"v{m.event_version}" for m in group)
        channel: dict[str, Any] = {
            "description": f"{group[0].event_name} {versions} on the topic exchange",
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": _exchange_binding(d.ext, d.vhost),
                    "bindingVersion": _AMQP_BINDING,
                }
            },
        }
        sent = [m for m in group if m in d.published]
        if sent:
            # AsyncAPI 2: "subscribe" is what this application sends (others subscribe to it).
            operation_id = _unique("send_" + re.sub(r"\W", "_", key), operation_ids)
            operation_ids[operation_id] = None
            channel["subscribe"] = {
                "operationId": operation_id,
                "summary": f"{d.ext.settings.service} publishes {group[0].event_name} "
                + ", ".join(f"v{m.event_version}" for m in sent),
                "message": _one_or_many(
                    [{"$ref": f"#/components/messages/{_message_id(m)}"} for m in sent]
                ),
            }
        channels[key] = channel
    for spec in d.ext.handlers:
        refs = [{"$ref": f"#/components/messages/{m}"} for m in d.handled[spec.name]]
        channels[d.ext.topology.handler_queue_name(spec)] = {
            "description": f"{'per-worker queues' if spec.transient else 'queue'} of handler "
            f"{spec.name}",
            "bindings": {
                "amqp": {
                    "is": "queue",
                    "queue": _queue_binding(d.ext, spec, d.vhost),
                    "bindingVersion": _AMQP_BINDING,
                }
            },
            # AsyncAPI 2: "publish" is what this application receives.
            "publish": {
                "operationId": spec.name,
                "summary": f"{spec.name} handles {', '.join(spec.patterns)}",
                **({"message": _one_or_many(refs)} if refs else {}),
                EXTENSION: _handler_doc(d.ext, spec, d.models),
            },
        }
    return {
        "asyncapi": "2.6.0",
        "info": d.info,
        "defaultContentType": CONTENT_TYPE,
        "servers": {
            "rabbitmq": {
                "url": d.host + d.vhost.rstrip("/") if d.vhost != "/" else d.host,
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
            }
        },
        "channels": channels,
        "components": {"messages": d.messages, "schemas": d.schemas},
        EXTENSION: d.root,
    }
