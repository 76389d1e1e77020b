"""httpx clients that share one TLS context per process.

httpx builds a new SSL context for every `Client` (and every `httpx.get`), loading certifi's CA
bundle each time: about 30 ms of CPU on this machine, more when it is busy (py-spy put a second of a
release's CPU there), for requests that are nearly all plain HTTP to the lab's hosts. The release
probe alone made ten clients per release (its senders, its courses, its read-back), and every read of
the versions served one per host. One context, built on first use and verifying certificates as
httpx's default does (certifi's bundle), serves them all: an `ssl.SSLContext` is safe to share
between clients and threads once it is configured, and nothing here changes it after.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def tls_context() -> Any:
    """The process's one TLS context (httpx's default: certifi's CA bundle, certificates verified)."""
    import httpx

    return httpx.create_ssl_context()


def client(**kwargs: Any) -> Any:
    """An `httpx.Client` on the shared TLS context (the caller closes it, e.g. with `with`)."""
    import httpx

    return httpx.Client(verify=tls_context(), **kwargs)


def get(url: str, *, timeout: float) -> Any:
    """`httpx.get` on the shared TLS context."""
    with client(timeout=timeout) as c:
        return c.get(url)
