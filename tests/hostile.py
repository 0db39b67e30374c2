"""Values a hostile publisher can put in AMQP headers, for the tests of the untrusted wire."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any


class FarFuture(datetime):
    """A 'T' header value py-amqp encodes but cannot decode (2**60 s after the epoch)."""

    def utctimetuple(self) -> Any:
        return (1970, 1, 1, 0, 0, 2**60, 0, 1, 0)


def nested(depth: int, leaf: Any = 1) -> Any:
    """``{"a": {"a": ... leaf}}``, ``depth`` tables deep."""
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


@contextmanager
def deep_recursion() -> Iterator[None]:
    """Let this process encode deep tables: py-amqp's encoder recurses once per level."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(50_000)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)
