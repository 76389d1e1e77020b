"""What the fleet serves: the version each app host answers on `GET /version`, and how each load
balancer sees each app host (`rotation`).

The contract gate reads it: a contract phase may run only once no app host serves a version that
still needs the old schema. A host that does not answer counts as blocking (its version is
unknown, so it may still need the old schema); `served_versions` says why it did not answer.
"""

from __future__ import annotations

import json
from typing import Any


class FleetVersions(dict):
    """host -> version served (None: no usable answer). `reasons[host]` says why a host has None;
    `urls[host]` is the address that was asked."""

    def __init__(self, versions: dict[str, str | None] | None = None, reasons: dict[str, str] | None = None,
                 urls: dict[str, str] | None = None):
        super().__init__(versions or {})
        self.reasons: dict[str, str] = dict(reasons or {})
        self.urls: dict[str, str] = dict(urls or {})

    def rows(self) -> list[dict[str, Any]]:
        """One row per host (host, url, version, problem), for a table."""
        return [
            {"host": h, "url": self.urls.get(h, ""), "version": v, "problem": self.reasons.get(h, "")}
            for h, v in sorted(self.items())
        ]


def version_url(env, host) -> str:
    port = env.host_var(host.name, "bl_api_port", 8000)
    return f"http://{host.address}:{port}/version"


def ask_version(url: str, timeout: float = 3.0) -> tuple[str | None, str]:
    """(version, "") from a `{"version": "..."}` answer, or (None, why not)."""
    import httpx

    try:
        r = httpx.get(url, timeout=timeout)
    except httpx.HTTPError as e:
        return None, f"unreachable: {type(e).__name__}: {str(e)[:200]}"
    if not r.is_success:
        return None, f"HTTP {r.status_code} from {url}"
    try:
        doc = r.json()
    except ValueError:
        return None, f"answer is not JSON: {r.text.strip()[:100]!r}"
    version = doc.get("version") if isinstance(doc, dict) else None
    if not isinstance(version, str) or not version.strip():
        return None, f"answer has no version: {json.dumps(doc)[:100]}"
    return version.strip(), ""


def served_versions(env, timeout: float = 3.0) -> FleetVersions:
    """GET http://<address>:<bl_api_port>/version on every app host of `env` (an inventory Env).

    Returns host -> version, None for a host without a usable answer (`.reasons[host]` says why).
    """
    out = FleetVersions()
    for h in env.hosts("app"):
        url = version_url(env, h)
        version, why = ask_version(url, timeout)
        out[h.name] = version
        out.urls[h.name] = url
        if why:
            out.reasons[h.name] = why
    return out



def rotation(env) -> dict[str, dict[str, str]]:
    """app host -> {load balancer: the status haproxy gives it (UP, DOWN, MAINT, DRAIN, ...)}, read
    from every lb host's admin socket over SSH (`show stat`, its CSV read by column name). A load
    balancer that does not answer, or does not list the host, gives "unknown"."""
    from opsbook.engines import ansible

    backend, socket = env.var("lb_backend_name"), env.var("lb_admin_socket")
    apps = [h.name for h in env.hosts("app")]
    out: dict[str, dict[str, str]] = {h: {} for h in apps}
    for lb, answer in ansible.raw(env, "lb", f"echo 'show stat' | socat stdio {socket}").items():
        rows = stat_rows(answer[1]) if answer and answer[0] == 0 else []
        for h in apps:
            status = next((r.get("status", "") for r in rows if r.get("pxname") == backend and r.get("svname") == h),
                          "")
            out[h][lb] = status or "unknown"
    return out


def stat_rows(csv_text: str) -> list[dict[str, str]]:
    """haproxy's `show stat` CSV as rows keyed by column name (the header line `# pxname,svname,...`),
    never by position: the columns haproxy prints differ between versions. The one reader of that
    CSV (fleet, status, the host checks and the lab tests use it)."""
    import csv

    lines = [line for line in csv_text.replace("\r", "").splitlines() if line.strip()]
    header = next((line for line in lines if line.startswith("# ")), None)
    if header is None:
        return []
    body = [line for line in lines if not line.startswith("#")]
    return list(csv.DictReader(body, fieldnames=header[2:].split(",")))
