"""HTTP endpoints in the shape of the Biglearn API. Every response body is JSON."""

from __future__ import annotations

import time
from typing import Any

import orjson
from flask import Blueprint, current_app, jsonify, request

from bl_api import running_version, validation
from bl_api.db import DATABASE_UNAVAILABLE, Database

api = Blueprint("api", __name__)

MAX_TEST_DELAY = 60.0


def _db() -> Database:
    return current_app.extensions["bl_api_db"]


def _json_body() -> Any:
    """The parsed JSON body, or InvalidRequest (415 for a non-JSON content type, 400 if unparsable)."""
    if not request.is_json:
        raise validation.InvalidRequest(
            [{"field": "Content-Type", "problem": "must be application/json"}], status=415
        )
    try:
        # orjson: about a tenth of the standard library's cost per body; the same documents accepted,
        # except numbers beyond 64 bits, NaN and Infinity, which no field takes anyway (still a 400).
        return orjson.loads(request.get_data(cache=False))
    # orjson.JSONDecodeError is a ValueError (too deep a nesting included); RecursionError kept in case.
    except (ValueError, RecursionError) as e:
        why = str(e)[:200] if isinstance(e, ValueError) else "nested too deeply"
        problems = [{"field": "(body)", "problem": f"is not valid JSON ({why})"}]
        raise validation.InvalidRequest(problems) from None


@api.post("/create_course", provide_automatic_options=False)
def create_course():
    body = validation.create_course(_json_body())
    _db().create_course(body["course_uuid"], body["ecosystem_uuid"])
    return jsonify(created_course_uuid=body["course_uuid"])


@api.post("/record_responses", provide_automatic_options=False)
def record_responses():
    responses = validation.record_responses(_json_body())
    return jsonify(recorded_response_uuids=_db().record_responses(responses))


@api.post("/fetch_course_events", provide_automatic_options=False)
def fetch_course_events():
    requests = validation.fetch_course_events(_json_body())
    return jsonify(course_event_responses=_db().fetch_course_events(requests))


@api.get("/ping", provide_automatic_options=False)
def ping():
    """Load-balancer health check: 200 only when this worker can reach the database."""
    if current_app.config["BL_API_TEST_SLOW_HEADER"] and "X-Test-Delay" in request.headers:
        try:
            delay = float(request.headers["X-Test-Delay"])
        except ValueError:
            raise validation.InvalidRequest(
                [{"field": "X-Test-Delay", "problem": "must be a number of seconds"}]
            ) from None
        time.sleep(min(max(delay, 0.0), MAX_TEST_DELAY))
    try:
        _db().ping(current_app.config["BL_API_PING_TIMEOUT"])
    except DATABASE_UNAVAILABLE as e:
        # The reason goes to the service's log (journal), never to whoever asks /ping: database
        # error text names hosts, users and databases.
        current_app.logger.warning("/ping: database unavailable: %s", e)
        return jsonify(status="unavailable", error="database unavailable"), 503
    return jsonify(status="ok")


@api.get("/version", provide_automatic_options=False)
def version():
    return jsonify(version=running_version())
