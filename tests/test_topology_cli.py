"""`domain-events topology show|declare|diff` against the real broker's management API."""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner, Result

from celery_domain_events import domain_event_handler
from celery_domain_events.ops.cli import domain_events
from celery_domain_events.registry import HandlerRegistry

from .conftest import Topology

pytestmark = [pytest.mark.rabbitmq]


def run(app: Any, *args: str) -> Result:
    return CliRunner().invoke(domain_events, list(args), obj=SimpleNamespace(app=app))


def registry_with(*patterns: str) -> HandlerRegistry:
    """One version of the code: the handler `profile_sync` bound by ``patterns``."""
    registry = HandlerRegistry()

    def profile_sync(event: Any) -> None:
        pass

    # Each "version" is its own module, as it would be in another deployment (task names differ).
    profile_sync.__module__ = f"tests.topology_v{uuid.uuid4().hex[:8]}"
    domain_event_handler(*patterns, registry=registry, retry=None)(profile_sync)
    return registry


def test_diff_reports_and_fixes_changed_patterns(topology: Topology) -> None:
    v1 = topology.app("svc", registry=registry_with("user.*"))
    assert run(v1, "topology", "declare").exit_code == 0
    clean = run(v1, "topology", "diff")
    assert clean.exit_code == 0, clean.output
    assert "topology matches the handlers" in clean.output

    v2 = topology.app("svc", registry=registry_with("user.created", "account.#"))
    queue = f"{topology.service('svc')}.profile_sync"
    changed = run(v2, "topology", "diff")
    assert changed.exit_code == 1
    assert f"missing  {queue}  account.#" in changed.output
    assert f"missing  {queue}  user.created" in changed.output
    assert f"stale    {queue}  user.*" in changed.output

    fixed = run(v2, "topology", "diff", "--prune", "--apply")
    assert fixed.exit_code == 0, fixed.output
    assert f"unbound  {queue}  user.*" in fixed.output
    assert run(v2, "topology", "diff").exit_code == 0

    shown = json.loads(run(v2, "topology", "show", "--json").output)
    [row] = shown["queues"]
    assert row["queue"] == queue
    assert row["bindings"] == ["account.#", "user.created"]
    assert row["type"] == "classic"
    assert row["messages"] == 0
    assert row["dlq"] == queue + ".dlq"

    gone = topology.app("svc", registry=HandlerRegistry())  # the handler was deleted
    orphan = run(gone, "topology", "diff")
    assert orphan.exit_code == 1
    assert f"orphaned {queue}" in orphan.output
