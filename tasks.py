"""opsbook's Invoke entry point: one collection per domain, thin tasks.

Tasks parse flags and call `opsbook`, a playbook or a runbook; the logic lives in opsbook/.
Options default to None and fall back to invoke.yaml (`opsbook.env`: the default environment is
named there and nowhere else). Each task loads its environment once and passes the Env down.
Run `invoke --list` for every task, `invoke --help TASK` for its flags.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

from invoke import Collection, task
from invoke.exceptions import Exit

from opsbook.core.errors import OpsbookError


def operator_errors(fn: Callable) -> Callable:
    """Turn OpsbookError into a clean non-zero exit with the operator message (no traceback), and an
    interrupt (SIGINT, SIGTERM or SIGHUP) that no operation took in hand (one that came before the
    operation began: while it loaded, planned or checked its guardrails) into a sentence, instead of
    Invoke's silent exit 1 (SIGINT) or a silent death (SIGTERM, SIGHUP).
    Operations that change things take their own interrupts and end in order (a release puts hosts
    back and writes its record), so what reaches here stopped before or outside such a step."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        from opsbook.engines.interrupts import Stopped, describe, interruptible

        try:
            with interruptible():   # SIGTERM and SIGHUP end a task as Ctrl-C does, never silently
                return fn(*args, **kwargs)
        except OpsbookError as e:
            raise Exit(f"error: {e}", code=1) from None
        except Stopped as e:   # it ended in order and says how
            raise Exit(f"error: {e}", code=130) from None
        except KeyboardInterrupt as e:
            # The task stopped where it was (lab.up with a host half made, say); run again, it finishes.
            # Operations that can say more raise Stopped themselves (a release before its lock: nothing
            # was released).
            raise Exit(f"error: {fn.__name__.replace('_', '.')} {describe(e)} outside any step that ends in order: "
                       f"it stopped where it was. `invoke status --env ENV` shows the environment as it is; run "
                       f"the task again to finish it.", code=130) from None

    return wrapper


def local_port(value) -> int | None:
    """--port as given (None: the task's default), refused unless it is a port number."""
    if value is None:
        return None
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise Exit(f"error: --port {value!r} is not a port: give 1 to 65535 (or leave it out for the default). "
                   f"Nothing was started.", code=1)
    return port


def load_env(c, env: str | None):
    """The environment a task acts on: --env, else invoke.yaml's `opsbook.env`. Loaded once, here, and its
    numeric settings checked (opsbook.core.settings).
    An AWS environment's account is checked here, before the task touches anything (STS
    GetCallerIdentity against the inventory's opsbook_aws_account_id)."""
    from opsbook.core import settings
    from opsbook.core.inventory import load

    name = env or c.config.get("opsbook", {}).get("env")
    if not name:
        raise Exit("error: no environment given: pass --env ENV (invoke.yaml names the default as opsbook.env). "
                   "Nothing was changed.", code=1)
    loaded = load(name)
    if loaded.kind == "aws":
        from opsbook.engines import aws

        loaded = aws.activate(loaded)   # its profile, region, endpoint for this process and its children
        aws.check_account(loaded)
    settings.check(loaded)   # a setting opsbook cannot use is refused here, not half-way through a task
    return loaded


def lab_env(c, env: str | None = None):
    """The lab environment the lab.* tasks manage: --env (a lab one: lab, lab-staging), else the default
    environment when it is a lab, else `lab`."""
    loaded = load_env(c, env)
    if loaded.kind != "lab":
        if env:
            raise Exit(f"error: {env} is a {loaded.kind} environment; lab.* manages lab environments (lab, "
                       f"lab-staging). Nothing was changed.", code=1)
        loaded = load_env(c, "lab")
    return loaded


# --- lab --------------------------------------------------------------------------------
@task(help={"rebuild": "bake the image again even if a cached one matches"})
@operator_errors
def lab_image(c, rebuild=False):
    """Bake the lab host image once (debootstrap + podman import) and cache it."""
    from opsbook.engines import lab

    lab.ensure_image(lab_env(c), rebuild=rebuild)


@task(help={"dry_run": "say what would be created, create nothing",
            "env": "the lab environment (lab, lab-staging; default: lab)"})
@operator_errors
def lab_up(c, dry_run=False, env=None):
    """Start a lab environment's hosts from its inventory (idempotent: a running lab is left unchanged)."""
    from opsbook.engines import lab

    lab.up(lab_env(c, env), dry_run=dry_run)


@task(help={"dry_run": "say what would be removed, remove nothing",
            "env": "the lab environment (lab, lab-staging; default: lab)"})
@operator_errors
def lab_down(c, dry_run=False, env=None):
    """Remove exactly what lab.up created for the environment: its hosts and their data volumes, and the
    lab network once no lab environment uses it (keeps the image and .lab/)."""
    from opsbook.engines import lab

    lab.down(lab_env(c, env), dry_run=dry_run)


@task(help={"env": "the lab environment (lab, lab-staging; default: lab)"})
@operator_errors
def lab_status(c, env=None):
    """Show each lab host, its address, its container state and whether it answers SSH."""
    from opsbook.engines import lab

    lab.print_status(lab_env(c, env))


lab_ns = Collection("lab")
lab_ns.add_task(lab_image, "image")
lab_ns.add_task(lab_up, "up")
lab_ns.add_task(lab_down, "down")
lab_ns.add_task(lab_status, "status")


# --- build, provision, release, check ---------------------------------------------------
@task(help={"version": "artifact version (default: the app's version + git describe)"})
@operator_errors
def build(c, version=None):
    """Build the immutable release artifact dist/bl-api-V.tar.gz (wheel + wheelhouse + migrations)."""
    from opsbook.engines import artifact

    artifact.build(version=version)


@task(help={"env": "environment (inventories/ENV)", "check": "run in --check --diff mode, change nothing",
            "hosts": "only these hosts or groups of the inventory, comma-separated (e.g. db1 or db); default: all"})
@operator_errors
def provision(c, env=None, check=False, hosts=None):
    """Provision an environment: lab hosts (site.yml), or an AWS environment's resources (provision-aws.yml)."""
    from opsbook.operations import provision as prov

    prov.provision(load_env(c, env), check=check, hosts=hosts)


@task(
    help={
        "env": "environment (inventories/ENV)",
        "version": "artifact version to release (default: the current code, built if missing)",
        "batch": "hosts per batch: a number or a percentage like 25% (default: the inventory's)",
        "dry_run": "print the plan and stop: no lock taken, no host touched",
        "wait": "seconds to wait for another release's lock before giving up (default 0)",
        "skip_rehearsal": "release without the rehearsal the environment requires (opsbook_rehearsal_env); needs "
        "--reason, written in the release record",
        "skip_scale_check": "release without the passing scaling check the environment requires (needs --reason)",
        "reason": "why a guardrail is overridden (--skip-rehearsal, --skip-scale-check); kept in the release record",
    }
)
@operator_errors
def release(c, env=None, version=None, batch=None, dry_run=False, wait=0, skip_rehearsal=False,
            skip_scale_check=False, reason=None):
    """Release a version: plan, lock, preflight, expand migrations, rolling switch gated by a probe."""
    from opsbook.operations import release as rel

    # Bad input is refused before the account check that loading an AWS environment makes.
    rel.guardrails.check_overrides(skip_rehearsal=skip_rehearsal, skip_scale_check=skip_scale_check, reason=reason)
    rel.release(load_env(c, env), version=version, batch=batch, dry_run=dry_run, wait=int(wait),
                skip_rehearsal=skip_rehearsal, skip_scale_check=skip_scale_check, reason=reason)


@task(
    help={
        "env": "environment (inventories/ENV)",
        "to": "version to return to (default: the newest earlier good release)",
        "batch": "hosts per batch: a number or a percentage (default: the inventory's)",
        "dry_run": "print the plan and stop: no lock taken, no host touched",
        "wait": "seconds to wait for another release's lock before giving up (default 0)",
    }
)
@operator_errors
def rollback(c, env=None, to=None, batch=None, dry_run=False, wait=0):
    """Roll the fleet back to the previous good release (or --to V), rolling and gated; no database change."""
    from opsbook.operations import release as rel

    rel.rollback(load_env(c, env), to=to, batch=batch, dry_run=dry_run, wait=int(wait))


@task(help={"env": "environment (inventories/ENV)"})
@operator_errors
def status(c, env=None):
    """What an environment runs now: version per host, lock holder, last release, pending migrations."""
    from opsbook.operations import status as st

    print(st.status_text(load_env(c, env)))


@task(help={"env": "environment (inventories/ENV)"})
@operator_errors
def check(c, env=None):
    """Run the testinfra host suites (tests/infra) against an environment's hosts."""
    from opsbook.engines import hostchecks

    hostchecks.run_host_checks(load_env(c, env))


# --- AWS environments ---------------------------------------------------------------------
@task(help={"env": "environment (inventories/ENV), an AWS one"})
@operator_errors
def env_resources(c, env=None):
    """List every resource tagged for an AWS environment, and any role two of them claim (read-only)."""
    from opsbook.operations import aws_env

    print(aws_env.resources_text(load_env(c, env)))


@task(
    help={
        "env": "environment (inventories/ENV), an AWS one",
        "reason": "why it is destroyed (required where the inventory asks for confirmation: prod)",
        "confirm": "the environment's name, typed in advance (for non-interactive use)",
        "dry_run": "list what would be deleted, delete nothing",
    }
)
@operator_errors
def env_destroy(c, env=None, reason=None, confirm=None, dry_run=False):
    """Delete exactly the resources tagged for an AWS environment (the list is shown first)."""
    from opsbook.operations import aws_env

    aws_env.destroy(load_env(c, env), reason=reason, confirm=confirm, dry_run=dry_run)


@task(
    help={
        "name": "the purpose: the environment is named LIKE-NAME (e.g. loadtest makes staging-loadtest)",
        "like": "the AWS environment whose shape, account and settings it takes (default staging)",
        "ttl": "how long it is meant to live: 90m, 8h, 2d (default: the inventory's opsbook_purpose_env_ttl)",
    }
)
@operator_errors
def env_create(c, name, like="staging", ttl=None):
    """Make a short-lived environment shaped like staging (or prod): its own tagged resources, owner and TTL."""
    from opsbook.core.inventory import load
    from opsbook.operations import provision as prov

    # Not load_env: the name and TTL are checked before the account (create checks it next, itself).
    prov.create(load(like), name, ttl)


@task
@operator_errors
def env_list(c):
    """List every environment: the inventories' own, and purpose environments with owner, age and TTL (read-only)."""
    from opsbook.core.inventory import environments, load
    from opsbook.operations import aws_env

    print(aws_env.environments_text([load(name) for name in environments()]))


env_ns = Collection("env")
env_ns.add_task(env_resources, "resources", default=True)
env_ns.add_task(env_list, "list")
env_ns.add_task(env_create, "create")
env_ns.add_task(env_destroy, "destroy")


# --- migrations ---------------------------------------------------------------------------
@task
@operator_errors
def migrate_lint(c):
    """Lint every migration without a database: the format, squawk on raw and generated SQL, and
    app/masking.yml (every column a migration creates is masked or declared safe)."""
    from opsbook.operations import migrate as mig

    mig.lint_report()


@task(
    help={
        "env": "environment (inventories/ENV)",
        "phase": "expand (default) or contract",
        "dry_run": "print the plan (pending steps and SQL), lint and the contract gate's verdict; change "
        "nothing, leave no record",
        "dsn": "override: database conninfo instead of the environment's (no password: PGPASSWORD or ~/.pgpass)",
        "fleet": "override: app host versions for the contract gate (host=version,host=version) instead of "
        "asking every app host's /version",
        "param": "another migrate runbook parameter as NAME=VALUE (e.g. lock_timeout_ms=1000); repeatable; "
        "`invoke runbooks` lists them",
    },
    iterable=["param"],
)
@operator_errors
def migrate(c, env=None, phase=None, dry_run=False, dsn=None, fleet=None, param=None):
    """Run the pending migration phase of an environment as a record (runbooks/migrate.ipynb).

    The database is the environment's (admin role); the contract gate asks every app host's /version.
    """
    from opsbook.operations import migrate as mig

    mig.migrate(load_env(c, env), phase or "expand", dry_run=dry_run, dsn=dsn, fleet=fleet, pairs=param)


migrate_ns = Collection("migrate")
migrate_ns.add_task(migrate, "run", default=True)
migrate_ns.add_task(migrate_lint, "lint")


# --- snapshots --------------------------------------------------------------------------------
@task(help={"env": "environment (inventories/ENV)",
            "reason": "why this snapshot is taken (tagged on it and kept in its record)",
            "dry_run": "say which database would be snapshotted and what retention would delete; change nothing"})
@operator_errors
def snapshot_take(c, env=None, reason=None, dry_run=False):
    """Snapshot the environment's database, as a record (runbooks/snapshot.ipynb), then apply retention."""
    from opsbook.operations import snapshot as snap

    snap.take(load_env(c, env), reason=reason, dry_run=dry_run)


@task(help={"env": "environment (inventories/ENV)"})
@operator_errors
def snapshot_list(c, env=None):
    """Every snapshot of the environment: age, size and the record that took it. Read-only."""
    from opsbook.operations import snapshot as snap

    snap.list_snapshots(load_env(c, env))


@task(help={"env": "environment (inventories/ENV)",
            "snapshot": "the snapshot to drill (default: the newest available one)"})
@operator_errors
def snapshot_drill(c, env=None, snapshot=None):
    """Restore drill of a snapshot, as a record (runbooks/restore_drill.ipynb); one that cannot verify never passes."""
    from opsbook.operations import snapshot as snap

    snap.drill(load_env(c, env), snapshot)


snapshot_ns = Collection("snapshot")
snapshot_ns.add_task(snapshot_take, "take", default=True)
snapshot_ns.add_task(snapshot_list, "list")
snapshot_ns.add_task(snapshot_drill, "drill")


# --- staging refresh ----------------------------------------------------------------------------
@task(help={"from_": "the environment whose database is copied (default prod)",
            "to": "the environment whose database is replaced (default staging; never prod)",
            "snapshot": "copy this snapshot of the source (`invoke snapshot.list --env SOURCE`) instead of now",
            "dry_run": "check everything and print the plan; change nothing, take no lock, leave no record"})
@operator_errors
def staging_refresh(c, from_=None, to=None, snapshot=None, dry_run=False):
    """Replace a staging database with a masked copy-on-write clone of another's (runbooks/staging_refresh.ipynb)."""
    from opsbook.operations import staging_refresh as sr

    source, target = from_ or sr.DEFAULT_SOURCE, to or sr.DEFAULT_TARGET
    sr.refuse_names(source, target)   # before the account checks that loading an AWS environment makes
    sr.refresh(load_env(c, source), load_env(c, target), snapshot=snapshot, dry_run=dry_run)


@task(help={"from_": "the environment the target is refreshed from (default prod)",
            "to": "the refreshed environment (default staging)"})
@operator_errors
def staging_status(c, from_=None, to=None):
    """Read-only: the target's clones, which one serves, and its standby (AWS: its clone clusters)."""
    from opsbook.operations import staging_refresh as sr

    print(sr.status_text(load_env(c, from_ or sr.DEFAULT_SOURCE), load_env(c, to or sr.DEFAULT_TARGET)))


staging_ns = Collection("staging")
staging_ns.add_task(staging_refresh, "refresh", default=True)
staging_ns.add_task(staging_status, "status")


@task(
    help={
        "k": "only tests matching this pytest -k expression",
        "no_lab": "skip bringing the lab up (tests that need it will fail)",
    }
)
def test(c, k=None, no_lab=False):
    """Run the whole test suite (brings the lab up first); exits non-zero on any failure or no tests."""
    from opsbook.operations import suite

    code = suite.run_suite(None if no_lab else lab_env(c), k=k)
    if code:
        raise Exit(code=code)


# --- runbooks and records ---------------------------------------------------------------
@task(
    help={
        "name": "runbook to run (runbooks/NAME.ipynb); `invoke runbooks` lists them",
        "env": "environment (inventories/ENV)",
        "param": "a parameter as NAME=VALUE (repeat the flag for more); checked against the runbook",
        "parent": "record id of the run that started this one",
    },
    iterable=["param"],
)
@operator_errors
def runbook(c, name, env=None, param=None, parent=None):
    """Run a runbook for an environment; its executed notebook is stored as a record."""
    from opsbook.engines.records import runner

    runner.run_cli(name, load_env(c, env), param, parent)


@task
@operator_errors
def runbooks_list(c):
    """List the runbooks and the parameters each takes (read-only)."""
    from opsbook.engines.records import runner

    print(runner.describe())


@task(
    help={
        "env": "environment (inventories/ENV)",
        "no_probe": "read the inventory and the records only, contact no host",
    }
)
@operator_errors
def report(c, env=None, no_probe=False):
    """Record the state of an environment: hosts, versions served, health, database, last records."""
    from opsbook.engines.records import runner

    runner.run("env_report", load_env(c, env), {"probe": not no_probe})


@task(
    help={
        "env": "environment whose record store to read (inventories/ENV)",
        "runbook": "only records of this runbook",
        "outcome": "only succeeded or failed records",
        "since": "only records started since: an age (30m, 12h, 7d, 2w) or an ISO date",
    }
)
@operator_errors
def records_list(c, env=None, runbook=None, outcome=None, since=None):
    """List an environment's records, oldest first (read-only)."""
    from opsbook.engines.records import views

    print(views.list_cli(load_env(c, env), runbook=runbook, outcome=outcome, since=since))


@task(help={"record_id": "the record's id (`invoke records` lists them)", "env": "environment (ENV)"})
@operator_errors
def records_show(c, record_id, env=None):
    """Show one record's ledger entry and where its notebook and HTML are."""
    from opsbook.engines.records import views

    print(views.show_cli(load_env(c, env), record_id))


@task(help={"env": "environment (inventories/ENV)"})
@operator_errors
def records_index(c, env=None):
    """Render index.html in the record store: every record with outcome, duration and links."""
    from opsbook.engines.records import views

    print(views.index_cli(load_env(c, env)))


@task(help={"env": "environment whose record store to build the site of (default: every environment)"})
@operator_errors
def records_site(c, env=None):
    """Build the records site into the record store: every run, per-runbook trends, delivery figures."""
    from opsbook.core.inventory import environments
    from opsbook.operations import records_site as site

    site.site([load_env(c, env)] if env else [load_env(c, name) for name in environments()])


@task(
    help={
        "env": "environment whose local site to serve (inventories/ENV)",
        "port": "port on 127.0.0.1 (default 8765)",
        "bind": "address to listen on: 127.0.0.1, the only one accepted",
    }
)
@operator_errors
def records_serve(c, env=None, port=None, bind=None):
    """Serve a local records site on 127.0.0.1 (read-only; Ctrl-C stops it)."""
    from opsbook.operations import records_site as site

    port = local_port(port)
    site.serve(load_env(c, env), port=port, bind=bind or "127.0.0.1")


records_ns = Collection("records")
records_ns.add_task(records_list, "list", default=True)
records_ns.add_task(records_show, "show")
records_ns.add_task(records_index, "index")
records_ns.add_task(records_site, "site")
records_ns.add_task(records_serve, "serve")


@task(help={"port": "port on 127.0.0.1 (default 8888, or a free one when it is taken)"})
@operator_errors
def notebook(c, port=None):
    """Start JupyterLab on 127.0.0.1 with the project's kernel and print its URL (runbooks there change nothing)."""
    from opsbook.operations import jupyter

    jupyter.notebook(local_port(port))


# --- release lock -----------------------------------------------------------------------
@task(help={"env": "environment (inventories/ENV)"})
@operator_errors
def lock_status(c, env=None):
    """Show who holds an environment's release lock (owner, reason, since, lease), or "free"."""
    from opsbook.engines import lock

    print(lock.status_text(lock.lock_for(load_env(c, env))))


@task(
    help={
        "env": "environment (inventories/ENV)",
        "reason": "why the lock is broken (required; printed with the holder it broke)",
        "dry_run": "show who holds the lock, break nothing",
    }
)
@operator_errors
def lock_break(c, env=None, reason=None, dry_run=False):
    """Break an environment's release lock (a dead or stuck release); the break is recorded."""
    from opsbook.engines import lock

    if dry_run:
        print(f"dry run, nothing broken: {lock.status_text(lock.lock_for(load_env(c, env)))}")
        return
    if not reason:
        raise Exit("error: --reason is required: say why the lock is broken. Nothing was changed.", code=1)
    from opsbook.engines.records import runner

    # The break is an operation like any other: it leaves a record naming the holder it broke.

    runner.run("lock_break", load_env(c, env), {"reason": reason})


# --- scaling checks ---------------------------------------------------------------------
@task(
    help={
        "env": "environment (inventories/ENV)",
        "target": "target rate in responses/s (default: the inventory's opsbook_scale_target)",
        "steps": "offered rates in responses/s, rising, comma-separated (default: 25 %..200 % of the target)",
        "step_seconds": "seconds per step (default: opsbook_scale_check_step_seconds, else 15)",
        "mix": "traffic mix: biglearn (default), record10, record1, ping",
        "allow_prod": "allow load on a production environment (needs --reason)",
        "reason": "why load goes to production (written in the record)",
        "dry_run": "check every parameter and print the plan; send nothing, write no record",
        "app_hosts": "app hosts in rotation during the check (default: all; the others are put back after it)",
    }
)
@operator_errors
def scale_check(c, env=None, target=None, steps=None, step_seconds=None, mix=None, allow_prod=False, reason=None,
                dry_run=False, app_hosts=None):
    """Stepped open-model load at the environment's load balancer: curve, knee, limit, verdict, as a record."""
    from opsbook.operations import scale_check as sc

    sc.scale_check(load_env(c, env), target=_number(target, "--target"), steps=steps,
                   step_seconds=_number(step_seconds, "--step-seconds"), mix=mix, allow_prod=allow_prod,
                   reason=reason, dry_run=dry_run, app_hosts=int(_number(app_hosts, "--app-hosts") or 0))


def _number(text, flag: str):
    if text in (None, ""):
        return None
    try:
        return float(text)
    except ValueError:
        raise Exit(f"error: {flag} takes a number, got {text!r}. Nothing was sent.", code=1) from None


scale_ns = Collection("scale")
scale_ns.add_task(scale_check, "check", default=True)


lock_ns = Collection("lock")
lock_ns.add_task(lock_status, "status", default=True)
lock_ns.add_task(lock_break, "break")


ns = Collection()
ns.add_collection(lab_ns)
ns.add_collection(records_ns)
ns.add_collection(migrate_ns)
ns.add_collection(snapshot_ns)
ns.add_collection(staging_ns)
ns.add_collection(lock_ns)
ns.add_collection(scale_ns)
ns.add_collection(env_ns)
ns.add_task(runbooks_list, "runbooks")
for t in (build, provision, release, rollback, status, check, test, runbook, report, notebook):
    ns.add_task(t)
