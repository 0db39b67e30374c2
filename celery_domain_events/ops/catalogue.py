"""The event catalogue of an app as an AsyncAPI document (2.6.0 or 3.0.0).

It lists every event model the code declares (name, version, JSON schema of its ``data``, the
CloudEvents envelope around it) and every handler (its queue, DLQ, patterns, task and retry
policy), with the AMQP bindings (topic exchange, routing keys, durable queues). Which service
*sends* an event cannot be read from code, so events appear as channels and messages, and only
handlers appear as operations (``receive``; ``publish`` in AsyncAPI 2's inverted terms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kombu.utils.url import url_to_parts

from celery_domain_events import __version__
from celery_domain_events.events import METADATA_FIELDS, DomainEvent
from celery_domain_events.extension import DomainEvents
from celery_domain_events.registry import HandlerSpec
from celery_domain_events.routing import matches
from celery_domain_events.wire.envelope import CONTENT_TYPE

__all__ = ["ASYNCAPI_VERSIONS", "build"]

#: AsyncAPI versions :func:`build` writes.
ASYNCAPI_VERSIONS = ("2.6.0", "3.0.0")
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
    messages: dict[str, Any]
    handled: dict[str, list[str]]
    schemas: dict[str, Any]


def _message_id(model: type[DomainEvent]) -> str:
    return f"{model.__name__}V{model.event_version}"


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


def _message(model: type[DomainEvent], schemas: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": model.event_name,
        "title": f"{model.event_name} v{model.event_version}",
        "summary": (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else "",
        "contentType": CONTENT_TYPE,
        "payload": _envelope_schema(model, _data_schema(model, schemas)),
        "bindings": {"amqp": {"messageType": model.event_name, "bindingVersion": _AMQP_BINDING}},
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
    return {
        "name": ext.topology.handler_queue_name(spec),
        "durable": True,
        "exclusive": False,
        "autoDelete": False,
        "vhost": vhost,
    }


def _handler_doc(ext: DomainEvents, spec: HandlerSpec) -> dict[str, Any]:
    retry = spec.retry
    return {
        "handler": spec.name,
        "task": spec.task_name,
        "patterns": list(ext.topology.binding_patterns(spec)),
        "deadLetterQueue": ext.topology.dead_letter_queue(spec).name,
        "maxRetries": retry.max_retries if retry else 0,
    }


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
    models = ext.events.all()
    messages = {_message_id(m): _message(m, schemas) for m in models}
    handled = {
        spec.name: [
            _message_id(m)
            for m in models
            if any(
                matches(p, ext.topology.routing_key(m)) for p in ext.topology.binding_patterns(spec)
            )
        ]
        for spec in ext.handlers
    }
    info = {
        "title": f"{ext.settings.service} domain events",
        "version": __version__,
        "description": f"Events on the topic exchange {ext.settings.exchange!r}; "
        "generated by celery-domain-events.",
    }
    parts_ = _Parts(ext, info, host, vhost, models, messages, handled, schemas)
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
            "x-celery-domain-events": _handler_doc(d.ext, spec),
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
    }


def _v2(d: _Parts) -> dict[str, Any]:
    channels: dict[str, Any] = {}
    for model in d.models:
        mid = _message_id(model)
        channels[d.ext.topology.routing_key(model)] = {
            "description": f"{model.event_name} v{model.event_version} on the topic exchange",
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": _exchange_binding(d.ext, d.vhost),
                    "bindingVersion": _AMQP_BINDING,
                }
            },
            "subscribe": {"message": {"$ref": f"#/components/messages/{mid}"}},
        }
    for spec in d.ext.handlers:
        refs = [{"$ref": f"#/components/messages/{m}"} for m in d.handled[spec.name]]
        channels[d.ext.topology.handler_queue_name(spec)] = {
            "description": f"queue of handler {spec.name}",
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
                **({"message": refs[0] if len(refs) == 1 else {"oneOf": refs}} if refs else {}),
                "x-celery-domain-events": _handler_doc(d.ext, spec),
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
    }
