"""The rehearsal gate: a release to an environment that names a rehearsal environment
(``opsbook_rehearsal_env``: prod names staging) needs the same artifact, by sha256, released
successfully there, on a refresh of that environment's database younger than
``opsbook_rehearsal_max_age`` (default 7d), with its expand migrations applied there.

The decision (:func:`decide`) reads only ledger entries of the rehearsal environment:

- the refresh: the newest succeeded record of the ``staging_refresh`` runbook for the rehearsal
  environment (when it names its source, it must be the environment being released to), as
  ``invoke staging.refresh`` writes it (key figure ``source``). Without one the gate refuses and says so.
- the release: a succeeded ``release`` record (not a rollback) whose key figures carry the
  artifact's sha256 (``artifact_sha256``; release records written before this gate do not, and do
  not count), started after that refresh ended (a release before it ran on a database the refresh
  replaced) and whose phases include ``expand migrations`` (the release ran the artifact's pending
  expand phases to the end: a release whose expand fails fails).

A release refused here changes nothing; the refusal names what is missing and the commands that
would provide it. ``--skip-rehearsal --reason R`` overrides it and the release record says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from opsbook.core import ages
from opsbook.core.errors import OpsbookError
from opsbook.engines.records import ledger

REFRESH_RUNBOOK = "staging_refresh"
DEFAULT_MAX_AGE = "7d"


class RehearsalMissing(OpsbookError):
    """The artifact was not rehearsed as the target environment requires; nothing was changed."""


def parse_max_age(value: Any) -> timedelta:
    age = ages.parse(value if value not in (None, "") else DEFAULT_MAX_AGE)
    if age is None:
        raise OpsbookError(f"opsbook_rehearsal_max_age: {value!r} is not an age ({ages.FORMS}, at most 100 years). "
                           f"Nothing was changed. Fix it in the inventory.")
    return age


@dataclass
class Verdict:
    """What the gate found. `ok`: the artifact was rehearsed as required (or no rehearsal is required)."""

    target_env: str
    rehearsal_env: str | None
    version: str
    sha256: str
    ok: bool
    missing: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    refresh: str | None = None          # the refresh record the rehearsal stood on
    release: str | None = None          # the rehearsal's release record
    skipped: str | None = None          # the operator's reason, when --skip-rehearsal overrode a refusal

    def text(self) -> str:
        if self.rehearsal_env is None:
            return f"rehearsal gate: {self.target_env} requires no rehearsal (no opsbook_rehearsal_env)"
        if self.ok:
            return (f"rehearsal gate: passed: {self.version} (sha256 {self.sha256[:12]}…) was released to "
                    f"{self.rehearsal_env} by record {self.release}, on the refresh of record {self.refresh}")
        head = (f"rehearsal gate: {self.version} (sha256 {self.sha256[:12]}…) has not been rehearsed on "
                f"{self.rehearsal_env} as {self.target_env} requires")
        lines = [head, *(f"  missing: {m}" for m in self.missing)]
        if self.commands:
            lines.append("  to provide it: " + " ; then ".join(f"`{c}`" for c in self.commands))
        if self.skipped:
            lines.append(f"  SKIPPED by the operator (--skip-rehearsal): {self.skipped}")
        return "\n".join(lines)

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


def _when(entry: dict[str, Any], key: str) -> datetime:
    when = datetime.fromisoformat(entry.get(key) or entry["start"])
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _refresh_source(entry: dict[str, Any]) -> str | None:
    for where in (entry.get("figures") or {}, entry.get("parameters") or {}):
        for key in ("source", "from_env", "source_env", "from"):
            if where.get(key):
                return str(where[key])
    return None


def decide(*, target_env: str, rehearsal_env: str, version: str, sha256: str,
           rehearsal_ledger: list[dict[str, Any]], max_age: timedelta, now: datetime | None = None) -> Verdict:
    """The gate's verdict from the rehearsal environment's ledger entries (see the module's docstring)."""
    now = now or datetime.now(UTC)
    v = Verdict(target_env=target_env, rehearsal_env=rehearsal_env, version=version, sha256=sha256, ok=False)
    refresh_cmd = f"invoke staging.refresh --from {target_env} --to {rehearsal_env}"
    release_cmd = f"invoke release --env {rehearsal_env} --version {version}"
    refreshes = [e for e in rehearsal_ledger
                 if e.get("runbook") == REFRESH_RUNBOOK and e.get("outcome") == "succeeded"
                 and e.get("env") == rehearsal_env and _refresh_source(e) in (None, target_env)]
    refresh = max(refreshes, key=lambda e: e.get("start", ""), default=None)
    if refresh is None:
        v.missing.append(f"no succeeded refresh of {rehearsal_env} from {target_env} is recorded in {rehearsal_env}'s "
                         f"ledger (runbook {REFRESH_RUNBOOK})")
        v.commands = [refresh_cmd, release_cmd]
        return v
    v.refresh = refresh.get("id")
    age = now - _when(refresh, "start")
    if age > max_age:
        v.missing.append(f"the newest refresh of {rehearsal_env} (record {refresh.get('id')}, {refresh.get('start')}) "
                         f"is {age.days} day(s) {age.seconds // 3600} h old; opsbook_rehearsal_max_age is "
                         f"{_age_text(max_age)}")
        v.commands = [refresh_cmd, release_cmd]
        return v
    releases = ledger.releases(rehearsal_ledger, outcome="succeeded", kinds=(ledger.RELEASE,))
    same = [e for e in releases if e.get("env") == rehearsal_env
            and (e.get("figures") or {}).get("artifact_sha256") == sha256]
    after = [e for e in same if _when(e, "start") >= _when(refresh, "end")]
    expanded = [e for e in after if "expand migrations" in ((e.get("figures") or {}).get("phase_seconds") or {})]
    if expanded:
        v.ok, v.release = True, expanded[-1].get("id")
        return v
    if after:
        v.missing.append(f"the release of this artifact to {rehearsal_env} (record {after[-1].get('id')}) did not run "
                         f"its expand migrations phase")
    elif same:
        v.missing.append(f"this artifact was released to {rehearsal_env} (record {same[-1].get('id')}) before the "
                         f"newest refresh (record {refresh.get('id')}, {refresh.get('start')}), which replaced that "
                         f"database; it has not been released on the refreshed one")
    else:
        by_version = [e for e in releases if (e.get("figures") or {}).get("version") == version]
        hint = (f" (record {by_version[-1].get('id')} released version {version} but does not carry this artifact's "
                f"sha256: other bytes, or a record older than the gate)" if by_version else "")
        v.missing.append(f"no succeeded release of this artifact (sha256 {sha256}) to {rehearsal_env} is recorded"
                         + hint)
    v.commands = [release_cmd]
    return v


def _age_text(age: timedelta) -> str:
    seconds = int(age.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def check(env, version: str, sha256: str, *, now: datetime | None = None,
          read: ledger.Ledgers | None = None) -> Verdict:
    """The gate for a release of (version, sha256) to `env`: its inventory names the rehearsal
    environment (`opsbook_rehearsal_env`, none: no gate) and the age (`opsbook_rehearsal_max_age`);
    the rehearsal environment's ledger is read from its own record store (through `read` when the
    caller shares one with the scale gate)."""

    name = str(env.var("opsbook_rehearsal_env", "") or "")
    if not name:
        return Verdict(target_env=env.name, rehearsal_env=None, version=version, sha256=sha256, ok=True)
    if name == env.name:
        raise OpsbookError(f"opsbook_rehearsal_env of {env.name} names {env.name} itself; a rehearsal happens on "
                           f"another environment. Nothing was changed. Fix it in {env.path}/group_vars/all/.")
    max_age = parse_max_age(env.var("opsbook_rehearsal_max_age", DEFAULT_MAX_AGE))
    try:
        entries = (read or ledger.Ledgers()).of(name)
    except Exception as e:  # noqa: BLE001 - whatever keeps the ledger unread, the gate cannot pass
        v = Verdict(target_env=env.name, rehearsal_env=name, version=version, sha256=sha256, ok=False)
        v.missing.append(f"{name}'s records could not be read ({type(e).__name__}: {e}), so nothing shows the "
                         f"rehearsal")
        v.commands = [f"invoke records --env {name}"]
        return v
    return decide(target_env=env.name, rehearsal_env=name, version=version, sha256=sha256,
                  rehearsal_ledger=entries, max_age=max_age, now=now)
