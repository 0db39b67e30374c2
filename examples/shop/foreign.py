"""Another team's producer, without celery-domain-events: plain AMQP, in any language.

It publishes a structured CloudEvent of its own: its id is not a UUID, it sets no AMQP
``message_id``, and its data carries a field the shop's ``UserCreated`` does not declare. The
shop's handlers take it all the same (a tolerant reader of any valid CloudEvent).

Then it publishes what an attacker would: a Celery task message for the shop's own handler
task whose body chains another task. Handler queues carry CloudEvents only, so the worker runs
nothing from it and dead-letters it as poison, with a failure record.
"""

from __future__ import annotations

import json

from kombu import Connection, Producer

from .app import app


def main() -> None:
    exchange = app.conf.domain_events_exchange
    with Connection(app.conf.broker_url) as conn:
        producer = Producer(conn.channel())
        event = {
            "specversion": "1.0",
            "id": "crm-000123",
            "source": "https://crm.example.com",
            "type": "user.created",
            "time": "2026-12-01T10:00:00Z",
            "data": {"user_id": 2, "email": "grace@example.com", "plan": "pro"},
        }
        producer.publish(
            json.dumps(event).encode(),
            exchange=exchange,
            routing_key="user.created",
            content_type="application/cloudevents+json",
            content_encoding="utf-8",
        )
        print(f"foreign producer published user.created id={event['id']}")
        chained = {"task": "celery.backend_cleanup", "args": [], "kwargs": {}, "options": {}}
        attack = [[], {"raw_event": json.dumps(event)}, {"callbacks": [chained], "chain": None}]
        producer.publish(
            json.dumps(attack).encode(),
            exchange=exchange,
            routing_key="user.created",
            content_type="application/json",
            content_encoding="utf-8",
            headers={"task": "domain_events.examples.shop.handlers.send_welcome_email"},
        )
        print("foreign producer published a Celery task message (it must never run)")


if __name__ == "__main__":
    main()
