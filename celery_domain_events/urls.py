"""Broker and management URLs: redacted for display, and what a management URL defaults to.

Every URL this library prints (errors, logs, CLI output, ``celery report``) goes through
:func:`redact`, which masks the password of each URL of a failover list
(``amqp://a:pw@h1//;amqp://b:pw@h2//``), where kombu's ``maybe_sanitize_url`` masks the first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from kombu.utils.url import maybe_sanitize_url, url_to_parts

from .exceptions import ConfigurationError

__all__ = [
    "AMQP_PORT",
    "MANAGEMENT_PORT",
    "RedactedURL",
    "default_management_url",
    "redact",
    "split",
]

#: RabbitMQ's default AMQP port, and the management plugin's default port.
AMQP_PORT = 5672
MANAGEMENT_PORT = 15672


def split(urls: str | Sequence[str] | None) -> list[str]:
    """The URLs of a broker setting: one URL, a ``;``-separated failover list, or a list."""
    if urls is None:
        return []
    if isinstance(urls, str):
        return [u.strip() for u in urls.split(";") if u.strip()]
    return [str(u) for u in urls]


def redact(urls: str | Sequence[str] | None, mask: str = "**") -> str:
    """Return ``urls`` for display, every password masked."""
    return ";".join(maybe_sanitize_url(url, mask=mask) for url in split(urls))


class RedactedURL(str):
    """A URL setting whose ``repr`` (what ``celery report`` prints) hides its password.

    It is the same string for everything else, so the setting keeps working.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(redact(str(self), mask="********"))


def default_management_url(broker: str | Sequence[str] | None) -> str:
    """The management API next to a single broker on the default port, with its credentials.

    Raises:
        ConfigurationError: the broker is a failover list or listens on another port: which
            management API to read cannot be guessed.
    """
    urls = split(broker) or ["amqp://guest:guest@127.0.0.1:5672//"]
    if len(urls) > 1:
        raise ConfigurationError(
            f"the broker URL lists {len(urls)} hosts ({redact(urls)}); set "
            "domain_events_management_url to the management API to read"
        )
    parts: Any = url_to_parts(urls[0])
    if parts.port not in (None, AMQP_PORT):
        raise ConfigurationError(
            f"the broker listens on port {parts.port}, so the management API's port cannot be "
            f"guessed ({MANAGEMENT_PORT} belongs to port {AMQP_PORT}); set "
            "domain_events_management_url"
        )
    user = quote(parts.username or "guest", safe="")
    password = quote(parts.password or "guest", safe="")
    host = parts.hostname or "127.0.0.1"
    return f"http://{user}:{password}@{host}:{MANAGEMENT_PORT}"
