"""WSGI entry point for gunicorn: `gunicorn -c python:bl_api.gunicorn_conf bl_api.wsgi:app`.

Importing this module builds the app (settings are checked, so a bad environment stops the
worker from booting with a clear message). The database pool itself opens on the first
request, so it always belongs to the worker process that uses it, even under --preload.
"""

import logging

from bl_api.app import create_app

# Under gunicorn, the service's own log lines go where gunicorn's error log goes (journald).
_gunicorn_log = logging.getLogger("gunicorn.error")
if _gunicorn_log.handlers:
    logging.getLogger("bl_api").handlers = _gunicorn_log.handlers
    logging.getLogger("bl_api").setLevel(_gunicorn_log.level)

app = create_app()


def close() -> None:
    """Close this worker's database pool (gunicorn's worker_exit hook calls it)."""
    app.extensions["bl_api_db"].close()
