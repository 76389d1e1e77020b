"""Making a promoted clone the target's own before it serves: only the service's database left in
it, and the target's credentials instead of the source's.

A clone is a copy of the source's whole cluster: every database in it and every role with its
password hash. Before it serves the target:

- :func:`keep_only` drops every other database (their contents were never declared in a masking
  file, so none of it may reach staging) and makes an empty ``postgres`` maintenance database;
- :func:`give_credentials` sets the target's service role and admin role passwords (from the
  target's inventory, i.e. its vault) and removes the password of every other role that has one, so
  no password of the source opens the clone. Passwords are hashed on the controller (libpq's
  ``PQencryptPasswordConn``, SCRAM-SHA-256): the plain text never reaches the server or its log.
  A target role the clone does not have is created and made a member of the source's service role,
  so it has the same privileges.

Both connect as a superuser of the clone (its private socket, before it serves).
"""

from __future__ import annotations

from typing import Any


def keep_only(conninfo: str, dbname: str) -> list[str]:
    """Drop every non-template database but `dbname` (connected to through `conninfo`); recreate an
    empty `postgres`. Returns the databases dropped."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(conninfo, autocommit=True) as conn:
        others = [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE NOT datistemplate AND datname <> %s ORDER BY 1", (dbname,))]
        for name in others:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        if dbname != "postgres":
            conn.execute("CREATE DATABASE postgres")
    return others


def _scram(conn: Any, user: str, password: str) -> str:
    return conn.pgconn.encrypt_password(password.encode(), user.encode(), b"scram-sha-256").decode()


def give_credentials(conninfo: str, *, roles: dict[str, str], member_of: dict[str, str] | None = None
                     ) -> dict[str, Any]:
    """Set each role's password (`roles`: name -> password), creating a missing one as a member of
    `member_of[name]` when that role exists; remove every other role's password. Returns what was set,
    created and cleared (names only)."""
    import psycopg
    from psycopg import sql

    member_of = member_of or {}
    done: dict[str, Any] = {"set": [], "created": [], "cleared": []}
    with psycopg.connect(conninfo, autocommit=True) as conn:
        have = {r[0] for r in conn.execute("SELECT rolname FROM pg_roles")}
        for name, password in roles.items():
            secret = sql.Literal(_scram(conn, name, password))
            if name in have:
                conn.execute(sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(sql.Identifier(name), secret))
                done["set"].append(name)
                continue
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name), secret))
            done["created"].append(name)
            if member_of.get(name) in have:
                conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(member_of[name]), sql.Identifier(name)))
        others = [r[0] for r in conn.execute(
            "SELECT rolname FROM pg_authid WHERE rolpassword IS NOT NULL AND NOT (rolname = ANY(%s)) ORDER BY 1",
            (list(roles),))]
        for name in others:
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD NULL").format(sql.Identifier(name)))
        done["cleared"] = others
    return done
