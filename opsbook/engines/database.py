"""Database access for an environment: the admin connection and what an operation asks the
service database before it acts (applied migration phases, pending migrations, the schema floor).

An operation opens one :class:`Admin` session and asks all its questions on that connection
(a release's plan used to connect three times).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opsbook.core.errors import OpsbookError
from opsbook.core.inventory import Env
from opsbook.engines import migrations
from opsbook.engines.migrations import guards


class DatabaseUnreachable(OpsbookError):
    """The environment's database refused or did not answer."""


def address(env: Env, host: str | None = None) -> str:
    """Where the environment's service database answers: `host`'s address when given; else a managed
    database's (bl_api_db_address: RDS or Aurora, published by provisioning in SSM Parameter Store);
    else the address of the inventory host named by bl_api_db_host."""
    if host:
        return env.host(host).address
    try:
        managed = env.var("bl_api_db_address", "")
    except Exception as e:  # noqa: BLE001 - Ansible's lookup errors are of many kinds; all mean the same here
        raise OpsbookError(
            f"the address of {env.name}'s database (bl_api_db_address) could not be read: {e}. Nothing was "
            f"changed. If the environment was never provisioned, run `invoke provision --env {env.name}`.") from None
    return managed or env.host(env.var("bl_api_db_host")).address


def admin_conninfo(env: Env, host: str | None = None) -> str:
    """libpq conninfo for the admin role on the environment's service database."""
    from psycopg.conninfo import make_conninfo

    return make_conninfo(
        host=address(env, host),
        port=env.var("bl_api_db_port"),
        dbname=env.var("bl_api_db_name"),
        user=env.var("opsbook_db_admin_user"),
        password=env.var("opsbook_db_admin_password"),
        connect_timeout=5,
        application_name="opsbook",
    )


@dataclass(frozen=True)
class Pending:
    """What a set of migration files would still do to a database."""

    expand: list[str]            # migrations whose expand phase has not run
    contracts: list[str]         # contracts whose expand ran and which still wait (described)
    contract_done: set[str]      # migrations whose contract phase has run


class Admin:
    """One admin connection to an environment's service database, for the questions an operation
    asks before it acts. Use as a context manager; raises DatabaseUnreachable when it cannot connect."""

    def __init__(self, env: Env):
        self.env = env
        self.conninfo = admin_conninfo(env)
        self.conn: Any = None

    def __enter__(self) -> Admin:
        import psycopg

        try:
            self.conn = psycopg.connect(self.conninfo, autocommit=True)
        except psycopg.Error as e:
            raise DatabaseUnreachable(f"{self.env.name}'s database does not answer: {str(e).strip()}") from e
        return self

    def __exit__(self, *exc: object) -> None:
        if self.conn is not None:
            self.conn.close()

    def applied_phases(self) -> set[tuple[str, str]]:
        return migrations.applied_phases(self.conn)

    def pending(self, mig_dir: Path) -> Pending:
        done = self.applied_phases()
        expand = [m.id for m in migrations.load_migrations(mig_dir) if (m.id, "expand") not in done]
        contracts = [str(c) for c in migrations.pending_contracts(self.conn, mig_dir)]
        return Pending(expand, contracts, {m for m, phase in done if phase == "contract"})

    def schema_floor(self, mig_dir: Path) -> dict[str, str]:
        """migration -> the lowest app version its applied contract allows (contract_requires_version)."""
        done = {m for m, phase in self.applied_phases() if phase == "contract"}
        return {m.id: m.contract_requires_version for m in migrations.load_migrations(mig_dir)
                if m.id in done and m.contract_requires_version}

    def blocking_sessions(self) -> list:
        """Long or idle-in-transaction sessions that would block a migration's DDL."""
        return guards.blocking_sessions(self.conn, guards.Settings())


def refuse_below(floor: dict[str, str], version: str, env_name: str) -> None:
    """Refuse `version` when it is older than what an applied contract requires: it would meet a
    schema it cannot use."""
    from packaging.version import InvalidVersion, Version

    try:
        target = Version(version)
    except InvalidVersion:
        return
    blocking = [f"{m} (needs >= {need})" for m, need in floor.items() if target < Version(need)]
    if blocking:
        raise OpsbookError(f"{version} is older than the schema of {env_name} allows: contract(s) "
                           f"{', '.join(blocking)} already ran, so {version} would fail against it. Nothing "
                           f"was changed. Release or roll back to a version at or above those.")
