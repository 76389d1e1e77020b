"""The service's role on a managed database (playbooks/provision-managed-db.yml, the postgres role's
tasks/database.yml with postgres_managed), against a real local Postgres standing in for RDS/Aurora.

What stands in, and how far: RDS's admin (master) role is no superuser: it has CREATEROLE and CREATEDB,
owns the database AWS made, and cannot read pg_authid. The test makes exactly such a role in a local
cluster, and a database it owns, then runs the real play with the real modules, logged in as that role
over TCP. What is not shown here: the play running on an app host in AWS, reached through the bastion
(that needs hosts; here the "app host" is this machine, connection local), and RDS itself (moto runs no
Postgres). The local cluster trusts every connection, so the password is checked against the SCRAM
verifier Postgres stored, not by logging in with it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import sys
import uuid

import psycopg
import pytest
import yaml

from opsbook.core.inventory import Env
from opsbook.engines import ansible

pytestmark = pytest.mark.postgres


def _scram_matches(verifier: str, password: str) -> bool:
    """Whether a SCRAM-SHA-256 verifier from pg_authid (RFC 5803 form) was made from `password`."""
    method, rest = verifier.split("$", 1)
    iterations_salt, keys = rest.split("$")
    iterations, salt = iterations_salt.split(":")
    stored_key, server_key = keys.split(":")
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    return (method == "SCRAM-SHA-256"
            and base64.b64encode(hashlib.sha256(client_key).digest()).decode() == stored_key
            and base64.b64encode(hmac.new(salted, b"Server Key", hashlib.sha256).digest()).decode() == server_key)


@pytest.fixture
def managed(local_pg, tmp_path):
    """An RDS-like database in the local cluster (its admin role, not a superuser, owns it) and an inventory
    whose one app host is this machine; yields (env, names), drops what it made."""
    port = int(dict(p.split("=") for p in local_pg.split())["port"])
    tag = uuid.uuid4().hex[:8]
    names = {"admin": f"admin_{tag}", "service": f"svc_{tag}", "database": f"db_{tag}",
             "admin_password": f"admin-pw-{tag}", "service_password": f"service-pw-{tag}"}
    with psycopg.connect(local_pg, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {names['admin']} LOGIN CREATEROLE CREATEDB PASSWORD '{names['admin_password']}'")
        conn.execute(f"CREATE DATABASE {names['database']} OWNER {names['admin']}")
    path = tmp_path / f"managed-{tag}"
    (path / "group_vars" / "all").mkdir(parents=True)
    (path / "hosts.yml").write_text(yaml.safe_dump({"all": {"children": {"app": {"hosts": {"app-here": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable}}}, "db": {}, "lb": {}}}}))
    (path / "group_vars" / "all" / "main.yml").write_text(yaml.safe_dump({
        "opsbook_env_kind": "lab",          # only what the play reads: no AWS call is made
        "opsbook_db_managed": True,
        "opsbook_db_driver_package": "",    # this "app host" is the controller: its Python has psycopg
        "bl_api_db_address": "127.0.0.1",
        "bl_api_db_port": port,
        "bl_api_db_name": names["database"],
        "bl_api_db_user": names["service"],
        "bl_api_db_password": names["service_password"],
        "opsbook_db_admin_user": names["admin"],
        "opsbook_db_admin_password": names["admin_password"],
    }))
    yield Env(path.name, path=path), names
    with psycopg.connect(local_pg, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {names['database']} WITH (FORCE)")
        conn.execute(f"DROP ROLE IF EXISTS {names['service']}")
        conn.execute(f"DROP ROLE IF EXISTS {names['admin']}")


def test_the_service_role_is_made_on_a_managed_database_as_its_admin_then_nothing_changes(managed, local_pg):
    env, n = managed
    first = ansible.run_playbook(env, "provision-managed-db.yml")
    assert first["app-here"]["changed"] >= 3, first   # the role, CONNECT/USAGE, the default privileges
    second = ansible.run_playbook(env, "provision-managed-db.yml")
    assert second["app-here"]["changed"] == 0, second

    database = local_pg.replace("dbname=postgres", f"dbname={n['database']}")
    with psycopg.connect(local_pg) as conn:
        login, superuser, verifier = conn.execute(
            "SELECT rolcanlogin, rolsuper, rolpassword FROM pg_authid WHERE rolname = %s", (n["service"],)).fetchone()
        assert (login, superuser) == (True, False)
        assert _scram_matches(verifier, n["service_password"])
        assert not _scram_matches(verifier, "another password")
        assert conn.execute("SELECT has_database_privilege(%s, %s, 'CONNECT')",
                            (n["service"], n["database"])).fetchone()[0]
    # A table the admin role makes (what migrations do) is the service's to read and write, not to own
    # or change; the service cannot make tables of its own.
    with psycopg.connect(database + f" user={n['admin']}", autocommit=True) as admin:
        admin.execute("CREATE TABLE course_events (id bigserial PRIMARY KEY, kind text)")
    with psycopg.connect(database + f" user={n['service']}", autocommit=True) as service:
        service.execute("INSERT INTO course_events (kind) VALUES ('created')")
        assert service.execute("SELECT count(*) FROM course_events").fetchone()[0] == 1
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            service.execute("DROP TABLE course_events")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            service.execute("CREATE TABLE mine (x int)")


def test_without_a_managed_database_the_play_does_nothing(managed):
    env, _ = managed
    (env.path / "group_vars" / "all" / "zz-lab.yml").write_text("opsbook_db_managed: false\n")
    recap = ansible.run_playbook(env, "provision-managed-db.yml")
    assert recap["app-here"]["changed"] == 0, recap
