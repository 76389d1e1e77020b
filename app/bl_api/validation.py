"""Request validation: every bad body becomes a 400 that names each offending field.

Validation is done by hand rather than with jsonschema on purpose: the request shapes are
small and fixed; hand checks add no dependency to the artifact's wheelhouse; they return
values already normalised for the database (canonical lower-case UUIDs); and they reject
exactly what Postgres would reject (e.g. integers outside int4) so that bad input can
never surface as a 500.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

MAX_RESPONSES = 1000          # responses per /record_responses call
MAX_EVENT_REQUESTS = 1000     # course_event_requests per /fetch_course_events call
MAX_EVENTS = 1000             # events per course_event_request (also the default)
INT4_MAX = 2**31 - 1          # sequence numbers are Postgres integers

_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_EVENT_TYPE_RE = re.compile(r"^[a-z][a-z_]{0,63}$")


class InvalidRequest(Exception):
    """The body is not what the endpoint accepts; `problems` names each field and why."""

    def __init__(self, problems: list[dict[str, str]], status: int = 400):
        super().__init__("; ".join(f"{p['field']}: {p['problem']}" for p in problems))
        self.problems = problems
        self.status = status


class _Bad(Exception):
    pass


def _uuid(value: Any) -> str:
    # fullmatch: `$` also matches before a trailing newline, which let "<uuid>\n" through to the database.
    if not isinstance(value, str) or not _UUID_RE.fullmatch(value):
        raise _Bad("must be a UUID string like 0b1e6c3a-7d5e-4a51-9f5e-2f0c7d3b9a11")
    return value.lower()


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad("must be true or false")
    return value


def _int(minimum: int, maximum: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad("must be an integer")
        if not minimum <= value <= maximum:
            raise _Bad(f"must be between {minimum} and {maximum}")
        return value
    return check


def _timestamp(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 64:
        raise _Bad("must be an ISO 8601 timestamp string with a time zone")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _Bad("must be an ISO 8601 timestamp string with a time zone") from None
    if parsed.tzinfo is None:
        raise _Bad("must carry a time zone (e.g. 2024-01-31T12:00:00Z)")
    return value


def _event_types(value: Any) -> list[str]:
    if not isinstance(value, list) or not value or len(value) > 16:
        raise _Bad("must be a non-empty list of at most 16 event type names")
    for item in value:
        if not isinstance(item, str) or not _EVENT_TYPE_RE.match(item):
            raise _Bad("each event type must be a lower_snake_case name such as record_response")
    return list(dict.fromkeys(value))


def _object(
    value: Any, path: str, fields: dict[str, tuple[Callable[[Any], Any], bool]],
    problems: list[dict[str, str]], ignored: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Check `value` is an object with exactly `fields` ({name: (check, required)})."""
    if not isinstance(value, dict):
        problems.append({"field": path or "(body)", "problem": "must be a JSON object"})
        return {}
    out: dict[str, Any] = {}
    for name in sorted(set(value) - set(fields) - ignored):
        problems.append({"field": _join(path, name), "problem": "is not a known field"})
    for name, (check, required) in fields.items():
        if name not in value:
            if required:
                problems.append({"field": _join(path, name), "problem": "is required"})
            continue
        try:
            out[name] = check(value[name])
        except _Bad as e:
            problems.append({"field": _join(path, name), "problem": str(e)})
    return out


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _list(value: Any, path: str, limit: int, problems: list[dict[str, str]]) -> list[Any] | None:
    if not isinstance(value, list):
        problems.append({"field": path, "problem": "must be a list"})
        return None
    if len(value) > limit:
        raise InvalidRequest(
            [{"field": path, "problem": f"has {len(value)} items; send at most {limit} per call"}], status=413
        )
    return value


def _raise_if(problems: list[dict[str, str]]) -> None:
    if problems:
        raise InvalidRequest(problems[:50])


def create_course(body: Any) -> dict[str, str]:
    problems: list[dict[str, str]] = []
    out = _object(body, "", {"course_uuid": (_uuid, True), "ecosystem_uuid": (_uuid, True)}, problems)
    _raise_if(problems)
    return out


_RESPONSE_FIELDS = {
    "response_uuid": (_uuid, True),
    "course_uuid": (_uuid, True),
    "ecosystem_item_uuid": (_uuid, True),
    "trial_uuid": (_uuid, True),
    "student_uuid": (_uuid, True),
    "exercise_uuid": (_uuid, True),
    "is_correct": (_bool, True),
    "is_real_response": (_bool, True),
    "responded_at": (_timestamp, True),
}


def record_responses(body: Any) -> list[dict[str, Any]]:
    """Responses in request order; a client-sent `sequence_number` is accepted and dropped."""
    problems: list[dict[str, str]] = []
    top = _object(body, "", {"responses": (lambda v: v, True)}, problems)
    _raise_if(problems)
    items = _list(top["responses"], "responses", MAX_RESPONSES, problems)
    _raise_if(problems)
    out = [
        _object(item, f"responses[{i}]", _RESPONSE_FIELDS, problems, ignored=frozenset({"sequence_number"}))
        for i, item in enumerate(items or [])
    ]
    _raise_if(problems)
    return out


_EVENT_REQUEST_FIELDS = {
    "request_uuid": (_uuid, True),
    "course_uuid": (_uuid, True),
    "sequence_number_offset": (_int(0, INT4_MAX), True),
    "event_types": (_event_types, False),
    "max_num_events": (_int(1, MAX_EVENTS), False),
}


def fetch_course_events(body: Any) -> list[dict[str, Any]]:
    problems: list[dict[str, str]] = []
    top = _object(body, "", {"course_event_requests": (lambda v: v, True)}, problems)
    _raise_if(problems)
    items = _list(top["course_event_requests"], "course_event_requests", MAX_EVENT_REQUESTS, problems)
    _raise_if(problems)
    out = []
    for i, item in enumerate(items or []):
        req = _object(item, f"course_event_requests[{i}]", _EVENT_REQUEST_FIELDS, problems)
        req.setdefault("event_types", None)
        req.setdefault("max_num_events", MAX_EVENTS)
        out.append(req)
    _raise_if(problems)
    return out
