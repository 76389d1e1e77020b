"""The scaling check: `invoke scale.check` and the sections of `runbooks/scaling_check.ipynb`.

`invoke scale.check --env E [--target N] [--steps R1,R2,...] [--step-seconds S] [--mix M]
[--allow-prod --reason R]` drives open-model, stepped load (opsbook.engines.load: Locust in a child
process) at the environment's own load balancer, and records the curve: per step offered and achieved
throughput, latency percentiles from the scheduled send time, errors by kind, each host's CPU and
memory read from the host, the database's transactions, lock waits, buffer hit ratio and WAL volume;
the knee (opsbook.engines.load.curve states its definition) and the resource that limits it; every
acknowledged response counted in the database afterwards; a verdict against the environment's
declared target (`opsbook_scale_target`). Its record is the "demonstrated at scale" evidence a
production release asks for (opsbook.engines.scale_gate reads it).

Refused before any load is sent, with what to do next: an unknown environment or traffic mix, a
non-positive or falling rate, an environment without a load balancer or target, a target address
outside the environment's network (the lab: loopback or its subnet), a plan longer than the caps, and
production without `--allow-prod --reason R`.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from opsbook.core.errors import OpsbookError
from opsbook.core.inventory import Env
from opsbook.engines import load
from opsbook.engines.load import curve

DEFAULT_FRACTIONS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)   # of the target rate, when no --steps are given
DEFAULT_STEP_SECONDS = 15.0
DEFAULT_MAX_SECONDS = 900.0
DEFAULT_MAX_REQUESTS = 2_000_000


class ScaleCheckRefused(OpsbookError):
    """The check was refused before any load was sent."""


# --- parameters -------------------------------------------------------------------------------------
def parse_steps(text: str | list | None) -> list[float]:
    """`1000,2000,3000` (or a list) -> [1000.0, 2000.0, 3000.0]."""
    if text in (None, "", []):
        return []
    items = text if isinstance(text, list | tuple) else str(text).split(",")
    out = []
    for item in items:
        try:
            out.append(float(str(item).strip()))
        except ValueError:
            raise ScaleCheckRefused(
                f"--steps takes offered rates (responses/s) separated by commas, e.g. 1000,2000,3000; {item!r} is "
                f"not a number. No load was sent.") from None
    return out


def is_protected(env: Env) -> bool:
    """Load against this environment needs --allow-prod --reason (production's users would feel it)."""
    return bool(env.var("opsbook_scale_check_protected", env.name == "prod"))


def target_of(env: Env, rate: float | None = None) -> curve.Target:
    doc = env.var("opsbook_scale_target", None)
    if not doc:
        raise ScaleCheckRefused(
            f"environment {env.name} declares no scaling target (opsbook_scale_target: responses_per_s, "
            f"max_p99_ms, max_error_rate) in {env.path}/group_vars/all/, so a check could not say whether it "
            f"passes. No load was sent. Add it (inventories/lab has an example).")
    target = curve.Target.from_inventory(dict(doc))
    if rate is not None:
        target = curve.Target(float(rate), target.max_p99_ms, target.max_error_rate,
                              target.responses_per_request, target.mix)
    return target


def load_balancer_url(env: Env) -> str:
    """The environment's own load balancer: opsbook_scale_url, else its probe URL (opsbook_probe_url,
    its ALB, or its first `lb` host)."""
    url = env.var("opsbook_scale_url", None)
    if url:
        return str(url)
    from opsbook.engines import probe

    try:
        return probe.probe_url(env)
    except probe.ProbeError:
        raise ScaleCheckRefused(
            f"environment {env.name} has no load balancer: no `lb` host, no ALB (opsbook_lb_kind) and no "
            f"opsbook_scale_url in {env.path}/. A scaling check only sends load to an environment's own load "
            f"balancer. No load was sent. Add the load balancer to the inventory.") from None


def allowed_networks(env: Env) -> list[str] | None:
    """Where load may go: the lab's subnet (and loopback) for a lab; an AWS environment's own load
    balancer is reached by name (None: any)."""
    if env.kind == "lab":
        return [str(env.var("opsbook_lab_subnet"))]
    return None


@dataclass
class Context:
    env: str
    kind: str
    url: str
    conninfo: str = field(repr=False)
    target: curve.Target = field(default_factory=lambda: curve.Target(0, 0))
    steps: list[float] = field(default_factory=list)
    step_seconds: float = DEFAULT_STEP_SECONDS
    mix: str = "biglearn"
    max_seconds: float = DEFAULT_MAX_SECONDS
    max_requests: int = DEFAULT_MAX_REQUESTS
    timeout_s: float = 10.0
    max_in_flight: int = 256
    courses: int = 200
    stop_when: dict[str, float] | None = None
    allow_prod: bool = False
    reason: str = ""
    sample_hosts: bool = True
    app_hosts: list[str] = field(default_factory=list)      # in rotation during the check
    held_out: list[str] = field(default_factory=list)       # app hosts taken out of rotation for the check
    version: str | None = None
    artifact_sha256: str | None = None
    versions: dict[str, str | None] = field(default_factory=dict)

    def plan(self) -> load.LoadPlan:
        mix = load.mix_named(self.mix)
        return load.LoadPlan(
            base_url=self.url, steps=load.make_steps(self.steps, self.step_seconds, mix), mix=self.mix,
            courses=[str(uuid.uuid4()) for _ in range(self.courses)] if mix.write_share else [],
            timeout_s=self.timeout_s, max_in_flight=self.max_in_flight, max_requests=self.max_requests,
            max_seconds=self.max_seconds, stop_when=self.stop_when)


def validate(ctx: Context) -> load.LoadPlan:
    """Every refusal that does not need the environment: the plan's own sense, caps, the target address.
    Returns the load plan."""
    if not ctx.steps:
        raise ScaleCheckRefused("no steps: give --steps or a target to derive them from. No load was sent.")
    plan = ctx.plan()
    load.validate(plan)
    return plan


def prepare(env_name: str, *, target: float | None = None, steps: list | str | None = None,
            step_seconds: float | None = None, mix: str | None = None, allow_prod: bool = False,
            reason: str = "", max_seconds: float | None = None, max_requests: int | None = None,
            timeout_s: float = 10.0, max_in_flight: int = 256, courses: int = 200,
            stop_after_failing_step: bool = True, sample_hosts: bool = True,
            env: Env | None = None, url_override: str = "", dsn_override: str = "",
            p99_ms: float | None = None, app_hosts: int = 0) -> Context:
    """Resolve and check everything before any load is sent; print what the check will do.

    `url_override` and `dsn_override` (operators and tests: a service on loopback, and its database, no
    password) stand in for the inventory's load balancer and database; with both, an environment that the
    inventories do not hold is described by `target` and `p99_ms` alone."""
    from opsbook.core.inventory import UnknownEnvironment
    from opsbook.core.inventory import load as load_inventory

    if url_override or dsn_override:
        if not (url_override and dsn_override):
            raise ScaleCheckRefused("url_override and dsn_override go together (the service and its database). "
                                    "No load was sent.")
        return _prepare_override(env_name, url_override, dsn_override, target=target, p99_ms=p99_ms, steps=steps,
                                 step_seconds=step_seconds, mix=mix, timeout_s=timeout_s,
                                 max_in_flight=max_in_flight, courses=courses, env=env)
    try:
        env = env or load_inventory(env_name)
    except UnknownEnvironment as e:
        raise ScaleCheckRefused(str(e)) from None
    if target is not None and not (isinstance(target, int | float) and target > 0):
        raise ScaleCheckRefused(f"--target must be a positive rate in responses/s, got {target!r}. No load was "
                                f"sent.")
    if is_protected(env) and (not allow_prod or not str(reason or "").strip()):
        raise ScaleCheckRefused(
            f"{env.name} is production: a scaling check there puts real load on what users use. It needs both "
            f"--allow-prod and --reason R (the reason is written in the record). Nothing was sent. A check on "
            f"staging or the lab is what a production release asks for.")
    tgt = target_of(env, target)
    chosen_mix = mix or tgt.mix or "biglearn"
    load.mix_named(chosen_mix)
    rates = parse_steps(steps) or [round(tgt.responses_per_s * f, 1) for f in DEFAULT_FRACTIONS]
    url = load.check_target(load_balancer_url(env), allowed_networks(env))
    cap_seconds = float(max_seconds if max_seconds is not None else env.var("opsbook_scale_check_max_seconds",
                                                                            DEFAULT_MAX_SECONDS))
    cap_requests = int(max_requests if max_requests is not None else env.var("opsbook_scale_check_max_requests",
                                                                             DEFAULT_MAX_REQUESTS))
    ctx = Context(env.name, env.kind, url, "", tgt, rates,
                  float(step_seconds if step_seconds is not None else env.var("opsbook_scale_check_step_seconds",
                                                                              DEFAULT_STEP_SECONDS)),
                  chosen_mix, cap_seconds, cap_requests, timeout_s, max_in_flight, courses,
                  {"error_rate": 0.5, "p99_ms": max(5000.0, tgt.max_p99_ms * 20)} if stop_after_failing_step else None,
                  allow_prod, str(reason or ""), sample_hosts)
    validate(ctx)
    from opsbook.engines import database

    ctx.conninfo = database.admin_conninfo(env)
    every = [h.name for h in env.hosts("app")]
    if app_hosts and not 0 < app_hosts <= len(every):
        raise ScaleCheckRefused(f"app_hosts {app_hosts}: {env.name} has {len(every)} app hosts; give 1 to "
                                f"{len(every)} (0: all of them). No load was sent.")
    ctx.app_hosts = every[:app_hosts] if app_hosts else every
    ctx.held_out = every[len(ctx.app_hosts):]
    return ctx


def _prepare_override(env_name: str, url: str, dsn: str, *, target: float | None, p99_ms: float | None,
                      steps, step_seconds, mix, timeout_s: float, max_in_flight: int, courses: int,
                      env: Env | None) -> Context:
    from psycopg.conninfo import conninfo_to_dict

    if conninfo_to_dict(dsn).get("password"):
        raise ScaleCheckRefused("dsn_override contains a password, and run parameters are stored in the record; "
                                "give it through PGPASSWORD or ~/.pgpass. No load was sent.")
    load.check_target(url, [])   # loopback only
    if not target or not p99_ms:
        raise ScaleCheckRefused("with url_override, give the target rate and its p99 objective (target, p99_ms). "
                                "No load was sent.")
    tgt = curve.Target(float(target), float(p99_ms), 0.0)
    chosen = mix or "biglearn"
    load.mix_named(chosen)
    rates = parse_steps(steps) or [round(tgt.responses_per_s * f, 1) for f in DEFAULT_FRACTIONS]
    ctx = Context(env_name, "local", url, dsn, tgt, rates, float(step_seconds or DEFAULT_STEP_SECONDS), chosen,
                  DEFAULT_MAX_SECONDS, DEFAULT_MAX_REQUESTS, timeout_s, max_in_flight, courses,
                  {"error_rate": 0.5, "p99_ms": max(5000.0, tgt.max_p99_ms * 20)}, sample_hosts=False)
    validate(ctx)
    return ctx


def describe(ctx: Context) -> None:
    mix = load.mix_named(ctx.mix)
    print(f"scaling check of {ctx.env} through {ctx.url}")
    print(f"  traffic: {mix.name}: {mix.description}; mean {mix.mean_batch:.1f} responses per record_responses")
    print(f"  steps (offered responses/s): {', '.join(f'{r:g}' for r in ctx.steps)}, {ctx.step_seconds:g} s each")
    print(f"  target: {ctx.target.responses_per_s:g} responses/s with p99 ≤ {ctx.target.max_p99_ms:g} ms, errors ≤ "
          f"{ctx.target.max_error_rate:.2%}, nothing lost")
    print(f"  bounds: at most {ctx.max_seconds:g} s and {ctx.max_requests:,} requests; request timeout "
          f"{ctx.timeout_s:g} s; {ctx.max_in_flight} simulated clients")
    if ctx.stop_when:
        print(f"  stops stepping up after a step with more than {ctx.stop_when['error_rate']:.0%} errors or p99 over "
              f"{ctx.stop_when['p99_ms']:g} ms")
    if ctx.allow_prod:
        print(f"  production allowed: {ctx.reason}")
    if ctx.held_out:
        print(f"  app hosts in rotation: {', '.join(ctx.app_hosts)}; taken out for the check and put back after it: "
              f"{', '.join(ctx.held_out)}")


# --- what the fleet serves ----------------------------------------------------------------------------
def fleet(ctx: Context, env: Env | None = None) -> dict[str, Any]:
    """The version each app host serves, and the artifact (sha256) of that version when it was built here:
    the record says exactly what was measured."""
    from opsbook.core.inventory import load as load_inventory
    from opsbook.engines import artifact
    from opsbook.engines import fleet as fleet_engine

    if not ctx.app_hosts:
        print("no app hosts in the inventory (a service given by url_override): version not asked")
        return {"version": None, "artifact_sha256": None, "versions": {}}
    env = env or load_inventory(ctx.env)
    versions = dict(fleet_engine.served_versions(env))
    ctx.versions = versions
    served = {v for v in versions.values() if v}
    if len(served) == 1:
        ctx.version = served.pop()
        try:
            ctx.artifact_sha256 = artifact.find(ctx.version).sha256
        except OpsbookError:
            ctx.artifact_sha256 = None
    for host, v in sorted(versions.items()):
        print(f"  {host}: {v or 'no answer'}")
    print(f"version measured: {ctx.version or 'mixed or unknown'}; artifact sha256: {ctx.artifact_sha256 or 'unknown'}")
    return {"version": ctx.version, "artifact_sha256": ctx.artifact_sha256, "versions": versions}


# --- the run --------------------------------------------------------------------------------------------
@dataclass
class CheckRun:
    ctx: Context
    result: load.LoadResult | None
    rows: list[dict[str, Any]]
    knee: curve.Knee
    limit: curve.Limit
    lost: dict[str, Any]
    verdict: curve.Verdict
    generator_saturated: bool
    host_problems: list[str]
    started: float
    ended: float

    @property
    def knee_achieved(self) -> float | None:
        return self.knee.achieved

    def capacity_per_host(self) -> float | None:
        n = len(self.ctx.app_hosts)
        return round(self.knee.achieved / n, 1) if self.knee.achieved and n else None


def run(ctx: Context, env: Env | None = None, *, out=print) -> CheckRun:
    """Drive the load, sample the hosts and the database, count acknowledged responses afterwards."""
    from opsbook.engines import hoststats

    plan = validate(ctx)
    planned = sum(s.seconds for s in plan.steps)
    machine = hoststats.MachineSampler(ctx.conninfo or None).start()
    remote = None
    problems: list[str] = []
    if ctx.sample_hosts:
        if env is None:
            from opsbook.core.inventory import load as load_inventory

            env = load_inventory(ctx.env)
        remote = hoststats.RemoteSampling.start(env, "all", seconds=planned + 60)
        if remote.problem:
            problems.append(remote.problem)

    def progress(step: load.StepResult) -> None:
        out(f"step {step.index}: offered {step.offered_responses_per_s:g}/s, achieved "
            f"{step.achieved_responses_per_s:.0f} responses/s ({step.achieved_requests_per_s:.0f} requests/s), p99 "
            f"{step.p99_ms} ms, errors {step.error_count}, generator {step.generator_cpu:.2f} cores"
            + (" (truncated)" if step.truncated else ""))

    started = time.time()
    result: load.LoadResult | None = None
    try:
        if ctx.held_out:
            from opsbook.engines import rotation

            if env is None:
                from opsbook.core.inventory import load as load_inventory

                env = load_inventory(ctx.env)
            with rotation.held_out(env, ctx.held_out):
                result = load.run(plan, on_step=progress)
        else:
            result = load.run(plan, on_step=progress)
    finally:
        machine.stop()
        series = remote.collect() if remote is not None else {}
    ended = time.time()
    for host, s in series.items():
        if s.problem:
            problems.append(f"{host}: {s.problem}")
    if machine.db_problem:
        problems.append(machine.db_problem)
    rows = curve_rows(ctx, result.steps, machine, series)
    lost = count_lost(ctx, result)
    return judge(ctx, result, rows, lost, problems=problems, started=started, ended=ended)


def curve_rows(ctx: Context, steps: list[load.StepResult], machine=None, series=None) -> list[dict[str, Any]]:
    """One row per step: the load's figures, this machine's CPU, each host's CPU and memory, the database."""
    from opsbook.engines import hoststats

    mix = load.mix_named(ctx.mix)
    rows = []
    for s in steps:
        row = s.row()
        row["offered"] = s.offered_responses_per_s
        row["achieved"] = s.achieved_responses_per_s if mix.write_share else s.achieved_requests_per_s
        row["offered_actual"] = round(s.offered_actual, 1)
        row["achieved_ratio"] = round(s.achieved_ratio, 3)
        row["errors_by_kind"] = dict(s.errors)
        row["machine_cpu"] = machine.machine_cpu(s.start, s.end) if machine is not None else None
        row["db"] = (machine.database(s.start, s.end) if machine is not None else None) or {}
        row["hosts"] = {}
        for host, hs in (series or {}).items():
            w = hoststats.host_window(hs, s.start, s.end, container=ctx.kind == "lab")
            if w is not None:
                row["hosts"][host] = w
        rows.append(row)
    return rows


def count_lost(ctx: Context, result: load.LoadResult) -> dict[str, Any]:
    """Every response the service acknowledged, looked up in the database by its uuid."""
    from opsbook.engines import database

    uuids = load.read_acknowledged(result.acknowledged_file)
    try:
        counted = database.count_missing(ctx.conninfo, uuids) if ctx.conninfo else None
    except Exception as e:  # noqa: BLE001 - an unverified count fails the verdict; it does not end the record
        return {"acknowledged": len(uuids), "missing": None, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    finally:
        with contextlib.suppress(OSError):
            os.unlink(result.acknowledged_file)
    if counted is None:
        return {"acknowledged": len(uuids), "missing": None, "error": "no database to count in"}
    return {**counted, "error": None}


def judge(ctx: Context, result: load.LoadResult, rows: list[dict[str, Any]], lost: dict[str, Any], *,
          problems: list[str], started: float, ended: float) -> CheckRun:
    rule = curve.KneeRule(p99_ms=ctx.target.max_p99_ms)
    k = curve.knee(rows, rule)
    pick = next((r for r in rows if r["index"] == k.first_failing), rows[-1] if rows else {})
    limit = curve.limiting_resource(pick, shared_cores=os.cpu_count() if ctx.kind == "lab" else None)
    v = curve.verdict(rows, ctx.target, missing_acknowledged=lost.get("missing"))
    saturated = any((r.get("generator_cpu") or 0) >= curve.SATURATED for r in rows)
    if result.setup.get("courses_created", 1) == 0 and load.mix_named(ctx.mix).write_share:
        v.reasons.insert(0, f"the service did not create a single course during setup ({result.setup.get('errors')})")
        v.passed = False
    return CheckRun(ctx, result, rows, k, limit, lost, v, saturated, problems, started, ended)


# --- what the record shows ------------------------------------------------------------------------------
def table(check: CheckRun):
    import pandas as pd

    cols = ["index", "offered", "offered_actual", "achieved", "achieved_ratio", "offered_requests_per_s",
            "achieved_requests_per_s",
            "p50_ms", "p95_ms", "p99_ms", "service_p99_ms", "send_lag_p99_ms", "errors", "error_rate",
            "errors_by_kind", "generator_cpu", "machine_cpu", "max_in_flight", "truncated"]
    rows = []
    for r in check.rows:
        row = {c: r.get(c) for c in cols}
        row["errors_by_kind"] = ", ".join(f"{k}: {v}" for k, v in sorted((r.get("errors_by_kind") or {}).items()))
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def hosts_table(check: CheckRun):
    import pandas as pd

    rows = []
    for r in check.rows:
        for host, h in sorted(r["hosts"].items()):
            rows.append({"step": r["index"], "offered": r["offered"], "host": host, **h})
    return pd.DataFrame(rows, columns=["step", "offered", "host", "cpu_cores", "cpu_share", "cpu_source",
                                       "memory_mb", "cpus"])


def db_table(check: CheckRun):
    import pandas as pd

    cols = ["xact_per_s", "rollbacks", "buffer_hit_ratio", "wal_mb_per_s", "deadlocks", "lock_waits_max",
            "lock_waits_mean", "active_sessions_max"]
    return pd.DataFrame([{"step": r["index"], "offered": r["offered"], **{c: (r["db"] or {}).get(c) for c in cols}}
                         for r in check.rows], columns=["step", "offered", *cols])


def plot(check: CheckRun):
    """Throughput and p99 against offered load (top), each host's CPU and the machine's (bottom)."""
    import matplotlib.pyplot as plt

    fig, (top, mid, bottom) = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    offered = [r["offered"] for r in check.rows]
    top.plot(offered, offered, linestyle=":", color="grey", label="offered")
    top.plot(offered, [r["achieved"] for r in check.rows], marker="o", label="achieved")
    top.axhline(check.ctx.target.responses_per_s, color="tab:green", linestyle="--", linewidth=0.8,
                label=f"target {check.ctx.target.responses_per_s:g}/s")
    if check.knee.offered:
        top.axvline(check.knee.offered, color="tab:red", linestyle="--", linewidth=0.8,
                    label=f"knee {check.knee.offered:g}/s")
    top.set_ylabel("responses/s")
    top.set_title("throughput against offered load")
    top.legend(fontsize="small")
    mid.plot(offered, [r["p99_ms"] or float("nan") for r in check.rows], marker="o", label="p99 from scheduled time")
    mid.plot(offered, [r["p50_ms"] or float("nan") for r in check.rows], marker=".", label="p50")
    mid.plot(offered, [r["service_p99_ms"] or float("nan") for r in check.rows], marker="x", linestyle=":",
             label="p99 from actual send (closed-loop view)")
    mid.axhline(check.ctx.target.max_p99_ms, color="tab:green", linestyle="--", linewidth=0.8,
                label=f"SLO {check.ctx.target.max_p99_ms:g} ms")
    mid.set_yscale("log")
    mid.set_ylabel("latency (ms)")
    mid.legend(fontsize="small")
    hosts = sorted({h for r in check.rows for h in r["hosts"]})
    for host in hosts:
        bottom.plot(offered, [r["hosts"].get(host, {}).get("cpu_cores", float("nan")) for r in check.rows],
                    marker=".", label=host)
    bottom.plot(offered, [r.get("generator_cpu") or float("nan") for r in check.rows], marker="x", linestyle=":",
                label="load generator")
    if any(r.get("machine_cpu") is not None for r in check.rows):
        cores = os.cpu_count() or 1
        bottom.plot(offered, [(r.get("machine_cpu") or float("nan")) * cores for r in check.rows], color="black",
                    linewidth=2, label=f"this machine (all of it: {cores} cores)")
    bottom.set_ylabel("CPU (cores)")
    bottom.set_xlabel("offered load (responses/s)")
    bottom.set_title("CPU per host, read from the hosts")
    bottom.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    return fig


def summary(check: CheckRun, out=print) -> None:
    k = check.knee
    out(f"knee: {k.rule}")
    if k.index is None:
        out(f"  no step passed ({'; '.join(k.failing_reasons)})")
    else:
        out(f"  step {k.index}: offered {k.offered:g}/s, achieved {k.achieved:.0f}/s, p99 {k.p99_ms} ms"
            + (f"; step {k.first_failing} failed: {'; '.join(k.failing_reasons)}" if k.first_failing else
               "; every step passed (the knee is above the highest step)"))
    out(f"limiting resource: {check.limit.resource}: {check.limit.detail}")
    if check.generator_saturated:
        out("the load generator was saturated (≥ 90 % of a core) in at least one step: figures above that step "
            "measure the generator as much as the service")
    per_host = check.capacity_per_host()
    if per_host:
        out(f"capacity per app host: {per_host:g} responses/s ({len(check.ctx.app_hosts)} app hosts in rotation)")
    lost = check.lost
    out(f"nothing lost: {lost.get('acknowledged')} responses acknowledged, "
        f"{lost.get('missing') if lost.get('missing') is not None else 'not counted'} missing"
        + (f" ({lost['error']})" if lost.get("error") else ""))
    out(f"verdict: {'PASS' if check.verdict.passed else 'FAIL'} against {check.ctx.target.responses_per_s:g}/s, p99 ≤ "
        f"{check.ctx.target.max_p99_ms:g} ms, errors ≤ {check.ctx.target.max_error_rate:.2%}"
        + ("" if check.verdict.passed else ": " + "; ".join(check.verdict.reasons)))
    for p in check.host_problems:
        out(f"note: {p}")


def figures(check: CheckRun) -> dict[str, Any]:
    """Key figures for the ledger: what the release gate and the records site read."""
    ctx, k = check.ctx, check.knee
    best = max(check.rows, key=lambda r: r["achieved"], default={})
    at = next((r for r in check.rows if r["index"] == check.verdict.step), {})
    return {
        "verdict": "pass" if check.verdict.passed else "fail",
        "verdict_reasons": check.verdict.reasons,
        "target_responses_per_s": ctx.target.responses_per_s,
        "target_p99_ms": ctx.target.max_p99_ms,
        "target_error_rate": ctx.target.max_error_rate,
        "mix": ctx.mix,
        "version": ctx.version,
        "artifact_sha256": ctx.artifact_sha256,
        "load_balancer": ctx.url,
        "app_hosts": len(ctx.app_hosts),
        "app_hosts_held_out": ctx.held_out,
        "knee_responses_per_s": k.achieved,
        "knee_offered_per_s": k.offered,
        "knee_p99_ms": k.p99_ms,
        "knee_rule": k.rule,
        "capacity_per_host": check.capacity_per_host(),
        "limiting_resource": check.limit.resource,
        "limiting_detail": check.limit.detail,
        "max_achieved_responses_per_s": best.get("achieved"),
        "p99_ms_at_target": at.get("p99_ms"),
        "achieved_at_target": at.get("achieved"),
        "acknowledged_responses": check.lost.get("acknowledged"),
        "missing_acknowledged": check.lost.get("missing"),
        "generator_saturated": check.generator_saturated,
        "stopped_by": check.result.stopped_by if check.result else None,
        "steps": [[r["offered"], r["achieved"], r["p99_ms"], round(r["error_rate"], 4)] for r in check.rows],
        "allow_prod_reason": ctx.reason if ctx.allow_prod else None,
        "seconds": round(check.ended - check.started, 1),
    }


def knee_host_figures(check: CheckRun) -> tuple[float | None, float | None]:
    """(mean CPU share of the app hosts, requests/s per app host) at the knee step."""
    row = next((r for r in check.rows if r["index"] == check.knee.index), None)
    if row is None or not check.ctx.app_hosts:
        return None, None
    shares = [h["cpu_share"] for name, h in row["hosts"].items() if name in check.ctx.app_hosts]
    return (round(sum(shares) / len(shares), 3) if shares else None,
            round(row["achieved_requests_per_s"] / len(check.ctx.app_hosts), 2))


def autoscaling(check: CheckRun, env: Env | None = None, out=print) -> dict[str, Any] | None:
    """AWS environments: the app Auto Scaling group and its target-tracking policy against the capacity
    just measured (opsbook.engines.autoscaling). Other environments have none: says so, returns None."""
    if check.ctx.kind != "aws":
        out(f"{check.ctx.env} is a {check.ctx.kind} environment: no Auto Scaling group to check")
        return None
    from opsbook.core.inventory import load as load_inventory
    from opsbook.engines import autoscaling as asg
    from opsbook.engines import aws

    env = env or load_inventory(check.ctx.env)
    doc = dict(env.var("opsbook_scale_target", {}) or {})
    group = asg.app_group(aws.target(env), env.name)
    cpu, rps = knee_host_figures(check)
    a = asg.assess(group, target_rate=check.ctx.target.responses_per_s, capacity_per_host=check.capacity_per_host(),
                   knee_cpu_share=cpu, knee_requests_per_host_per_s=rps,
                   ramp_seconds=float(doc.get("ramp_seconds", 600)), headroom=float(doc.get("headroom", 0.25)))
    out(f"Auto Scaling group {group.name}: min {group.min_size}, max {group.max_size}, desired {group.desired}; "
        f"policies: {', '.join(f'{p.name} ({p.metric} {p.target_value:g})' for p in group.policies) or 'none'}")
    for f in a.findings:
        out(f"  {'ok  ' if f.ok else 'FAIL'} {f.name}: {f.text}")
    return a.as_dict()


def finish(check: CheckRun) -> None:
    """The record is a check that ran: a failing verdict is a finding, written in the figures; the run
    itself fails only when the check could not be judged (no step ran)."""
    if not check.rows:
        raise OpsbookError("no step of the scaling check ran; the record says why")
    print("done: verdict " + ("pass" if check.verdict.passed else "fail"))


def as_dict(ctx: Context) -> dict[str, Any]:
    d = asdict(ctx)
    d.pop("conninfo", None)
    return d


# --- what the Invoke task calls ---------------------------------------------------------------------------
def scale_check(env: Env, *, target: float | None = None, steps: str | None = None,
                step_seconds: float | None = None, mix: str | None = None, allow_prod: bool = False,
                reason: str | None = None, dry_run: bool = False, sample_hosts: bool = True,
                max_in_flight: int = 256, app_hosts: int = 0, out=print) -> dict[str, Any] | Context:
    """Check every parameter (nothing is sent when one is wrong), then run the scaling_check runbook for
    `env` under the environment's lock. Returns its ledger entry (or, with dry_run, the context)."""
    from opsbook.engines import lock as locks
    from opsbook.engines.records import runner

    ctx = prepare(env.name, target=target, steps=steps, step_seconds=step_seconds, mix=mix,
                  allow_prod=allow_prod, reason=reason or "", env=env, sample_hosts=sample_hosts,
                  max_in_flight=max_in_flight, app_hosts=app_hosts)
    describe(ctx)
    if dry_run:
        out("dry run: no load was sent, no record written")
        return ctx
    params = {"target": float(target) if target is not None else 0.0, "steps": list(ctx.steps),
              "step_seconds": ctx.step_seconds, "mix": ctx.mix, "allow_prod": bool(allow_prod),
              "reason": reason or "", "sample_hosts": bool(sample_hosts), "max_in_flight": int(max_in_flight),
              "app_hosts": int(app_hosts)}
    # One operation at a time per environment: a release moving hosts under the load would make the curve
    # say nothing about either.
    with locks.lock_for(env).hold("scale check", wait=0) as held:
        out(held.message)
        return runner.run("scaling_check", env, params, log=out)
