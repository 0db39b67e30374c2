"""The README's demo, run as users run it: a real `celery worker` subprocess (prefork pool)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from kombu import Connection

from .conftest import Topology

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.rabbitmq, pytest.mark.worker]


def test_demo_runs_every_handler_in_a_prefork_worker(topology: Topology) -> None:
    service = topology.service("shop")
    env = {
        **os.environ,
        "DOMAIN_EVENTS_EXCHANGE": topology.exchange,
        "DOMAIN_EVENTS_SERVICE": service,
        "DOMAIN_EVENTS_BROKER_URL": topology.broker_url,
    }
    dlq_depths: dict[str, int] = {}
    try:
        result = subprocess.run(
            [sys.executable, "-m", "examples.demo"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=150,
            check=False,
        )
        if result.returncode == 0:
            dlq_depths = {
                handler: topology.queue_depth(f"{service}.{handler}.dlq")
                for handler in ("audit_trail", "book_revenue", "send_welcome_email")
            }
    finally:
        with Connection(topology.broker_url) as conn:
            for handler in ("audit_trail", "book_revenue", "send_welcome_email"):
                for name in (f"{service}.{handler}", f"{service}.{handler}.dlq"):
                    conn.default_channel.queue_delete(name)
    assert result.returncode == 0, result.stdout + result.stderr
    handled = [line for line in result.stdout.splitlines() if "HANDLED" in line]
    assert len(handled) == 7, result.stdout
    assert any("welcome mail to ada@example.com" in line for line in handled)
    assert any("welcome mail to grace@example.com" in line for line in handled)  # foreign
    assert sum("audit_trail" in line for line in handled) == 4
    assert any("book_revenue: order 42 paid 19.90 EUR" in line for line in handled)  # upcast
    poison = [line for line in result.stdout.splitlines() if "Poison message" in line]
    assert len(poison) == 2, result.stdout  # the task message, on both user.created queues
    assert all("Celery task message" in line for line in poison)
    assert f"consuming 3 handler queue(s) of service '{service}'" in result.stdout
    assert "7 of 7 handler runs seen" in result.stdout
    # "The task message waits in the DLQs": one on each queue bound to user.created.
    assert dlq_depths == {"audit_trail": 1, "book_revenue": 0, "send_welcome_email": 1}
