"""`bl-api` operator commands: `bl-api version`, `bl-api check-config`."""

from __future__ import annotations

import argparse
import sys

import psycopg

from bl_api import running_version
from bl_api.config import ConfigError, Settings


def check_config() -> int:
    """Check the environment the unit gives the service; print what was found; 0 when usable."""
    try:
        settings = Settings.from_env()
    except ConfigError as e:
        print(f"config: {e}", file=sys.stderr)
        return 1
    target = psycopg.conninfo.conninfo_to_dict(settings.database_url)
    where = f"host={target.get('host', '(default)')} port={target.get('port', '5432')} " \
            f"dbname={target.get('dbname', '(default)')}"
    try:
        with psycopg.connect(settings.database_url, connect_timeout=5) as conn:
            server = conn.info.server_version
            schema = conn.execute("SELECT to_regclass('course_events') IS NOT NULL").fetchone()[0]
    except psycopg.Error as e:
        print(f"database: cannot connect ({where}): {str(e).strip()}\n"
              "check DATABASE_URL, that the database host is up and that pg_hba.conf admits this host",
              file=sys.stderr)
        return 1
    print(f"database: ok ({where}, server {server // 10000}.{server % 10000})")
    print(f"schema: {'course_events present' if schema else 'course_events MISSING: run migrations'}")
    print(f"pool: max {settings.pool_max} connections per worker")
    return 0 if schema else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bl-api", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("version", help="print the installed bl-api version")
    sub.add_parser("check-config", help="check DATABASE_URL and friends; exit 1 if unusable")
    args = parser.parse_args(argv)
    if args.command == "version":
        print(running_version())
        return 0
    return check_config()


if __name__ == "__main__":
    sys.exit(main())
