"""Schema evolution on the real broker: old and new producers, a consumer on v3, a real worker.

A v1 producer and a v2 producer lag behind the consumer, which takes v3 only: their events
arrive upcast, with no dead letter. A v4 producer leads: its event is dead-lettered as poison
with the exact reason, and the worker keeps running.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from celery_domain_events import emit, transmit

from .conftest import Topology, drain, wait_for
from .evolving import EvolveV1, EvolveV2, EvolveV3, EvolveV4

pytestmark = [pytest.mark.rabbitmq, pytest.mark.worker]

POOLS = {"solo": ("-P", "solo"), "prefork": ("-P", "prefork", "-c", "2")}


@pytest.mark.parametrize("pool", sorted(POOLS), ids=sorted(POOLS))
def test_lagging_producers_are_upcast_and_a_leading_one_is_poison_with_the_reason(
    topology: Topology, worker_process: Any, pool: str
) -> None:
    worker = worker_process(["evolve_v3"]).start(*POOLS[pool])
    producer = topology.app("producer")  # one app, emitting every version (old code and new)
    sent = [
        emit(EvolveV1(order_id=1, amount=19.9)),
        emit(EvolveV2(order_id=2, amount=5.0, currency="USD")),
        emit(EvolveV3(order_id=3, cents=700, currency="GBP")),
        emit(EvolveV4(order_id=4, cents=1, currency="EUR", channel="web")),
    ]
    transmit(producer)
    handled = [worker.markers / f"evolve_v3-{event.event_id}" for event in sent[:3]]
    wait_for(lambda: all(path.exists() for path in handled), timeout=20)
    records = [json.loads(path.read_text()) for path in handled]
    assert records == [
        {
            "type": "EvolveV3",
            "id": sent[0].event_id,
            "order_id": 1,
            "cents": 1990,
            "currency": "EUR",
        },
        {
            "type": "EvolveV3",
            "id": sent[1].event_id,
            "order_id": 2,
            "cents": 500,
            "currency": "USD",
        },
        {
            "type": "EvolveV3",
            "id": sent[2].event_id,
            "order_id": 3,
            "cents": 700,
            "currency": "GBP",
        },
    ]
    dlq = worker.queue("evolve_v3") + ".dlq"
    letters: list[Any] = []
    wait_for(lambda: bool(letters.extend(drain(topology.broker_url, dlq)) or letters), timeout=20)
    [letter] = letters  # 0 dead letters for the upcastable versions
    headers = letter.properties["application_headers"]
    assert json.loads(letter.body)["id"] == sent[3].event_id
    assert headers["x-failure-reason"] == "poison"
    assert headers["x-failure-message"] == (
        "'probe.evolve' v4 is newer than this handler takes (v3); events are never downcast: "
        "deploy the consumer's new version first, or publish the old version as well"
    )
    assert not (worker.markers / f"evolve_v3-{sent[3].event_id}").exists()
    assert worker.proc.poll() is None  # still running
