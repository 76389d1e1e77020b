"""What the fleet serves: the version each app host answers on `GET /version`, how each load
balancer sees each app host (`rotation`), and which hosts run a service older than its
configuration (`restart_owed`).

The contract gate reads it: a contract phase may run only once no app host serves a version that
still needs the old schema. A host that does not answer counts as blocking (its version is
unknown, so it may still need the old schema); `served_versions` says why it did not answer.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from opsbook.core.paths import ROOT
from opsbook.engines import httpclient

# The app role's own check (its switch and provision's drained restarts use the same file).
PREDATES_CONFIG_SH = ROOT / "roles" / "app" / "files" / "service-predates-config.sh"


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


def served_versions(env, timeout: float = 3.0) -> FleetVersions:
    """The version every app host of `env` (an inventory Env) answers on `GET /version`.

    Asked over HTTP from here (`opsbook_fleet_reads: http`, the lab), or, where the hosts' service
    port admits only the load balancer (`ssh`: AWS security groups), on each host itself over the
    inventory's SSH connection, through the bastion if the inventory says so. Returns host ->
    version, None for a host without a usable answer (`.reasons[host]` says why).
    """
    if env.var("opsbook_fleet_reads", "http") == "ssh":
        return _versions_over_ssh(env, timeout)
    out = FleetVersions()
    for h in env.hosts("app"):
        url = version_url(env, h)
        version, why = ask_version(url, timeout)
        out[h.name] = version
        out.urls[h.name] = url
        if why:
            out.reasons[h.name] = why
    return out


# On the host, with the Python every host has (common_packages): the body of its own /version, or
# the error on stderr. Ansible templates bl_api_port per host; raw ships no module.
_READ_ON_HOST = (
    "python3 -c 'import sys, urllib.request as u; sys.stdout.write(u.urlopen("
    "\"http://127.0.0.1:{{{{ bl_api_port }}}}/version\", timeout={timeout}).read().decode())'"
)


def _versions_over_ssh(env, timeout: float) -> FleetVersions:
    from opsbook.engines import ansible

    out = FleetVersions()
    for host, answer in ansible.raw(env, "app", _READ_ON_HOST.format(timeout=max(1, round(timeout)))).items():
        out.urls[host] = f"ssh {host}: http://127.0.0.1/version"
        if answer is None:
            out[host], out.reasons[host] = None, "unreachable over SSH (the inventory's connection)"
        elif answer[0] != 0:
            out[host], out.reasons[host] = None, f"no answer on the host (exit {answer[0]}): {answer[1].strip()[-200:]}"
        else:
            out[host], why = version_in(answer[1])
            if why:
                out.reasons[host] = why
    return out


def version_url(env, host) -> str:
    port = env.host_var(host.name, "bl_api_port", 8000)
    return f"http://{host.address}:{port}/version"


def ask_version(url: str, timeout: float = 3.0) -> tuple[str | None, str]:
    """(version, "") from a `{"version": "..."}` answer, or (None, why not)."""
    import httpx

    try:
        r = httpclient.get(url, timeout=timeout)
    except httpx.HTTPError as e:
        return None, f"unreachable: {type(e).__name__}: {str(e)[:200]}"
    if not r.is_success:
        return None, f"HTTP {r.status_code} from {url}"
    return version_in(r.text)


def version_in(body: str) -> tuple[str | None, str]:
    """(version, "") from a `/version` answer's body, or (None, why not)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None, f"answer is not JSON: {body.strip()[:100]!r}"
    version = doc.get("version") if isinstance(doc, dict) else None
    if not isinstance(version, str) or not version.strip():
        return None, f"answer has no version: {json.dumps(doc)[:100]}"
    return version.strip(), ""


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


def restart_owed(env) -> dict[str, bool | None]:
    """app host -> whether its service runs but started before its unit or environment file was last
    written (a converge wrote them and did not restart it, or was stopped first): a drained restart is
    owed, which `invoke provision` (or a release) does. None: the host gave no answer over SSH. Read
    with the app role's own check, shipped base64-encoded (no quoting to get wrong) to bash on each host."""
    from opsbook.engines import ansible

    script = (PREDATES_CONFIG_SH.read_text()
              + '\nif service_predates_config "$1"; then echo owed; else echo current; fi\n')
    encoded = base64.b64encode(script.encode()).decode()
    answers = ansible.raw(env, "app", f"printf %s {encoded} | base64 -d | bash -s -- {{{{ app_service | quote }}}}")
    return {host: (None if answer is None or answer[0] != 0 else answer[1].strip().endswith("owed"))
            for host, answer in answers.items()}
