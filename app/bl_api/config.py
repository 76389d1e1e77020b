"""Service settings, read from environment variables only (the systemd unit sets them).

| variable               | meaning                                                 | default |
|------------------------|---------------------------------------------------------|---------|
| DATABASE_URL           | libpq conninfo or postgresql:// URL of the event store  | required |
| BL_API_POOL_MAX        | most database connections one worker process holds      | 10      |
| BL_API_POOL_TIMEOUT    | seconds a request waits for a connection before 503     | 5       |
| BL_API_PING_TIMEOUT    | seconds /ping waits for the database before 503         | 2       |
| BL_API_POOL_RECONNECT_TIMEOUT | seconds the pool retries a lost connection (backing off) | 10 |
|                        | before it gives up; the next request starts new tries   |         |
| BL_API_TEST_SLOW_HEADER| `1` makes /ping honour `X-Test-Delay: <s>` (tests only)  | unset   |

Gunicorn's own settings (bind, workers, threads, graceful timeout) are read by
`bl_api.gunicorn_conf`, not here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import psycopg.conninfo


class ConfigError(Exception):
    """The environment does not describe a runnable service; nothing was started."""


@dataclass(frozen=True)
class Settings:
    database_url: str
    pool_max: int = 10
    pool_timeout: float = 5.0
    ping_timeout: float = 2.0
    pool_reconnect_timeout: float = 10.0
    test_slow_header: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        url = env.get("DATABASE_URL", "").strip()
        if not url:
            raise ConfigError(
                "DATABASE_URL is not set: give the service the conninfo or postgresql:// URL of its "
                "database (the unit's EnvironmentFile sets it)"
            )
        try:
            psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as e:
            # libpq's message can quote the string; never echo a URL that may hold a password.
            raise ConfigError("DATABASE_URL is not a valid libpq conninfo or postgresql:// URL") from e
        return cls(
            database_url=url,
            pool_max=_number(env, "BL_API_POOL_MAX", 10, int, minimum=1),
            pool_timeout=_number(env, "BL_API_POOL_TIMEOUT", 5.0, float, minimum=0.1),
            ping_timeout=_number(env, "BL_API_PING_TIMEOUT", 2.0, float, minimum=0.1),
            pool_reconnect_timeout=_number(env, "BL_API_POOL_RECONNECT_TIMEOUT", 10.0, float, minimum=1.0),
            test_slow_header=env.get("BL_API_TEST_SLOW_HEADER", "") == "1",
        )


def _number(env: Mapping[str, str], name: str, default, kind, *, minimum):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        what = "whole number" if kind is int else "number"
        raise ConfigError(f"{name}={raw!r} is not a {what}") from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} must be at least {minimum}")
    return value
