"""Wire conformance: CloudEvents 1.0 validation against the official schema, and fuzzing.

Pure in-process tests (no broker, no worker):

* the envelope validation agrees with the vendored CloudEvents JSON schema (draft-07, with
  format checking) wherever that schema is complete;
* spec rules the schema cannot express are enforced, and their valid counterparts accepted;
* typed events are read tolerantly (unknown fields ignored), but never without their fields;
* the worker's main-thread check of an untrusted delivery only ever accepts or raises
  ``EventDecodeError``, and what it accepts becomes a task message;
* task ids are ``uuid5(event id, handler)`` and never fail, whatever text the id holds.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import hypothesis
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from jsonschema import Draft7Validator
from kombu.message import Message

from celery_domain_events.consuming import delivery as bridge
from celery_domain_events.events import DomainEvent, GenericEvent
from celery_domain_events.exceptions import EventDecodeError, EventValidationError
from celery_domain_events.registry import EventRegistry, HandlerSpec, default_events
from celery_domain_events.wire import envelope as serialization
from celery_domain_events.wire import inbound

SCHEMA_PATH = Path(__file__).resolve().parent / "data" / "cloudevents-1.0.schema.json"
SCHEMA = Draft7Validator(
    json.loads(SCHEMA_PATH.read_text()), format_checker=Draft7Validator.FORMAT_CHECKER
)

# Fuzzing settings: no example database (nothing written into the repository), no deadline
# (a 5,000-level body or a 70 KB body is slower than the default 200 ms on a busy machine),
# no "explain" phase (slow, and the shrunk failing example says enough).
FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_the_schema_checks_formats() -> None:
    # Without rfc3339-validator and rfc3986-validator jsonschema silently skips "uri",
    # "uri-reference" and "date-time", and the agreement test below would prove much less.
    assert not SCHEMA.is_valid({"specversion": "1.0", "id": "x", "source": "a b", "type": "t"}), (
        "uri-reference is not checked: install rfc3986-validator"
    )
    assert not SCHEMA.is_valid(
        {"specversion": "1.0", "id": "x", "source": "s", "type": "t", "time": "yesterday"}
    ), "date-time is not checked: install rfc3339-validator"


def _one_in(n: int) -> st.SearchStrategy[bool]:
    """True about once in ``n`` draws (and shrinking to False)."""
    return st.sampled_from([False] * (n - 1) + [True])


def _mostly(
    usual: st.SearchStrategy[Any], odd: st.SearchStrategy[Any], one_in: int = 4
) -> st.SearchStrategy[Any]:
    """``usual`` values, and ``odd`` ones about once in ``one_in`` draws."""
    return _one_in(one_in).flatmap(lambda is_odd: odd if is_odd else usual)


# -- 1. Agreement with the official schema ----------------------------------------------------

#: Marks an attribute left out of the generated event.
MISSING: Any = object()

#: Attribute names with a meaning of their own: never generated as random extensions.
#: ``eventversion`` and ``traceparent`` are extensions the library types (a positive int, a
#: string); the schema knows nothing of them.
KNOWN_ATTRIBUTES = frozenset(
    {
        "specversion",
        "id",
        "source",
        "type",
        "datacontenttype",
        "dataschema",
        "subject",
        "time",
        "data",
        "data_base64",
        "eventversion",
        "traceparent",
    }
)

# JSON values (no NaN or infinity: JSON has none).
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=12,
)
#: Values of the wrong JSON type for a string attribute (null included: null means absent).
not_strings = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.just([]),
    st.just({}),
    st.lists(st.text(max_size=3), min_size=1, max_size=2),
)


def _chars(alphabet: str, *, min_size: int = 0, pct: bool = True) -> st.SearchStrategy[str]:
    """Strings of RFC 3986 characters from ``alphabet``, with well-formed %XX escapes."""
    unit = st.sampled_from(alphabet)
    if pct:
        unit = st.one_of(unit, st.from_regex(r"%[0-9A-Fa-f]{2}", fullmatch=True))
    return st.lists(unit, min_size=min_size, max_size=6).map("".join)


# RFC 3986, section 2 and appendix A.
ALPHA = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
UNRESERVED = ALPHA + "0123456789-._~"
SUB_DELIMS = "!$&'()*+,;="
PCHAR = UNRESERVED + SUB_DELIMS + ":@"
scheme = st.from_regex(r"[A-Za-z][A-Za-z0-9+.\-]{0,6}", fullmatch=True)
segment = _chars(PCHAR)
segment_nz = _chars(PCHAR, min_size=1)
segment_nz_nc = _chars(UNRESERVED + SUB_DELIMS + "@", min_size=1)  # no ":" (path-noscheme)
query = _chars(PCHAR + "/?")
authority = st.builds(
    lambda userinfo, host, port: userinfo + host + port,
    st.one_of(st.just(""), _chars(UNRESERVED + SUB_DELIMS + ":").map(lambda u: u + "@")),
    _chars(UNRESERVED + SUB_DELIMS),
    st.one_of(st.just(""), st.from_regex(r":[0-9]{0,5}", fullmatch=True)),
)
path_abempty = st.lists(segment, max_size=3).map(lambda s: "".join("/" + x for x in s))
path_rootless = st.builds(
    lambda first, rest: first + rest, segment_nz, path_abempty
)  # segment-nz *( "/" segment )
path_absolute = st.one_of(st.just("/"), path_rootless.map(lambda p: "/" + p))
path_noscheme = st.builds(lambda first, rest: first + rest, segment_nz_nc, path_abempty)
suffix = st.builds(
    lambda q, f: q + f,
    st.one_of(st.just(""), query.map(lambda x: "?" + x)),
    st.one_of(st.just(""), query.map(lambda x: "#" + x)),
)
#: RFC 3986 ``URI``: absolute, with a scheme.
absolute_uris = st.builds(
    lambda s, hier, sfx: f"{s}:{hier}{sfx}",
    scheme,
    st.one_of(
        st.builds(lambda a, p: f"//{a}{p}", authority, path_abempty),
        path_absolute,
        path_rootless,
        st.just(""),
    ),
    suffix,
) | st.sampled_from(["https://x/y", "urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66", "a:"])
#: RFC 3986 ``relative-ref``, never empty (an empty string fails minLength anyway).
relative_refs = st.builds(
    lambda part, sfx: part + sfx,
    st.one_of(
        st.builds(lambda a, p: f"//{a}{p}", authority, path_abempty),
        path_absolute,
        path_noscheme,
    ),
    suffix,
) | st.sampled_from(["a/b", "/sensors/tn-1234567/alerts", "1-555-123-4567", "a/b:c", "./c:d"])


@st.composite
def with_whitespace(draw: st.DrawFn, uris: st.SearchStrategy[str]) -> str:
    """A URI with a space or a tab somewhere in it (never a URI, nor a URI-reference)."""
    uri = draw(uris)
    at = draw(st.integers(0, len(uri)))
    return uri[:at] + draw(st.sampled_from([" ", "\t", "  "])) + uri[at:]


@st.composite
def timestamps(draw: st.DrawFn) -> str:
    """RFC 3339-shaped date-times with any component out of range (month 13, hour 24, ...).

    Leap seconds (":60") are left out: RFC 3339 allows them, Python's datetime cannot hold
    them and the schema's checker refuses them, so neither side is a reference there.
    """
    year = draw(st.integers(0, 9999))
    month = draw(st.integers(0, 13))
    day = draw(st.integers(0, 32))
    hour = draw(st.integers(0, 24))
    minute = draw(st.integers(0, 59))
    second = draw(st.integers(0, 59))
    separator = draw(st.sampled_from("Tt"))
    fraction = draw(st.one_of(st.just(""), st.from_regex(r"\.[0-9]{1,12}", fullmatch=True)))
    offset = draw(
        st.one_of(
            st.sampled_from(["Z", "z", "+00:00", "-00:00"]),
            st.builds(
                lambda sign, h, m: f"{sign}{h:02d}:{m:02d}",
                st.sampled_from("+-"),
                st.integers(0, 24),
                st.integers(0, 59),
            ),
        )
    )
    return (
        f"{year:04d}-{month:02d}-{day:02d}{separator}"
        f"{hour:02d}:{minute:02d}:{second:02d}{fraction}{offset}"
    )


valid_times = st.builds(
    lambda moment, separator, fraction, offset: (
        moment.strftime(f"%Y-%m-%d{separator}%H:%M:%S") + fraction + offset
    ),
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)),
    st.sampled_from("Tt"),
    st.one_of(st.just(""), st.from_regex(r"\.[0-9]{1,12}", fullmatch=True)),
    st.one_of(
        st.sampled_from(["Z", "z", "+00:00", "-00:00"]),
        st.from_regex(r"[+-](?:[01][0-9]|2[0-3]):[0-5][0-9]", fullmatch=True),
    ),
)
naive_times = valid_times.map(lambda t: t[:19])  # no offset: not RFC 3339
spaced_times = valid_times.map(lambda t: t[:10] + " " + t[11:])  # a space for the "T"

non_empty_text = st.text(min_size=1, max_size=20)
absent_or_null = st.sampled_from([MISSING, None])

# Each attribute's values by kind: (kinds the schema accepts, kinds it refuses). Kinds are drawn
# with equal odds, so that rare ones (a space in a source) are not drowned out.
# Note on the URI formats: the library checks ``source`` as "non-empty, no whitespace" and
# ``dataschema`` as "a scheme, a colon, no whitespace" -- a deliberate cheap approximation of
# RFC 3986, not its grammar. So URIs are generated from the RFC 3986 grammar (valid for both),
# or broken by whitespace, relativity or emptiness (invalid for both); strings of characters
# RFC 3986 forbids without whitespace ("a|b", "é", "%zz", "1:b") are left out. Also left out:
# strings ending in "\n", which the format checkers wrongly accept (Python's "$" matches
# before a final newline).
KINDS: dict[str, tuple[dict[str, st.SearchStrategy[Any]], dict[str, st.SearchStrategy[Any]]]] = {
    "specversion": (
        {"1.0": st.just("1.0")},
        {"absent": absent_or_null, "not-a-string": not_strings},
    ),
    "id": (
        {"text": non_empty_text, "crm": st.just("crm-000123")},
        {"empty": st.just(""), "absent": absent_or_null, "not-a-string": not_strings},
    ),
    "source": (
        {"uri": absolute_uris, "relative": relative_refs},
        {
            "whitespace": with_whitespace(absolute_uris | relative_refs),
            "empty": st.just(""),
            "absent": absent_or_null,
            "not-a-string": not_strings,
        },
    ),
    "type": (
        {"text": non_empty_text, "dotted": st.just("com.example.created")},
        {"empty": st.just(""), "absent": absent_or_null, "not-a-string": not_strings},
    ),
    "subject": (
        {"text": non_empty_text, "absent": absent_or_null},
        {"empty": st.just(""), "not-a-string": not_strings},
    ),
    "datacontenttype": (
        {"text": non_empty_text, "json": st.just("application/json"), "absent": absent_or_null},
        {"empty": st.just(""), "not-a-string": not_strings},
    ),
    "dataschema": (
        {"uri": absolute_uris, "absent": absent_or_null},
        {
            "relative": relative_refs,
            "whitespace": with_whitespace(absolute_uris),
            "empty": st.just(""),
            "not-a-string": not_strings,
        },
    ),
    "time": (
        {"rfc3339": valid_times, "absent": absent_or_null},
        {
            "rfc3339-shaped": timestamps(),
            "naive": naive_times,
            "space": spaced_times,
            "garbage": st.text(max_size=25),
            "number": st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False)),
            "not-a-string": not_strings,
        },
    ),
}
#: Any "time" value at all.
times = st.one_of(valid_times, st.none(), *KINDS["time"][1].values())
base64_data = st.binary(max_size=20).map(lambda b: base64.b64encode(b).decode())
extension_names = st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True).filter(
    lambda name: name not in KNOWN_ATTRIBUTES
)
extension_values = st.one_of(
    st.text(max_size=20), st.integers(-(2**31), 2**31 - 1), st.booleans(), st.none()
)


@st.composite
def cloudevents(draw: st.DrawFn) -> dict[str, Any]:
    """A CloudEvents-like JSON object, valid or not, where the schema is a complete oracle.

    Attributes are valid except up to two "wild" ones, drawn from the invalid kinds, so that both
    verdicts are common and each rule is tested on its own. Never generated, because the schema
    cannot judge them: extension names or values the spec forbids, ``data`` together with a
    non-null ``data_base64``, a string ``specversion`` other than "1.0".
    """
    wild = {draw(st.sampled_from(["", *sorted(KINDS)]))}
    if draw(_one_in(3)):
        wild.add(draw(st.sampled_from(sorted(KINDS))))
    event: dict[str, Any] = {}
    for name, (valid, invalid) in KINDS.items():
        kinds = invalid if name in wild else valid
        kind = draw(st.sampled_from(sorted(kinds)))
        value = draw(kinds[kind])
        hypothesis.event(f"{name}: {kind}")
        if value is not MISSING:
            event[name] = value
    payload = draw(st.sampled_from(["data", "none", "data_base64", "data+null base64"]))
    hypothesis.event(f"payload: {payload}")
    if payload in ("data", "data+null base64"):
        event["data"] = draw(json_values)
    if payload == "data+null base64":
        event["data_base64"] = None  # null is absent: not "both present"
    if payload == "data_base64":
        event["data_base64"] = draw(st.one_of(base64_data, st.text(max_size=10), not_strings))
    for name, value in draw(st.dictionaries(extension_names, extension_values, max_size=3)).items():
        event[name] = value
    return event


def _library_accepts(body: bytes) -> bool:
    try:
        serialization.decode(body)
    except EventDecodeError:
        return False
    return True


@settings(FUZZ, max_examples=500)
@given(event=cloudevents(), ascii_only=st.booleans())
def test_decode_agrees_with_the_official_schema(event: dict[str, Any], ascii_only: bool) -> None:
    body = json.dumps(event, ensure_ascii=ascii_only).encode()
    schema_errors = [e.message for e in SCHEMA.iter_errors(event)]
    hypothesis.event("schema: invalid" if schema_errors else "schema: valid")
    assert _library_accepts(body) == (not schema_errors), (
        f"decode() and the CloudEvents schema disagree on {body!r}; schema: {schema_errors}"
    )


# -- 2. Spec rules the schema does not check -----------------------------------------------


def _envelope(**changes: Any) -> dict[str, Any]:
    event = {
        "specversion": "1.0",
        "id": "crm-000123",
        "source": "https://crm.example.com/contacts",
        "type": "com.example.contact.created",
        "time": "2026-01-31T12:00:00Z",
        "datacontenttype": "application/json",
        "data": {"contact_id": 7},
    }
    event.update(changes)
    return {k: v for k, v in event.items() if v is not MISSING}


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(_envelope(specversion="0.3"), id="specversion-0.3"),
        pytest.param(_envelope(specversion="1.0.0"), id="specversion-1.0.0"),
        pytest.param(_envelope(Bad_Ext="x"), id="extension-name-not-lowercase"),
        pytest.param(_envelope(**{"bad-ext": "x"}), id="extension-name-with-dash"),
        pytest.param(_envelope(myext={}), id="extension-value-object"),
        pytest.param(_envelope(myext=[]), id="extension-value-array"),
        pytest.param(_envelope(myext=1.5), id="extension-value-float"),
        pytest.param(_envelope(myext=2**31), id="extension-int-above-int32"),
        pytest.param(_envelope(myext=-(2**31) - 1), id="extension-int-below-int32"),
        pytest.param(_envelope(data_base64="eyJhIjoxfQ=="), id="data-and-data_base64"),
        # the schema's date-time checker accepts a final newline (Python's "$")
        pytest.param(_envelope(time="2026-01-01T00:00:00Z\n"), id="time-with-trailing-newline"),
        # null is absent, also for a required attribute
        pytest.param(_envelope(id=None), id="id-null-is-missing"),
        pytest.param(_envelope(type=None), id="type-null-is-missing"),
    ],
)
def test_spec_rules_beyond_the_schema_are_enforced(event: dict[str, Any]) -> None:
    body = json.dumps(event)
    with pytest.raises(EventDecodeError):
        serialization.decode(body)


@pytest.mark.parametrize(
    "value",
    [
        "2026-01-01T00:00:00",  # no offset: a local time, not an instant
        "2026-01-01 00:00:00Z",
        "2026-01-01T00:00Z",
        "2026-01-01",
        "2026-02-29T00:00:00Z",
        "2026-01-01T24:00:00Z",
        "2026-01-01T00:00:00+24:00",
        "0000-01-01T00:00:00Z",
        1767225600,
    ],
    ids=repr,
)
def test_time_must_be_rfc3339(value: Any) -> None:
    with pytest.raises(EventDecodeError, match="time"):
        serialization.decode(json.dumps(_envelope(time=value)))


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(_envelope(subject=None), id="null-subject-is-absent"),
        pytest.param(_envelope(time=None, dataschema=None), id="null-time-and-dataschema"),
        pytest.param(_envelope(data=None), id="null-data"),
        pytest.param(_envelope(data=MISSING, data_base64="eyJhIjoxfQ=="), id="data_base64"),
        pytest.param(_envelope(data_base64=None), id="data-and-null-data_base64"),
        pytest.param(_envelope(myext=2**31 - 1, other=-(2**31)), id="int32-bounds"),
        pytest.param(_envelope(myext=True, other="x", ext2=None), id="bool-string-null-extensions"),
        pytest.param(_envelope(time="2026-01-01T00:00:00.123456789+05:30"), id="time-offset"),
        pytest.param(_envelope(time="2026-01-01t00:00:00z"), id="time-lowercase"),
    ],
)
def test_valid_counterparts_are_accepted(event: dict[str, Any]) -> None:
    envelope = serialization.decode(json.dumps(event))
    assert envelope.id == "crm-000123"
    extensions = {k: v for k, v in event.items() if k not in KNOWN_ATTRIBUTES and v is not None}
    assert envelope.extensions == extensions


def test_null_attributes_are_absent_and_null_data_is_kept() -> None:
    envelope = serialization.decode(json.dumps(_envelope(subject=None, data=None)))
    assert envelope.subject is None
    assert "subject" not in envelope.model_fields_set
    assert envelope.payload() is None


@pytest.mark.parametrize(
    "data",
    [[1, "two", {"three": 3}], [], "plain text", "", 42, 0, 1.5, True, False],
    ids=repr,
)
def test_any_json_data_reaches_an_untyped_event_unchanged(data: Any) -> None:
    envelope = serialization.decode(json.dumps(_envelope(data=data)))
    event = serialization.to_event(envelope, EventRegistry())
    assert isinstance(event, GenericEvent)
    assert event.event_id == "crm-000123"
    assert event.event_name == "com.example.contact.created"
    assert type(event.data) is type(data)
    assert event.data == data


# -- 3. Tolerant reader ---------------------------------------------------------------------

# Defined in an isolated default registry, so the model is only in REGISTRY.
with default_events.isolated():

    class TolerantOrderPlaced(DomainEvent):
        event_name: ClassVar[str] = "conformance.tolerant.v1"
        event_version: ClassVar[int] = 1

        order_id: int
        note: str | None = None


REGISTRY = EventRegistry()
REGISTRY.register(TolerantOrderPlaced)


def _typed(data: Any) -> dict[str, Any]:
    return _envelope(type="conformance.tolerant.v1", eventversion=1, data=data)


@pytest.mark.parametrize(
    "extra",
    [{"coupon": "X1"}, {"coupon": None}, {"nested": {"a": [1, 2]}}, {"event_id": "spoofed"}],
    ids=["string", "null", "object", "metadata-name"],
)
def test_typed_events_ignore_unknown_fields(extra: dict[str, Any]) -> None:
    envelope = serialization.decode(json.dumps(_typed({"order_id": 5, **extra})))
    event = serialization.to_event(envelope, REGISTRY)
    assert type(event) is TolerantOrderPlaced
    assert event.order_id == 5
    assert event.note is None
    assert event.event_id == "crm-000123"  # metadata comes from the envelope, never from data
    assert event.occurred_at == datetime(2026, 1, 31, 12, tzinfo=timezone.utc)
    assert event.event_data() == {"order_id": 5, "note": None}


@pytest.mark.parametrize(
    "data",
    [{}, {"note": "no order id"}, {"order_id": None}, {"order_id": "five"}, [{"order_id": 5}]],
    ids=["empty", "missing-field", "null-field", "wrong-type", "list"],
)
def test_typed_events_need_their_fields_and_an_object(data: Any) -> None:
    envelope = serialization.decode(json.dumps(_typed(data)))
    with pytest.raises(EventValidationError):
        serialization.to_event(envelope, REGISTRY)


# -- 4. The worker's main-thread check of an untrusted delivery ------------------------------

MAX_BYTES = 65536
MAX_DELAY = 10.0
RETRY_EXCHANGE = "ex.retry"


def _handler(event: Any) -> None:  # pragma: no cover - never called
    raise AssertionError(event)


SPEC = HandlerSpec(name="h", patterns=("#",), fn=_handler)


def _nested(depth: int, opening: str, closing: str, leaf: str = "1") -> str:
    return opening * depth + leaf + closing * depth


def _ids() -> st.SearchStrategy[Any]:
    surrogates = st.integers(0xD800, 0xDFFF).map(chr)
    return _mostly(
        st.one_of(st.uuids().map(str), st.just("crm-000123"), st.text(min_size=1, max_size=12)),
        st.one_of(
            # lone surrogates: pydantic-core refuses "\ud800" escapes, and raw they are not UTF-8
            st.lists(st.one_of(st.characters(), surrogates), min_size=1, max_size=4).map("".join),
            st.just(""),
            not_strings,
        ),
    )


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    event: dict[str, Any] = {
        "specversion": draw(st.sampled_from(["1.0", "1.0", "1.0", "0.3"])),
        "id": draw(_ids()),
        "source": draw(st.one_of(st.just("billing"), json_values)),
        "type": draw(
            _mostly(
                st.sampled_from(["conformance.tolerant.v1", "com.example.created"]),
                st.one_of(st.just(""), st.text(max_size=12), not_strings),
            )
        ),
    }
    if draw(st.booleans()):
        event["time"] = draw(st.one_of(st.just("2026-01-31T12:00:00Z"), times))
    if draw(st.booleans()):
        event["eventversion"] = draw(st.one_of(st.integers(-2, 3), json_values))
    if draw(st.booleans()):
        event["data"] = draw(
            st.one_of(
                st.fixed_dictionaries({"order_id": st.integers()}, optional={"x": json_values}),
                json_values,
            )
        )
    else:
        event["data_base64"] = draw(
            st.one_of(
                st.binary(max_size=30).map(lambda b: base64.b64encode(b).decode()),
                st.just(base64.b64encode(b'{"order_id": 3}').decode()),
                st.text(max_size=10),
            )
        )
        if draw(st.booleans()):
            event["datacontenttype"] = draw(
                st.sampled_from(["application/json", "application/octet-stream", "text/x+json"])
            )
    event.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2)))
    return event


def _json_text(value: Any, ascii_only: bool) -> str:
    return json.dumps(value, ensure_ascii=ascii_only)


@st.composite
def wire_bodies(draw: st.DrawFn) -> bytes | str:
    """What the wire carries: bytes (or, rarely, a str body handed over by a transport)."""
    kind = draw(
        st.sampled_from(
            ["envelope", "envelope", "envelope", "json", "bytes", "deep", "deep-data", "big"]
        )
    )
    ascii_only = draw(st.booleans())
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        text = _json_text(draw(json_values), ascii_only)
    elif kind == "deep":
        depth = draw(st.integers(1, 5000))
        opening, closing = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        text = _nested(depth, opening, closing)
    elif kind == "deep-data":
        depth = draw(st.integers(150, 5000))
        head = '{"specversion":"1.0","id":"x","source":"s","type":"com.example.created","data":'
        text = head + _nested(depth, "[", "]") + "}"
    elif kind == "big":  # just under, at or just over max_bytes
        size = draw(st.integers(-50, 50)) + MAX_BYTES - len(_json_text(_envelope(data=""), True))
        text = _json_text(_envelope(data="x" * size), True)
    else:
        text = _json_text(draw(envelopes()), ascii_only)
    if draw(_one_in(10)):
        return text  # a transport handing over text, not bytes
    return text.encode("utf-8", "surrogatepass")


content_types = _mostly(
    st.sampled_from(
        [
            "application/cloudevents+json",
            "application/json",
            "application/cloudevents+json; charset=utf-8",
            "application/json; charset=UTF-8",
            "Application/JSON",
        ]
    ),
    st.one_of(
        st.sampled_from(
            [
                None,
                "application/json; charset=latin-1",
                "text/plain",
                "application/x-python-serialize",
                "application/x-yaml",
            ]
        ),
        st.text(max_size=30),
    ),
)
content_encodings = _mostly(
    st.sampled_from([None, "utf-8", "UTF-8", "utf8"]),
    st.one_of(
        st.sampled_from(
            [
                "utf_8",
                "binary",
                "latin-1",
                "utf-16",
                "ascii",
                "idna",
                "unicode_escape",
                "base64",
                "undefined",
            ]
        ),
        st.text(max_size=12),
    ),
    one_in=3,
)

header_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.text(max_size=10),
    st.text(st.characters(codec=None, categories=["Cs", "Ll"]), max_size=4),
    st.binary(max_size=10),
    st.decimals(allow_nan=False, places=2, min_value=-1000, max_value=1000),
    st.datetimes(timezones=st.just(timezone.utc)),
)
header_values = st.recursive(
    header_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)


def _deep_header(depth: int) -> Any:
    value: Any = "leaf"
    for level in range(depth):
        value = {"k": value} if level % 3 else [value]
    return value


def _retry_at() -> st.SearchStrategy[Any]:
    now = time.time()
    return st.one_of(
        st.floats(-100.0, 100.0).map(lambda offset: now + offset),
        st.integers(-100, 100).map(lambda offset: int(now) + offset),
        # an AMQP double can carry nan and the infinities, an AMQP long any 64-bit integer
        st.sampled_from([math.nan, math.inf, -math.inf, 2**63 - 1, -(2**63), 0, True, "soon"]),
        st.floats(),
        st.integers(-(2**63), 2**63 - 1),
        header_values,
    )


@st.composite
def header_tables(draw: st.DrawFn) -> dict[str, Any]:
    # a new dict: hypothesis would print the drawn one as it was drawn, not as changed here
    headers = dict(draw(st.dictionaries(st.text(max_size=10), header_values, max_size=3)))
    headers.pop("compression", None)  # kombu itself would try to decompress the body
    if draw(_one_in(10)):
        headers["task"] = draw(header_values)
    if not draw(_one_in(3)):
        headers[inbound.RETRIES_HEADER] = draw(
            st.one_of(
                st.integers(0, 5),
                st.sampled_from([-1, 1_000_000, 1_000_001, 2**63 - 1, True, 2.0, "3", None]),
                st.integers(-(2**63), 2**63 - 1),
                header_values,
            )
        )
    if not draw(_one_in(3)):
        headers[inbound.RETRY_AT_HEADER] = draw(_retry_at())
    if draw(_one_in(4)):
        headers[inbound.ORIGIN_EXCHANGE_HEADER] = draw(st.one_of(st.just("events"), header_values))
        headers[inbound.ORIGIN_ROUTING_KEY_HEADER] = draw(header_values)
    if draw(_one_in(6)):
        headers[draw(st.text(max_size=5))] = _deep_header(draw(st.integers(1, 20)))
    return headers


properties = st.fixed_dictionaries(
    {},
    optional={
        "message_id": st.one_of(st.text(max_size=10), st.none()),
        "timestamp": st.datetimes(timezones=st.just(timezone.utc)),
        "app_id": st.one_of(st.text(max_size=10), st.none()),
        "priority": st.integers(0, 255),
        "correlation_id": st.text(max_size=10),
        "type": st.text(max_size=10),
    },
)
exchanges = _mostly(
    st.sampled_from([RETRY_EXCHANGE, "events", "celery_delayed_27", "", "ex.retry.other"]),
    st.text(max_size=10),
)


def _amqp_body(wire: bytes | str, content_encoding: str | None) -> bytes | str:
    # What py-amqp hands kombu: with a content_encoding it tries to decode the body with that
    # codec (amqp.abstract_channel.AbstractChannel.dispatch_method) and keeps the bytes if the
    # codec fails or does not exist.
    if isinstance(wire, str) or content_encoding is None:
        return wire
    try:
        decoded = wire.decode(content_encoding)
    except Exception:
        return wire
    return decoded if isinstance(decoded, str) else wire


@st.composite
def deliveries(draw: st.DrawFn) -> dict[str, Any]:
    """A delivery's ``Message`` fields as a consumer sees them, and its bytes on the wire."""
    wire = draw(wire_bodies())
    content_encoding = draw(content_encodings)
    if isinstance(wire, str):
        content_encoding = draw(st.sampled_from([None, "utf-8"]))
    return {
        "body": _amqp_body(wire, content_encoding),
        "wire": wire if isinstance(wire, bytes) else None,
        "content_type": draw(content_types),
        "content_encoding": content_encoding,
        "delivery_info": {"exchange": draw(exchanges), "routing_key": draw(st.text(max_size=20))},
        "properties": draw(properties),
        "headers": draw(header_tables()),
    }


def _trusted(exchange: str) -> bool:
    return exchange == RETRY_EXCHANGE or exchange.startswith(inbound.DELAYED_EXCHANGE_PREFIX)


@FUZZ
@given(delivery=deliveries())
def test_untrusted_deliveries_are_accepted_or_poison(delivery: dict[str, Any]) -> None:
    fields = dict(delivery)
    wire = fields.pop("wire")
    message = Message(delivery_tag=1, channel=None, **fields)
    headers = dict(message.headers)
    exchange = message.delivery_info["exchange"]
    before = time.time()
    try:
        checked = inbound.check(
            message,
            max_bytes=MAX_BYTES,
            retry_exchanges={RETRY_EXCHANGE},
            max_delay=MAX_DELAY,
        )
    except EventDecodeError as exc:
        hypothesis.event(f"poison: {str(exc)[:25]}")
        return
    after = time.time()
    hypothesis.event(f"accepted ({'trusted' if _trusted(exchange) else 'untrusted'})")
    _check_accepted(message, checked, headers, wire, (before, after))


def _depth(value: Any) -> int:
    """How many tables and arrays deep ``value`` nests (a scalar: 0)."""
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list | tuple):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _check_accepted(
    message: Message,
    checked: inbound.Inbound,
    headers: dict[str, Any],
    wire: bytes | None,
    window: tuple[float, float],
) -> None:
    assert "task" not in headers, "a Celery task message passed the check"
    media_type = str(message.content_type).split(";", 1)[0].strip().lower()
    assert media_type in serialization.JSON_CONTENT_TYPES
    assert _depth(headers) <= inbound.MAX_HEADER_DEPTH
    assert len(checked.text.encode("utf-8", "surrogatepass")) <= MAX_BYTES
    if wire is not None and inbound.raw_body(message.body, message.content_encoding) == wire:
        assert len(wire) <= MAX_BYTES
        assert checked.text == wire.decode("utf-8")
    envelope = json.loads(checked.text)
    assert isinstance(envelope, dict)
    assert isinstance(checked.event_id, str)
    assert isinstance(checked.event_type, str)
    assert checked.event_id
    assert checked.event_type
    assert (checked.event_id, checked.event_type) == (envelope["id"], envelope["type"])

    exchange = message.delivery_info["exchange"]
    if _trusted(exchange):
        retries = headers.get(inbound.RETRIES_HEADER, 0)
        valid = type(retries) is int and 0 <= retries <= 1_000_000
        assert checked.retries == (retries if valid else 0)
    else:
        assert checked.retries == 0
        assert checked.due is None
        assert checked.exchange == exchange
    if checked.due is not None:
        assert isinstance(checked.due, float)
        assert window[0] < checked.due <= window[1] + MAX_DELAY, f"due is {checked.due!r}"

    task = bridge.to_task_message(message, checked, SPEC, "svc.h")
    task_id = bridge.task_id_for(checked.event_id, SPEC.name)
    assert task.headers["task"] == SPEC.task_name
    assert task.headers["id"] == task.headers["root_id"] == task_id
    assert task.headers["retries"] == checked.retries
    assert (task.headers["eta"] is None) == (checked.due is None)
    args, kwargs, canvas = task.body
    assert args == []
    assert kwargs["raw_event"] == checked.text
    assert set(canvas.values()) == {None}
    assert task.delivery_tag == message.delivery_tag

    try:
        event = serialization.to_event(serialization.decode(checked.text), REGISTRY)
    except EventDecodeError:
        return
    assert isinstance(event, TolerantOrderPlaced | GenericEvent)
    assert event.event_id == checked.event_id


def _message(body: bytes | str, **changes: Any) -> Message:
    fields: dict[str, Any] = {
        "body": body,
        "delivery_tag": 1,
        "content_type": "application/cloudevents+json",
        "content_encoding": "utf-8",
        "delivery_info": {"exchange": "events", "routing_key": "com.example.created"},
        "properties": {},
        "headers": {},
        "channel": None,
    }
    fields.update(changes)
    return Message(**fields)


VALID_BODY = json.dumps(_envelope()).encode()


def _check(message: Message) -> inbound.Inbound:
    return inbound.check(
        message, max_bytes=MAX_BYTES, retry_exchanges={RETRY_EXCHANGE}, max_delay=MAX_DELAY
    )


def test_json_nesting_is_bounded_at_200_levels() -> None:
    # Levels of tables and arrays, the outermost counted: the envelope is 1, its data object
    # 2, and 198 arrays in it make 200, accepted; one more is poison, in the main thread and
    # in the pool.
    for levels, accepted in ((200, True), (201, False)):
        body = json.dumps(_envelope(data={"x": 0})).replace(
            '"x": 0', '"x": ' + _nested(levels - 2, "[", "]")
        )
        assert f'"x": {"[" * (levels - 2)}1' in body
        if accepted:
            assert _check(_message(body)).event_id == "crm-000123"
            assert serialization.decode(body).id == "crm-000123"
            continue
        with pytest.raises(EventDecodeError, match="deeper than 200 levels"):
            _check(_message(body))
        with pytest.raises(EventDecodeError, match="deeper than 200 levels"):
            serialization.decode(body)


def test_header_nesting_is_bounded_at_8_levels() -> None:
    # The headers table counted: a header nesting 7 tables and arrays makes 8, accepted.
    def nested(levels: int) -> Any:
        value: Any = "leaf"
        for level in range(levels):
            value = {"k": value} if level % 2 else [value]
        return value

    assert _check(_message(VALID_BODY, headers={"x": nested(7)})).headers["x"] == nested(7)
    with pytest.raises(EventDecodeError, match="headers nest deeper than 8 levels"):
        _check(_message(VALID_BODY, headers={"x": nested(8)}))


def test_a_valid_delivery_passes_and_becomes_a_task() -> None:
    checked = _check(_message(VALID_BODY))
    assert (checked.event_id, checked.event_type, checked.retries, checked.due) == (
        "crm-000123",
        "com.example.contact.created",
        0,
        None,
    )
    task = bridge.to_task_message(_message(VALID_BODY), checked, SPEC, "svc.h")
    assert task.headers["id"] == bridge.task_id_for("crm-000123", "h")


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: _message(VALID_BODY, headers={"task": "os.system"}), "task"),
        (lambda: _message(VALID_BODY, content_type="application/x-python-serialize"), "content"),
        (lambda: _message(VALID_BODY, content_type="application/json; charset=latin-1"), "content"),
        (lambda: _message(json.dumps(_envelope(data="x" * MAX_BYTES)).encode()), "bytes"),
        (lambda: _message(b"\xff" + VALID_BODY), "UTF-8"),
        (lambda: _message(_nested(5000, "[", "]").encode()), "deeper"),
        (lambda: _message(b"[]"), "object"),
        (lambda: _message(json.dumps(_envelope(id="")).encode()), "'id'"),
        (lambda: _message(json.dumps(_envelope(type="")).encode()), "'type'"),
        (lambda: _message(VALID_BODY, headers={"x": _deep_header(20)}), "nest"),
    ],
    ids=[
        "task",
        "pickle",
        "latin-1",
        "too-big",
        "not-utf8",
        "deep",
        "array",
        "empty-id",
        "empty-type",
        "hdrs",
    ],
)
def test_poison_deliveries_say_why(make: Callable[[], Message], reason: str) -> None:
    with pytest.raises(EventDecodeError, match=reason):
        _check(make())


@pytest.mark.parametrize("retry_at", [math.nan, math.inf, -math.inf, 2**63 - 1, -(2**63)])
def test_extreme_retry_times_from_the_retry_exchange_are_bounded(retry_at: float) -> None:
    message = _message(
        VALID_BODY,
        delivery_info={"exchange": RETRY_EXCHANGE, "routing_key": "svc.h"},
        headers={inbound.RETRY_AT_HEADER: retry_at, inbound.RETRIES_HEADER: 2},
    )
    before = time.time()
    checked = _check(message)
    after = time.time()
    assert checked.retries == 2
    if checked.due is not None:
        assert before < checked.due <= after + MAX_DELAY, f"due is {checked.due!r}"
    bridge.to_task_message(message, checked, SPEC, "svc.h")


@pytest.mark.parametrize(
    ("body", "content_encoding"),
    [
        # py-amqp decodes a body with whatever codec content_encoding names; "idna" decodes
        # these but cannot encode them back (an empty label; a label over 63 characters).
        (_amqp_body(b"a..b", "idna"), "idna"),
        (_amqp_body(VALID_BODY + b" " * 64, "idna"), "idna"),
        # A transport handing over text: pydantic-core refuses a str with a lone surrogate.
        (VALID_BODY.decode().replace("crm-000123", "\ud800"), None),
        (VALID_BODY.decode().replace("crm-000123", "\udcff"), "utf-8"),
    ],
    ids=["idna-empty-label", "idna-long-label", "lone-surrogate-text", "lone-surrogate-utf8"],
)
def test_unreadable_bodies_are_poison_not_crashes(
    body: bytes | str, content_encoding: str | None
) -> None:
    assert isinstance(body, str)  # what the transport hands over is text
    # The dead-letter path (bootstep) reads the body back with raw_body: it must not fail.
    assert isinstance(inbound.raw_body(body, content_encoding), bytes)
    try:
        checked = _check(_message(body, content_encoding=content_encoding))
    except EventDecodeError:
        return
    # Reading it back some other way (as UTF-8) is fine, if what passes is the event.
    assert checked.text == VALID_BODY.decode() + " " * 64


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_json_number_literals_are_poison(literal: str) -> None:
    # RFC 8259 has no NaN or Infinity: a body holding them is not JSON, whatever Python's and
    # pydantic-core's lenient parsers accept (and re-encoding such data would not round-trip).
    body = json.dumps(_envelope(data=None)).replace('"data": null', f'"data": {literal}')
    assert literal in body
    with pytest.raises(EventDecodeError):
        serialization.decode(body)
    with pytest.raises(EventDecodeError):
        _check(_message(body.encode()))


def test_header_values_decimal_and_bytes_are_copied() -> None:
    headers = {"amount": Decimal("1.50"), "raw": b"\x00", "when": datetime(2026, 1, 1)}
    checked = _check(_message(VALID_BODY, headers=headers))
    assert checked.headers == headers
    assert checked.headers is not headers


# -- 5. Task ids ----------------------------------------------------------------------------


@pytest.mark.parametrize("event_id", ["crm-000123", str(uuid.UUID(int=0)), "é/ü", "a" * 500])
def test_task_id_is_uuid5_of_event_and_handler(event_id: str) -> None:
    expected = uuid.uuid5(bridge.TASK_ID_NAMESPACE, f"{event_id}/h")
    assert bridge.task_id_for(event_id, "h") == str(expected)


def test_task_id_of_the_documented_example() -> None:
    assert bridge.task_id_for("crm-000123", "h") == str(
        uuid.uuid5(bridge.TASK_ID_NAMESPACE, "crm-000123/h")
    )


def _uuid5_of_any_text(name: str) -> str:
    # uuid.uuid5 encodes the name as strict UTF-8; the library hashes a lone surrogate as its
    # surrogate-pass bytes, so that distinct ids never share a task id.
    digest = hashlib.sha1(
        bridge.TASK_ID_NAMESPACE.bytes + name.encode("utf-8", "surrogatepass")
    ).digest()
    return str(uuid.UUID(bytes=digest[:16], version=5))


@FUZZ
@given(
    event_id=st.one_of(
        st.text(),
        st.lists(st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr)), min_size=1).map(
            "".join
        ),
        st.just("\ud800"),
    ),
    handler=st.sampled_from(["h", "send_welcome", "é"]),
)
def test_task_id_never_fails_and_is_a_uuid5(event_id: str, handler: str) -> None:
    task_id = bridge.task_id_for(event_id, handler)
    parsed = uuid.UUID(task_id)
    assert str(parsed) == task_id
    assert parsed.version == 5
    assert parsed.variant == uuid.RFC_4122
    assert task_id == _uuid5_of_any_text(f"{event_id}/{handler}")
    assert bridge.task_id_for(event_id, handler) == task_id
    try:
        name = f"{event_id}/{handler}".encode()
    except UnicodeEncodeError:
        return
    assert task_id == str(uuid.uuid5(bridge.TASK_ID_NAMESPACE, name.decode()))
