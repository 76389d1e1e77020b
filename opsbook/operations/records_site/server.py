"""`invoke records.serve`: the site of a local record store over HTTP, on 127.0.0.1 only.

The site needs no server (its pages open from the directory); this is for a browser that will not
follow ``file://`` links, or a colleague's SSH tunnel. It serves the store's root, where the site's
pages link to the records, never lists directories, and binds to loopback and nothing else.
"""

from __future__ import annotations

import http.server
from collections.abc import Callable
from functools import partial
from pathlib import Path

from opsbook.core.errors import OpsbookError
from opsbook.engines.records.store import LocalStore, store_for

LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 8765


class _Handler(http.server.SimpleHTTPRequestHandler):
    def list_directory(self, path):
        self.send_error(403, "directory listings are off; the site starts at /site/index.html")


def check_bind(bind: str) -> str:
    if bind != LOOPBACK:
        raise OpsbookError(
            f"records.serve binds {LOOPBACK} only; {bind!r} was refused and nothing was started: records "
            "describe production and this server has no authentication. To let someone else see the "
            "site, reach it through an SSH tunnel, or build it into the environment's bucket (AWS stores).")
    return bind


def make_server(root: Path, port: int = 0, bind: str = LOOPBACK) -> http.server.ThreadingHTTPServer:
    """A server (not started) for the files under `root` on bind:port (0: any free port)."""
    check_bind(bind)
    try:
        return http.server.ThreadingHTTPServer((bind, port), partial(_Handler, directory=str(root)))
    except OSError as e:
        raise OpsbookError(f"cannot listen on {bind}:{port} ({e.strerror}); nothing was started. "
                           "Pass another --port.") from None


def serve(env, port: int | None = None, bind: str = LOOPBACK, log: Callable[[str], None] = print) -> None:
    """Serve the environment's local site until Ctrl-C."""
    check_bind(bind)
    store = store_for(env)
    if not isinstance(store, LocalStore):
        raise OpsbookError(
            f"{env.name}'s records are in {store.url}; records.serve serves a local store only, and nothing was "
            f"started. The site of an S3 store is in the bucket: {store.location('site/index.html')}.")
    if not (store.root / "site" / "index.html").is_file():
        raise OpsbookError(f"no site in {store.root / 'site'} yet; nothing was started. Build it first: "
                           f"`invoke records.site --env {env.name}`.")
    server = make_server(store.root, DEFAULT_PORT if port is None else int(port), bind)
    host, real_port = server.server_address[:2]
    log(f"serving {store.root} at http://{host}:{real_port}/site/index.html ({LOOPBACK} only); Ctrl-C stops it")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log("stopped")
    finally:
        server.server_close()
