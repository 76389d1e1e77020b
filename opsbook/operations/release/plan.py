"""The plan of a release or rollback: hosts in batches, the version each serves, the migrations,
and the phases it will run (described once, here: the code runs them and the record shows them)."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from opsbook.core.errors import OpsbookError
from opsbook.core.inventory import Env
from opsbook.core.paths import APP_MIGRATIONS
from opsbook.engines import artifact, database, fleet

# The phases of a release and of a rollback, in the order they run, and what each does. The
# release runs them (steps.py names each phase from here) and its record (runbooks/release.ipynb)
# shows every phase with this description and the time it took.
PHASES: dict[str, str] = {
    "provision": "converge the app and lb hosts whose configuration changed since their last converge "
                 "(a stamp on each host); database hosts only when never provisioned",
    "preflight": "host checks (testinfra, less what the release converges) and blocking database sessions",
    "safety point": "when the plan has expand migrations and the inventory requires it "
                    "(opsbook_release_snapshot), a snapshot of the database taken first (or a recent one named)",
    "expand migrations": "the artifact's pending expand phases, as a child migrate record",
    "stage": "unpack the artifact into releases/<version> on every app host (offline venv); it starts "
             "beside preflight and the expand migrations, so its time is only what was left to wait for",
    "rolling switch": "per batch: drain, switch `current`, restart, health and /version, re-enable; "
                      "the probe's figures for the batch must meet the SLO (a rollback, which has no stage "
                      "phase, first stages the release in the same Ansible run on any host that lacks it)",
    "verify": "the host checks preflight leaves out, of what a release changes (testinfra): each app host "
              "serves the release, its service runs and answers, and every backend is UP in the load "
              "balancer (they start when the last batch takes traffic, beside its gate: this phase is "
              "what is left of them); the probe's traffic meanwhile is what users feel after the change",
    "probe read-back": "every write the service acknowledged during the release is read back",
    "mark good": "mark the release good on every host (retention never deletes it)",
}
RELEASE_PHASES = tuple(PHASES)
# A rollback is the way out of a bad release: it changes no schema and converges nothing, and no
# host check that has nothing to do with serving the previous version (a drifted file, another
# environment's database host) may stand in its way. Verify checks what it changed. The release it
# returns to is nearly always still staged: the rolling switch's own run stages it where it is not.
ROLLBACK_PHASES = tuple(p for p in PHASES if p not in ("provision", "preflight", "safety point",
                                                       "expand migrations", "stage"))


def check_batch(size: str | int | None) -> None:
    """Refuse a batch size that is neither a positive number of hosts nor a percentage (None: the
    inventory's); a release checks it before it builds or touches anything."""
    if size is not None:
        batches_of(["a host"], size)


def batches_of(hosts: list[str], size: str | int) -> list[list[str]]:
    """Split hosts into batches of `size` hosts, or of a percentage of the fleet ("25%")."""
    text = str(size).strip()
    n = 0
    if text.endswith("%") and text[:-1].replace(".", "", 1).isdigit() and 0 < float(text[:-1]) <= 100:
        n = max(1, math.floor(len(hosts) * float(text[:-1]) / 100))
    elif text.isdigit():
        n = int(text)
    if n < 1:
        raise OpsbookError(f"batch size {size!r} is neither a positive number of hosts nor a percentage "
                           f"like 25%. Nothing was changed.")
    return [hosts[i : i + n] for i in range(0, len(hosts), n)]


@dataclass
class Plan:
    env: str
    kind: str                                  # release | rollback
    target: str
    artifact_file: str
    artifact_sha256: str
    current: dict[str, str | None]             # host -> version it serves now (None: nothing)
    batches: list[list[str]]
    drain_timeout: int
    migrations_pending: list[str] = field(default_factory=list)
    contracts_pending: list[str] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)

    @property
    def mixed(self) -> bool:
        return len(set(self.current.values())) > 1

    def text(self) -> str:
        lines = [f"plan: {self.kind} bl-api {self.target} to {self.env} "
                 f"({len(self.current)} app hosts, {len(self.batches)} batches, drain timeout "
                 f"{self.drain_timeout}s)"]
        if self.mixed:
            served = ", ".join(f"{h}={v or 'nothing'}" for h, v in self.current.items())
            lines.append(f"  the fleet serves mixed versions ({served}); this {self.kind} converges it")
        for i, batch in enumerate(self.batches, 1):
            parts = []
            for h in batch:
                now = self.current.get(h) or "nothing"
                parts.append(f"{h} ({now}{'' if now != self.target else ', already there'})")
            lines.append(f"  batch {i}: " + ", ".join(parts))
        if self.kind == "release":
            lines.append("  expand migrations to run first: " + (", ".join(self.migrations_pending) or "none"))
            lines.append("  contracts pending (not run by a release): "
                         + (", ".join(self.contracts_pending) or "none"))
        lines.append("  phases: " + " → ".join(self.phases))
        return "\n".join(lines)


def make_plan(env: Env, art: artifact.Artifact, *, kind: str = "release", batch: str | None = None) -> Plan:
    """The plan, from the inventory, the fleet's /version answers and one database session."""
    hosts = [h.name for h in env.hosts("app")]
    if not hosts:
        raise OpsbookError(f"environment {env.name} has no app hosts in its inventory ({env.path}); nothing to "
                           f"{kind}. Nothing was changed. Add hosts to its `app` group (the AWS environments "
                           f"will get theirs from a dynamic inventory, which is not built yet).")
    current = dict(fleet.served_versions(env))
    # Hosts that serve nothing (new, or left down by a failed release) go first: they take no
    # traffic, and once they serve, draining the others never leaves the balancer empty.
    hosts.sort(key=lambda h: current.get(h) is not None)
    plan = Plan(
        env=env.name, kind=kind, target=art.version, artifact_file=art.path.name, artifact_sha256=art.sha256,
        current=current, batches=batches_of(hosts, batch or env.var("opsbook_release_batch_size")),
        drain_timeout=int(env.var("opsbook_release_drain_timeout")),
        phases=list(RELEASE_PHASES if kind == "release" else ROLLBACK_PHASES),
    )
    try:
        with database.Admin(env) as db, tempfile.TemporaryDirectory(prefix="opsbook-migrations-") as tmp:
            # An applied contract sets a floor: a version below it would meet a schema it cannot use.
            database.refuse_below(db.schema_floor(APP_MIGRATIONS), art.version, env.name)
            if kind == "release":
                pending = db.pending(art.extract_migrations(Path(tmp)))
                plan.migrations_pending, plan.contracts_pending = pending.expand, pending.contracts
    except database.DatabaseUnreachable as e:
        if kind == "release" and any(plan.current.values()):
            raise OpsbookError(f"cannot read the applied migrations on {env.name}'s database: {e}. Nothing was "
                               f"changed. Is `invoke provision --env {env.name}` done?") from e
        if kind == "release":
            print(f"[opsbook] database not reachable yet ({e}); the first release will provision it", flush=True)
            plan.migrations_pending = ["(all: database not provisioned yet)"]
        # A rollback's database that does not answer has no contracts to protect; preflight says so.
    except Exception as e:
        import psycopg

        if not isinstance(e, psycopg.Error):
            raise
        raise OpsbookError(f"cannot read the applied migrations on {env.name}'s database: {e}. Nothing was "
                           f"changed. Is `invoke provision --env {env.name}` done?") from e
    return plan
