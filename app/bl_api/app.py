"""The application factory: settings in, a Flask app with its database and error mapping out.

Error mapping an operator can rely on:
  4xx  the caller's fault (bad JSON, bad fields, unknown course, conflict, wrong route or
       method); the body says which field and why; nothing was written.
  503  the database is unreachable or refused the work; nothing was written; retry later.
       /ping answers 503 too, so the load balancer takes the host out of rotation.
  500  a bug in the service; logged with its traceback here, not exposed to the caller.
"""

from __future__ import annotations

import logging

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from bl_api.config import Settings
from bl_api.db import DATABASE_UNAVAILABLE, Database, EcosystemConflict, UnknownCourses
from bl_api.handlers import api
from bl_api.validation import InvalidRequest

log = logging.getLogger("bl_api")

MAX_BODY_BYTES = 8 * 1024 * 1024   # 1000 responses are ~0.5 MB; anything far larger is a mistake


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app. The database pool opens on the first request, i.e. inside the worker."""
    settings = settings or Settings.from_env()
    app = Flask("bl_api")
    app.config.update(
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
        BL_API_PING_TIMEOUT=settings.ping_timeout,
        BL_API_TEST_SLOW_HEADER=settings.test_slow_header,
    )
    app.json.sort_keys = False
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
