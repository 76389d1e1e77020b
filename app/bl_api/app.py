"""The application factory: settings in, a Flask app with its database and error mapping out.

Error mapping an operator can rely on:
  4xx  the caller's fault (bad JSON, bad fields, unknown course, conflict, wrong route or
       method); the body says which field and why; nothing was written.
  503  the database is unreachable or refused the work; nothing was written; retry later.
       /ping answers 503 too, so the load balancer takes the host out of rotation.
  500  a bug in the service; logged with its traceback here, not exposed to the caller.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import orjson
from flask import Flask, jsonify
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException

from bl_api.config import Settings
from bl_api.db import DATABASE_UNAVAILABLE, Database, EcosystemConflict, UnknownCourses
from bl_api.handlers import api
from bl_api.validation import InvalidRequest

log = logging.getLogger("bl_api")

MAX_BODY_BYTES = 8 * 1024 * 1024   # 1000 responses are ~0.5 MB; anything far larger is a mistake


class JSONProvider(DefaultJSONProvider):
    """Flask's JSON with orjson doing the encoding: the same bodies (compact, keys in insertion order,
    a trailing newline, UUIDs as strings) for a fraction of the CPU. Anything orjson refuses (an integer
    beyond 64 bits in an event's data, a type it does not know) goes through Flask's own encoder."""

    sort_keys = False

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        if not kwargs:
            try:
                return orjson.dumps(obj).decode()
            except TypeError:   # orjson.JSONEncodeError
                pass
        return super().dumps(obj, **kwargs)

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return orjson.loads(s) if not kwargs else json.loads(s, **kwargs)

    def response(self, *args: Any, **kwargs: Any):
        obj = self._prepare_response_obj(args, kwargs)
        try:
            body = orjson.dumps(obj)
        except TypeError:
            return super().response(obj)
        return self._app.response_class(body + b"\n", mimetype=self.mimetype)


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app. The database pool opens on the first request, i.e. inside the worker."""
    settings = settings or Settings.from_env()
    app = Flask("bl_api")
    app.json = JSONProvider(app)
    app.config.update(
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
        BL_API_PING_TIMEOUT=settings.ping_timeout,
        BL_API_TEST_SLOW_HEADER=settings.test_slow_header,
    )
    app.extensions["bl_api_db"] = Database(
        settings.database_url, max_size=settings.pool_max, timeout=settings.pool_timeout,
        reconnect_timeout=settings.pool_reconnect_timeout,
    )
    app.register_blueprint(api)
    _register_errors(app)
    return app


def _error(status: int, message: str, details=None):
    return jsonify(error=message, details=details), status


def _register_errors(app: Flask) -> None:
    @app.errorhandler(InvalidRequest)
    def invalid_request(e: InvalidRequest):
        return _error(e.status, "invalid request", e.problems)

    @app.errorhandler(UnknownCourses)
    def unknown_courses(e: UnknownCourses):
        return _error(404, "unknown course; nothing from this batch was recorded",
                      {"course_uuids": e.course_uuids})

    @app.errorhandler(EcosystemConflict)
    def ecosystem_conflict(e: EcosystemConflict):
        return _error(409, "course already exists with a different ecosystem",
                      {"course_uuid": e.course_uuid, "existing_ecosystem_uuid": e.existing,
                       "requested_ecosystem_uuid": e.requested})

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        return _error(e.code or 500, e.name, e.description)

    def database_unavailable(e: Exception):
        log.warning("database unavailable: %s", e)
        return _error(503, "database unavailable; nothing was written, retry later")   # details stay in the log

    for kind in DATABASE_UNAVAILABLE:
        app.register_error_handler(kind, database_unavailable)

    @app.errorhandler(Exception)
    def internal_error(e: Exception):
        log.exception("unhandled error")
        return _error(500, "internal error", None)
