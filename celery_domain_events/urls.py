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


class RedactedURL:
    """A URL setting that shows itself only with its password masked.

    ``celery report`` prints settings with ``repr``, and ``celery inspect conf`` (which Flower's
    config page uses) sends a worker's settings as JSON, where a ``str`` goes out as it is and
    any other value as its ``repr``: so this is not a ``str``. ``str()`` gives the URL, which
    is how the library reads the setting.
    """

    __slots__ = ("_url",)

    def __init__(self, url: str) -> None:
        self._url = str(url)

    def __str__(self) -> str:
        return self._url

    def __repr__(self) -> str:
        return repr(redact(self._url, mask="********"))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RedactedURL | str):
            return self._url == str(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._url)

    def __reduce__(self) -> tuple[type[RedactedURL], tuple[str]]:
        return RedactedURL, (self._url,)


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
