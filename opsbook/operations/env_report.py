"""The state of an environment, as the env_report runbook shows it.

Every check degrades to a row that says "unreachable" (and why) instead of raising: a report
about a broken environment is exactly when it is needed. Each function returns plain rows
(dicts) so the runbook can show them as tables and report the key figures.
"""

from __future__ import annotations

import shlex
import subprocess
from typing import Any

from opsbook.engines import ansible, httpclient
from opsbook.engines import database as database_engine

OK, UNREACHABLE, NOT_PROBED = "ok", "unreachable", "not probed"


def _last_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


# -- hosts -----------------------------------------------------------------------------------
def ssh_check(
    address: str,
    *,
    user: str | None = None,
    key_file: str | None = None,
    common_args: str = "",
    port: int = 22,
    timeout: float = 5.0,
) -> dict[str, Any]:
    """Does the host answer SSH (and run a command)? Uses the system ssh, never prompts."""
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, round(timeout))}", "-p", str(port)]
    if key_file:
        cmd += ["-i", str(key_file)]
    cmd += shlex.split(common_args or "")
    cmd += [f"{user}@{address}" if user else address, "true"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 5, check=False)
    except subprocess.TimeoutExpired:
        return {"ssh": UNREACHABLE, "detail": f"no answer within {timeout:.0f} s"}
    except OSError as e:
        return {"ssh": UNREACHABLE, "detail": f"cannot run ssh: {e.strerror}"}
    if done.returncode == 0:
        return {"ssh": OK, "detail": ""}
    return {"ssh": UNREACHABLE, "detail": _last_line(done.stderr) or f"ssh exited {done.returncode}"}


def hosts(env, *, probe: bool = True, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Every host of the environment and whether it answers SSH."""
    rows = []
    for h in env.hosts():
        row: dict[str, Any] = {"host": h.name, "address": h.address, "groups": ", ".join(h.groups)}
        if not probe:
            row.update(ssh=NOT_PROBED, detail="")
        else:
            try:
                ssh = ansible.ssh_settings(env, h.name)   # as Ansible reaches it (a ProxyJump too)
            except Exception as e:  # noqa: BLE001 - an unresolvable variable is a finding, not a crash
                row.update(ssh=UNREACHABLE, detail=f"inventory: {e}")
            else:
                row.update(ssh_check(h.address, user=ssh.user, key_file=ssh.key_file, common_args=ssh.common_args,
                                     port=ssh.port, timeout=timeout))
        rows.append(row)
    return rows


# -- HTTP ------------------------------------------------------------------------------------
def http_get(url: str, *, timeout: float = 3.0) -> dict[str, Any]:
    """GET a URL; status `ok` for a 2xx answer, with its body (first 200 characters)."""
    import httpx

    try:
        r = httpclient.get(url, timeout=timeout)
    except httpx.HTTPError as e:
        return {"url": url, "status": UNREACHABLE, "http_status": None, "body": "", "detail": str(e)[:200]}
    status = OK if r.is_success else f"HTTP {r.status_code}"
    body = r.text.strip()[:200]
    return {"url": url, "status": status, "http_status": r.status_code, "body": body, "detail": ""}


def app_versions(env, *, probe: bool = True, timeout: float = 3.0) -> list[dict[str, Any]]:
    """The version each app host serves (GET /version on bl_api_port, as opsbook.fleet asks it)."""
    from opsbook.engines import fleet
    rows = []
    for h in env.hosts("app"):
        url = fleet.version_url(env, h)
        if not probe:
            rows.append({"host": h.name, "url": url, "status": NOT_PROBED, "version": None})
            continue
        version, why = fleet.ask_version(url, timeout=timeout)
        status = OK if version else (UNREACHABLE if why.startswith("unreachable") else why.split(" from ")[0])
        rows.append({"host": h.name, "url": url, "status": status, "version": version, "detail": why})
    return rows


def lb_health(env, *, probe: bool = True, timeout: float = 3.0) -> list[dict[str, Any]]:
    """The service's health through each load balancer (GET /ping on lb_http_port)."""
    rows = []
    for h in env.hosts("lb"):
        port = env.host_var(h.name, "lb_http_port", 80)
        url = f"http://{h.address}:{port}/ping"
        if not probe:
            rows.append({"host": h.name, "url": url, "status": NOT_PROBED})
            continue
        got = http_get(url, timeout=timeout)
        rows.append({"host": h.name, "url": url, "status": got["status"], "body": got["body"],
                     "detail": got["detail"]})
    return rows


# -- database --------------------------------------------------------------------------------
def database_state(conninfo: str, *, timeout: float = 5.0, largest: int = 5) -> dict[str, Any]:
    """Size, largest tables and applied migrations of one database; `unreachable` if it cannot connect."""
    import psycopg

    try:
        conn = psycopg.connect(conninfo, connect_timeout=max(1, round(timeout)), autocommit=True)
    except psycopg.Error as e:
        return {"status": UNREACHABLE, "detail": _last_line(str(e)), "size_bytes": None,
                "largest_tables": [], "migrations": []}
    with conn:
        size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        tables = conn.execute(
            """
            SELECT n.nspname || '.' || c.relname, pg_total_relation_size(c.oid), c.reltuples::bigint
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
              AND n.nspname NOT LIKE 'pg_toast%%'
            ORDER BY 2 DESC, 1 LIMIT %s
            """,
            (largest,),
        ).fetchall()
        migrations = []
        if conn.execute("SELECT to_regclass('opsbook_migrations') IS NOT NULL").fetchone()[0]:
            migrations = [
                {"migration": m, "phase": p, "applied_at": a.isoformat(timespec="seconds")}
                for m, p, a in conn.execute(
                    "SELECT migration, phase, applied_at FROM opsbook_migrations "
                    "ORDER BY applied_at, migration"
                )
            ]
    return {
        "status": OK,
        "detail": "",
        "size_bytes": int(size),
        "largest_tables": [
            {"table": t, "total_bytes": int(b), "estimated_rows": max(int(r), 0)} for t, b, r in tables
        ],
        "migrations": migrations,
    }


def database(env, *, probe: bool = True, timeout: float = 5.0) -> dict[str, Any]:
    """The service database as the inventory names it (bl_api_db_address, or the host bl_api_db_host;
    bl_api_db_name), as the admin role."""
    empty = {"size_bytes": None, "largest_tables": [], "migrations": []}
    try:
        address = database_engine.address(env)
        port = int(env.var("bl_api_db_port", 5432))
        dbname = env.var("bl_api_db_name")
        user = env.var("opsbook_db_admin_user")
    except Exception as e:  # noqa: BLE001 - a missing variable is a finding, not a crash
        return {"status": UNREACHABLE, "detail": f"inventory: {e}", "where": "?", **empty}
    where = f"{user}@{address}:{port}/{dbname}"
    if not probe:
        return {"status": NOT_PROBED, "detail": "", "where": where, **empty}
    try:
        conninfo = database_engine.admin_conninfo(env)
    except Exception:  # noqa: BLE001 - e.g. the lab's secret files do not exist yet
        detail = "the admin password is not available (is the environment up?)"
        return {"status": UNREACHABLE, "detail": detail, "where": where, **empty}
    return {"where": where, **database_state(conninfo, timeout=timeout)}


# -- records ---------------------------------------------------------------------------------
def last_records(store, n: int = 10) -> list[dict[str, Any]]:
    """The newest n ledger entries of a store, newest first; one `unreachable` row if it cannot be read."""
    try:
        entries = store.ledger()
    except Exception as e:  # noqa: BLE001 - an unreadable store is a finding of this report
        return [{"id": None, "outcome": UNREACHABLE, "detail": str(e)[:200]}]
    return [
        {k: e.get(k) for k in ("id", "runbook", "outcome", "start", "duration_s", "operator", "error")}
        for e in reversed(entries[-n:])
    ]


def summary(host_rows, app_rows, lb_rows, db) -> dict[str, Any]:
    """Key figures for the ledger."""
    versions = sorted({r["version"] for r in app_rows if r.get("version")})
    return {
        "hosts_total": len(host_rows),
        "hosts_answering": sum(r["ssh"] == OK for r in host_rows),
        "app_versions": versions,
        "lb_healthy": bool(lb_rows) and all(r["status"] == OK for r in lb_rows),
        "db_status": db["status"],
        "db_size_bytes": db.get("size_bytes"),
        "migrations_applied": len(db.get("migrations") or []),
    }


def store_from(url: str, env):
    """The store named by a URL, or the environment's own when the URL is empty."""
    from opsbook.engines.records.store import open_store, store_for

    return open_store(url) if url else store_for(env)


__all__ = ["app_versions", "database", "database_state", "hosts", "http_get", "last_records", "lb_health",
           "ssh_check", "store_from", "summary"]
