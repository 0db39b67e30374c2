"""AMQP topic routing: validate event names and binding patterns, match them exactly.

RabbitMQ splits routing keys and patterns on ``.``; ``*`` matches exactly one word and ``#``
matches zero or more words, so ``user.#`` matches ``user`` and ``#.created`` matches
``created``. kombu's in-memory transport gets both of those wrong, which is why the in-process
test mode routes with :func:`matches` instead.
"""

from __future__ import annotations

import re
from functools import lru_cache

from .exceptions import InvalidRoutingPattern

__all__ = ["matches", "validate_event_name", "validate_pattern", "validate_word"]

_WORD = re.compile(r"^[A-Za-z0-9_\-]+$")
#: AMQP caps routing keys at 255 bytes (shortstr).
MAX_KEY_BYTES = 255


def _check_words(value: str, *, wildcards: bool, what: str) -> tuple[str, ...]:
    if not isinstance(value, str) or not value:
        raise InvalidRoutingPattern(f"{what} must be a non-empty string, got {value!r}")
    if len(value.encode()) > MAX_KEY_BYTES:
        raise InvalidRoutingPattern(f"{what} {value!r} is longer than {MAX_KEY_BYTES} bytes")
    words = tuple(value.split("."))
    for word in words:
        if wildcards and word in ("*", "#"):
            continue
        if not _WORD.match(word):
            allowed = "words of letters, digits, '_' and '-'" + (
                ", '*' or '#'" if wildcards else ""
            )
            raise InvalidRoutingPattern(
                f"{what} {value!r}: each dot-separated part must be {allowed}"
            )
    return words


def validate_event_name(name: str) -> str:
    """Return ``name`` if it is a valid event name (dotted words, no wildcards).

    Raises:
        InvalidRoutingPattern: the name is empty, too long or contains wildcards.
    """
    _check_words(name, wildcards=False, what="event name")
    return name


def validate_word(value: str, what: str) -> str:
    """Return ``value`` if it is one word (letters, digits, ``_``, ``-``), as queue names need.

    Raises:
        InvalidRoutingPattern: it is empty or has dots, spaces or other characters.
    """
    words = _check_words(value, wildcards=False, what=what)
    if len(words) != 1:
        raise InvalidRoutingPattern(f"{what} {value!r} must be a single word (no dots)")
    return value


def validate_pattern(pattern: str) -> str:
    """Return ``pattern`` if it is a valid binding pattern (dotted words, ``*``, ``#``).

    Raises:
        InvalidRoutingPattern: the pattern is empty, too long or malformed.
    """
    _check_words(pattern, wildcards=True, what="routing pattern")
    return pattern


@lru_cache(maxsize=4096)
def matches(pattern: str, routing_key: str) -> bool:
    """Tell whether ``routing_key`` matches the topic ``pattern`` exactly as RabbitMQ does."""
    return _match(tuple(pattern.split(".")), tuple(routing_key.split(".")))


def _match(pattern: tuple[str, ...], key: tuple[str, ...]) -> bool:
    if not pattern:
        return not key
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        # '#' swallows zero or more words: try every split point.
        return any(_match(rest, key[i:]) for i in range(len(key) + 1))
    if not key:
        return False
    return (head in ("*", key[0])) and _match(rest, key[1:])
