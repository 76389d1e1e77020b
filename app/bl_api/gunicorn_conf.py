"""Gunicorn settings for bl-api, from environment variables (the systemd unit sets them).

| variable                | meaning                                                | default        |
|-------------------------|--------------------------------------------------------|----------------|
| BL_API_BIND             | address:port to listen on                              | 127.0.0.1:8000 |
| BL_API_WORKERS          | worker processes                                       | 2              |
| BL_API_THREADS          | request threads per worker (keep <= BL_API_POOL_MAX)   | 4              |
| BL_API_GRACEFUL_TIMEOUT | seconds in-flight requests get to finish on SIGTERM    | 25             |
| BL_API_LOG_LEVEL        | gunicorn log level                                     | info           |
| BL_API_ACCESS_LOG       | `0`: no line per request (errors are still logged)     | 1              |

On SIGTERM gunicorn closes the listening socket, lets each worker finish its in-flight
requests (up to the graceful timeout), runs worker_exit (closes the database pool) and
exits 0.
"""

import os

bind = os.environ.get("BL_API_BIND", "127.0.0.1:8000")
worker_class = "gthread"
workers = int(os.environ.get("BL_API_WORKERS", "2"))
threads = int(os.environ.get("BL_API_THREADS", "4"))
graceful_timeout = int(os.environ.get("BL_API_GRACEFUL_TIMEOUT", "25"))
timeout = 30
keepalive = 5
loglevel = os.environ.get("BL_API_LOG_LEVEL", "info")
# A line per request costs the worker and the journal CPU on every request (the scaling check measured it);
# errors are logged either way.
accesslog = None if os.environ.get("BL_API_ACCESS_LOG", "1") == "0" else "-"
errorlog = "-"
proc_name = "bl-api"


def worker_exit(server, worker):
    """Close the exiting worker's database pool once its in-flight requests are done."""
    import sys

    wsgi = sys.modules.get("bl_api.wsgi")
    if wsgi is not None:
        wsgi.close()


def post_worker_init(worker):
    """Let a gthread worker see SIGTERM at once. Its loop waits in select() for up to a second at a
    time and its SIGTERM handler only clears `alive`, so a worker noticed a stop 0.5 s later on
    average, in every restart of a release's rolling switch. gunicorn already points Python's signal
    wake-up fd at the worker's pipe (`worker.PIPE`); the gthread loop just never listens to it. Here
    it does: a signal makes select() return, the loop reads the pipe and sees `alive` cleared. In-flight
    requests finish as before (the graceful timeout is unchanged)."""
    import selectors

    poller = getattr(worker, "poller", None)
    if poller is None or not getattr(worker, "PIPE", None):
        return   # not a gthread worker: nothing waits in a selector

    def drain(pipe):
        try:
            while os.read(pipe, 4096):
                pass
        except BlockingIOError:
            pass

    poller.register(worker.PIPE[0], selectors.EVENT_READ, drain)
