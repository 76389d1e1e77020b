"""Run a runbook (``runbooks/<name>.ipynb``) for an environment and store its record.

papermill executes the notebook; opsbook adds the discipline around it:

1. the runbook exists (else: the ones that do), and the parameters given match its
   ``parameters`` cell as papermill reads it (``papermill.inspect_notebook``): no unknown name,
   no missing required one, the declared type; all before anything runs;
2. the environment's record store is reachable, before anything runs;
3. ``env``, ``record_id`` and ``parent_record_id`` are injected into every run;
4. the executed notebook (or papermill's partial one with its error banner), its HTML rendering
   and a ledger entry are stored, with every secret value replaced, whether the run succeeded
   or failed; a failed run raises :class:`RunbookFailed` after its record is stored.

Parameter convention (runbooks/README.md): ``name: type = default  # comment``; a required
parameter has default ``None`` and a comment starting with "required".
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from opsbook.core import facts
from opsbook.core.errors import OpsbookError
from opsbook.core.inventory import Env
from opsbook.core.paths import ROOT, RUNBOOKS
from opsbook.engines import interrupts

INJECTED = ("env", "record_id", "parent_record_id")
KERNEL = "python3"

# papermill's inferred_type_name -> Python types a given value may have.
_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "list": (list, tuple),
    "dict": (dict,),
}


class RunbookError(OpsbookError):
    """The run was refused before anything executed; no record exists for it."""


class RunbookFailed(OpsbookError):
    """The runbook ran and failed; its record (with the error) is stored."""

    def __init__(self, message: str, entry: dict[str, Any]):
        super().__init__(message)
        self.entry = entry


@dataclass(frozen=True)
class Parameter:
    name: str
    type: str          # papermill's inferred_type_name: str, int, float, bool, list, dict, or None (untyped)
    default: str       # the default as written in the cell
    help: str

    @property
    def required(self) -> bool:
        return self.default == "None" and self.help.strip().lower().startswith("required")

    def describe(self) -> str:
        typed = f": {self.type}" if self.type != "None" else ""
        comment = f"  # {self.help}" if self.help else ""
        return f"{self.name}{typed} = {self.default}{comment}"


# -- finding runbooks and their parameters ---------------------------------------------------
def names(runbooks_dir: Path | None = None) -> list[str]:
    directory = Path(runbooks_dir or RUNBOOKS)
    return sorted(p.stem for p in directory.glob("*.ipynb")) if directory.is_dir() else []


def path_of(name: str, runbooks_dir: Path | None = None) -> Path:
    directory = Path(runbooks_dir or RUNBOOKS)
    path = directory / f"{name}.ipynb"
    if "/" in name or name.startswith(".") or not path.is_file():
        known = ", ".join(names(directory)) or "none"
        raise RunbookError(
            f"no runbook {name!r} in {directory}; runbooks that exist: {known}. Nothing was run."
        )
    return path


def parameters(name: str, runbooks_dir: Path | None = None) -> list[Parameter]:
    """The runbook's declared parameters, read by papermill from its `parameters` cell."""
    import papermill

    declared = papermill.inspect_notebook(str(path_of(name, runbooks_dir)))
    return [
        Parameter(p["name"], str(p["inferred_type_name"]), str(p["default"]), str(p.get("help") or ""))
        for p in declared.values()
    ]


def _signature(declared: list[Parameter]) -> str:
    lines = [p.describe() for p in declared if p.name not in INJECTED]
    return "\n    ".join(lines) if lines else "(none)"


def check_parameters(name: str, declared: list[Parameter], given: dict[str, Any]) -> dict[str, Any]:
    """Refuse unknown, missing-required and wrongly typed parameters; return the ones to inject."""
    by_name = {p.name: p for p in declared}
    problems = []
    for key in given:
        if key in INJECTED:
            problems.append(f"{key!r} is set by opsbook for every run (use --env / --parent for it)")
        elif key not in by_name:
            problems.append(f"unknown parameter {key!r}")
    for p in declared:
        if p.name in INJECTED:
            continue
        if p.name not in given or given[p.name] is None:
            if p.required:
                problems.append(f"missing required parameter {p.name!r}")
            continue
        allowed = _TYPES.get(p.type)
        value = given[p.name]
        wrong = allowed is not None and (
            not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)
        )
        if wrong:
            problems.append(f"{p.name!r} must be {p.type}, got {type(value).__name__} {value!r}")
    if problems:
        raise RunbookError(
            f"runbook {name}: " + "; ".join(problems) + ". Nothing was run.\n"
            f"  {name} takes:\n    {_signature(declared)}"
        )
    return {k: v for k, v in given.items() if v is not None or not by_name[k].required}


def parse_cli_parameters(name: str, declared: list[Parameter], pairs: list[str]) -> dict[str, Any]:
    """`-p rows=500 -p hosts='[app1, app2]'` -> typed values, converted by the declared type."""
    by_name = {p.name: p for p in declared}
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep:
            raise RunbookError(f"parameter {pair!r}: expected NAME=VALUE. Nothing was run.")
        p = by_name.get(key)
        kind = p.type if p else "None"
        try:
            if kind == "str":
                value: Any = text
            elif kind == "int":
                value = int(text)
            elif kind == "float":
                value = float(text)
            elif kind == "bool":
                value = _bool(text)
            else:  # list, dict, untyped: YAML flow syntax reads like the Python an operator would type
                value = yaml.safe_load(text)
        except (ValueError, yaml.YAMLError):
            raise RunbookError(
                f"runbook {name}: {key}={text!r} is not a valid {kind}. Nothing was run.\n"
                f"  {name} takes:\n    {_signature(declared)}"
            ) from None
        out[key] = value
    return out


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in ("true", "false", "yes", "no", "1", "0"):
        raise ValueError(text)
    return lowered in ("true", "yes", "1")


def preload() -> None:
    """Import what writing a record needs (papermill, nbformat, nbconvert's HTML exporter: about 0.7 s
    here), for a caller that has a moment of waiting before its record and wants it written sooner
    (a release while its hosts mark it good). Safe from any thread, and a no-op once done."""
    import nbformat  # noqa: F401
    import papermill  # noqa: F401
    from nbconvert import HTMLExporter  # noqa: F401


def render_html(nb) -> bytes:
    """The record's HTML, readable offline: nbconvert's lab template less its CDN scripts
    (templates/offline: require.js, MathJax and Mermaid, which no runbook's output needs)."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(extra_template_basedirs=[str(Path(__file__).parent / "templates")],
                            template_name="offline")
    body, _ = exporter.from_notebook_node(nb)
    return body.encode()


def _now() -> datetime:
    return datetime.now(UTC)


def _ipc_kernel_manager(directory: Path):
    """A kernel manager that talks to the kernel over Unix sockets in `directory` (mode 0700).

    jupyter_client's default is TCP on loopback, unencrypted: any local user could read a
    runbook's traffic (connection strings, outputs), and ipykernel warns about it on every start.
    It keeps the clients it hands out (`clients`): nbclient does not stop the channels of a client
    it made for a kernel it was given (WarmKernel), so the kernel's owner stops them.
    """
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class IPCKernelManager(AsyncKernelManager):
        @default("transport")
        def _default_transport(self) -> str:
            return "ipc"

        @default("ip")
        def _default_ip(self) -> str:
            return str(directory / "kernel")

        def client(self, **kwargs: Any) -> Any:
            made = super().client(**kwargs)
            self.__dict__.setdefault("clients", []).append(made)
            return made

    return IPCKernelManager


class WarmKernel:
    """A runbook kernel started ahead of the run that will use it, for an operation that writes its
    record when it ends (a release): the kernel's start (about a second of CPU) and the imports
    named in `preload` happen while the operation waits on hosts, not after its last step. One run
    uses it (`run(..., kernel=...)`); leaving the `with` block shuts it down, used or not. If it has
    died by then, the run starts a kernel of its own as usual.

    jupyter_client's AsyncKernelManager, the class papermill's engine (nbclient) uses, started and
    stopped through jupyter_core's run_sync: the same per-thread event loop nbclient runs on, so
    nbclient can adopt the kernel (its `km`); nbclient then leaves it running, and it is ours to stop.
    The preload is run by the kernel as it starts (ipykernel's `exec_lines`: no history, no output in
    the record): the record's own cells still import what they use, and find it loaded."""

    def __init__(self, preload: str = ""):
        self.preload = preload
        self.km: Any = None
        self.used = False
        self._tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> WarmKernel:
        from jupyter_core.utils import run_sync

        self._tmp = tempfile.TemporaryDirectory(prefix="opsbook-kernel-")
        try:
            self.km = _ipc_kernel_manager(Path(self._tmp.name))(kernel_name=KERNEL)
            # ipykernel runs `exec_lines` while it starts, before it answers anyone: no client of ours
            # talks to the kernel nbclient adopts. Returns once the process is launched.
            lines = [f"--IPKernelApp.exec_lines={line}" for line in self.preload.splitlines() if line.strip()]
            run_sync(self.km.start_kernel)(cwd=str(ROOT), extra_arguments=lines)
        except BaseException as e:   # a warm kernel is an optimisation: the run starts its own
            self._stop()
            if not isinstance(e, Exception):   # an interrupt while it started: stopped, and passed on
                raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop()

    def take(self) -> Any:
        """The kernel manager for one run, or None (not started, died, or used already)."""
        from jupyter_core.utils import run_sync

        if self.km is None or self.used:
            return None
        try:
            alive = run_sync(self.km.is_alive)()
        except Exception:  # noqa: BLE001 - a kernel we cannot ask about is not used
            alive = False
        if not alive:
            return None
        self.used = True
        return self.km

    def _stop(self) -> None:
        from jupyter_core.utils import run_sync

        if self.km is not None:
            for client in self.km.__dict__.get("clients", []):   # nbclient's
                with contextlib.suppress(Exception):
                    client.stop_channels()
            with contextlib.suppress(Exception):
                if run_sync(self.km.is_alive)():
                    run_sync(self.km.shutdown_kernel)(now=True)   # cleans its resources too
                else:
                    run_sync(self.km.cleanup_resources)()
            self.km = None   # its connection file and sockets go with the directory below
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class _StopBeforeCell(Exception):
    """Raised by the cell-start hook once an interrupt has been passed to the kernel: no further cell runs."""


class _ForwardedInterrupts:
    """While a runbook runs in a kernel of its own, the first SIGINT, SIGTERM or SIGHUP is passed to the
    kernel as SIGINT, as Jupyter's "interrupt" does: the running cell gets a KeyboardInterrupt, so its own
    `finally` and `with` blocks put back what they changed (a scaling check's hosts taken out of the load
    balancer, a migration's half-done batch), and no further cell starts. Before, the interrupt went to
    this process alone (jupyter_client starts kernels in their own session, so even a terminal's Ctrl-C
    does not reach them), and stopping the kernel killed the cell mid-way: its clean-up never ran. A
    second signal stops at once, as before. Only in the main thread, and only for a kernel this run
    started itself (a release writes its record from a pre-started kernel, shielded from signals)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, km: Any):
        provisioner = getattr(km, "provisioner", None)
        # The kernel's process group (jupyter_client starts it as a session leader), as its own interrupt uses.
        self.pgid = getattr(provisioner, "pgid", None) or getattr(provisioner, "pid", None)
        self.signum: int | None = None
        self.cell_started = False   # the kernel runs cells (it is up, and takes SIGINT as Jupyter's interrupt)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _ForwardedInterrupts:
        from opsbook.engines.interrupts import handling

        if self.pgid is not None:
            self._stack.enter_context(handling(self.SIGNALS, self._handle))
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stack.close()

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None:   # the second: stop now
            raise self.interrupt(signum)
        self.signum = signum
        # Before its first cell the kernel may still be starting (importing ipykernel and the preload), with
        # Python's own SIGINT handling: it would die there, printing its traceback on the operator's
        # terminal (seen: a migration Ctrl-C'd 2.5 s after its start). No cell has anything to clean up
        # then, and before_cell stops the run before the first one.
        if self.cell_started:
            with contextlib.suppress(OSError):
                os.killpg(self.pgid, signal.SIGINT)

    def before_cell(self, **_kwargs: Any) -> None:
        if self.signum is not None:
            raise _StopBeforeCell
        self.cell_started = True

    def interrupt(self, signum: int | None = None) -> KeyboardInterrupt:
        from opsbook.engines.interrupts import interrupt_for

        return interrupt_for(signum or self.signum)


def _execute(path: Path, injected: dict[str, Any], progress: bool, kernel: WarmKernel | None = None, *,
             forward_interrupts: bool = True):
    """Execute with papermill into a scratch file; return (notebook, error or None, interrupt or None).
    `forward_interrupts=False`: signals are left to the caller's handlers (a record of an operation that
    has ended, written shielded from them)."""
    import nbformat
    import papermill
    from papermill.exceptions import PapermillExecutionError

    error, interrupted = None, None
    with tempfile.TemporaryDirectory(prefix="opsbook-run-") as tmp, contextlib.ExitStack() as stack:
        out_path = Path(tmp) / path.name
        if kernel is None:   # a kernel of this run's own, started here so that interrupts can reach it
            kernel = stack.enter_context(WarmKernel())
            forwarded = stack.enter_context(_ForwardedInterrupts(kernel.km if forward_interrupts else None))
        else:
            forwarded = _ForwardedInterrupts(None)
        warm = kernel.take()
        try:
            papermill.execute_notebook(
                str(path),
                str(out_path),
                parameters=injected,
                kernel_name=KERNEL,
                language="python",
                cwd=str(ROOT),  # the kernel imports the opsbook that is running (opsbook.ROOT)
                progress_bar=progress,
                kernel_manager_class=_ipc_kernel_manager(Path(tmp)),
                on_cell_start=forwarded.before_cell,
                **({"km": warm} if warm is not None else {}),   # nbclient adopts a started kernel
            )
        except (PapermillExecutionError, _StopBeforeCell) as e:
            if forwarded.signum is not None:
                interrupted = forwarded.interrupt()
                error = (f"interrupted by {signal.Signals(forwarded.signum).name}: the running cell was stopped "
                         f"and its clean-up ran; no further cell was run")
                if isinstance(e, PapermillExecutionError) and e.ename != "KeyboardInterrupt":
                    error = (f"interrupted by {signal.Signals(forwarded.signum).name}, and cell {e.exec_count} then "
                             f"failed: {e.ename}: {e.evalue}; no further cell was run")
            else:
                error = f"cell {e.exec_count}: {e.ename}: {e.evalue}"
        except KeyboardInterrupt as e:
            error, interrupted = "interrupted by the operator", e
        except Exception as e:  # noqa: BLE001 - any failure of a started run (dead kernel, timeout) is recorded
            error = f"{type(e).__name__}: {e}"
        stack.close()   # this run's own kernel stops, and the handlers before it are back
        # papermill writes the output (with its error banner on failure) as soon as it starts;
        # if it failed before that, the record is the source notebook.
        nb = nbformat.read(out_path if out_path.exists() else path, as_version=4)
    return nb, error, interrupted


# -- running -------------------------------------------------------------------------------
def run(
    name: str,
    env,
    params: dict[str, Any] | None = None,
    *,
    parent_record_id: str | None = None,
    record_id: str | None = None,
    started: datetime | None = None,
    store=None,
    secrets: dict[str, str] | None = None,
    runbooks_dir: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    kernel: WarmKernel | None = None,
    forward_interrupts: bool = True,
) -> dict[str, Any]:
    """Run a runbook for an environment and store its record. Returns the ledger entry.

    `env` is the environment (`opsbook.core.inventory.Env`). The store defaults to the one
    the environment names (`opsbook_record_store`), the secrets to every `vault_*` value it
    knows. Raises RunbookError (nothing ran, nothing stored) or RunbookFailed (record stored).

    `started` is for an operation that records itself once it has ended (a release): the ledger's
    start and duration then cover the operation, not only the rendering of its record; it may also
    have started the record's `kernel` (WarmKernel) while it ran. `forward_interrupts=False` leaves signals
    to the caller's own handlers instead of passing the first to the kernel (see _ForwardedInterrupts).
    """
    import nbformat

    from opsbook.core.redaction import Redactor
    from opsbook.engines.records import spool
    from opsbook.engines.records.figures import figures_in
    from opsbook.engines.records.store import check_record_id, new_record_id, store_for

    path = path_of(name, runbooks_dir)
    declared = parameters(name, runbooks_dir)
    given = check_parameters(name, declared, dict(params or {}))
    if parent_record_id is not None:
        check_record_id(parent_record_id)

    env_name = env.name
    store = store if store is not None else store_for(env)
    secrets = secrets if secrets is not None else env.secret_values()
    store.check()
    spool.flush(store, log)   # records this machine kept while the store refused them go first
    redactor = Redactor(secrets)

    # A caller may reserve the id up front (a release names its record before it starts, so the
    # records of what it runs can point to it).
    record_id = check_record_id(record_id) if record_id else new_record_id(name)
    injected = {**given, "env": env_name, "record_id": record_id, "parent_record_id": parent_record_id}
    log(f"running runbook {name} for {env_name} as record {record_id}")
    start = started or _now()
    t0 = time.monotonic()
    nb, error, interrupted = _execute(path, injected, progress, kernel, forward_interrupts=forward_interrupts)
    end = _now()
    duration = (end - start).total_seconds()
    outcome = "failed" if error else "succeeded"

    nb = redactor.obj(nb)
    figures = figures_in(nb)
    if interrupted is not None:
        outcome = "interrupted"
    elif error and figures.get("outcome") in ("interrupted", "refused"):
        outcome = figures["outcome"]   # a failed run that says why: interrupted, or refused before acting
    entry = {
        "id": record_id,
        "runbook": name,
        "env": env_name,
        "parameters": redactor.obj(given),
        "operator": facts.operator(),
        "git_sha": facts.git_sha_dirty(),
        "start": start.isoformat(timespec="seconds"),
        "end": end.isoformat(timespec="seconds"),
        "duration_s": round(duration, 3),
        "outcome": outcome,
        "error": redactor.text(error) if error else None,
        "figures": redactor.obj(figures),
        "parent_record_id": parent_record_id,
    }
    nb_bytes = redactor.bytes(nbformat.writes(nb).encode())
    html_bytes = redactor.bytes(render_html(nb))
    entry = json.loads(redactor.bytes(json.dumps(entry).encode()))
    try:
        stored = store.write_record(entry, nb_bytes, html_bytes)
        where = store.location(stored["html"])
    except Exception as e:  # noqa: BLE001 - whatever the store's failure (disk, S3, network), keep the record
        kept = spool.keep(store, entry, nb_bytes, html_bytes)
        stored, where = {**entry, "spooled": str(kept)}, str(kept / "record.html")
        log(f"the record store {store.url} refused record {record_id} ({type(e).__name__}: {e}); it is kept on "
            f"this machine at {kept}, and the next opsbook command that reaches the store uploads it")
    if interrupted is not None:
        from opsbook.engines.interrupts import Stopped, describe

        log(f"interrupted; record {record_id} stored: {where}")
        raise Stopped(f"runbook {name} for {env_name} {error or describe(interrupted)}. Its record {record_id} says "
                      f"what it did: {where}", signal=getattr(interrupted, "signal", "SIGINT"))
    if outcome != "succeeded":
        raise RunbookFailed(
            f"runbook {name} failed for {env_name}: {entry['error']}\n"
            f"  Its record {record_id} is stored: {where}\n"
            f"  What it changed before failing is in that notebook; read it before running again.",
            stored,
        )
    log(f"record {record_id} stored: {where} ({time.monotonic() - t0:.1f} s)")
    return stored


def record_data(name: str, env, data: dict[str, Any], *, record_id: str | None = None,
                started: datetime | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The record of an operation that has ended: each value of `data` is written as JSON and the
    runbook gets its path under the same name; a run that fails (a runbook raises when the operation
    failed or did not pass) is the record too. Returns the ledger entry.

    Written shielded from signals (seconds: a kernel runs its runbook): a second Ctrl-C (or SIGTERM) while it
    was written cut it short, so an operation that had ended in order left no whole record of what it did
    (seen with a staging refresh and a restore drill interrupted twice). Signals that arrive are held and
    said; the caller ends as it was ending."""
    with interrupts.held(log, "the record was written", "it was"):
        return _record_data(name, env, data, record_id=record_id, started=started, log=log)


def _record_data(name: str, env, data: dict[str, Any], *, record_id: str | None, started: datetime | None,
                 log: Callable[[str], None]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"opsbook-{name}-") as tmp:
        given = {}
        for param, value in data.items():
            path = Path(tmp) / f"{param}.json"
            path.write_text(json.dumps(value, indent=2, default=str))
            given[param] = str(path)
        try:
            # Its kernel gets no interrupt: the record renders what the operation did (nothing in it to stop),
            # and signals are held while it is written.
            return run(name, env, given, record_id=record_id, started=started, progress=False, log=log,
                       forward_interrupts=False)
        except RunbookFailed as e:
            return e.entry


@contextlib.contextmanager
def locked_record(name: str, env, data: dict[str, Any], *, param: str, reason: str, record_id: str | None,
                  started: datetime, log: Callable[[str], None] = print) -> Iterator[Any]:
    """An operation's body under the environment's lock, recorded by runbook `name` when it ends,
    whether it succeeded or failed: `data` is the record (given to the runbook as `param`); its
    outcome, error, duration, lock and record id are filled in here. Refused by the lock (another
    holder): nothing ran, nothing is recorded."""
    from opsbook.engines import lock as locks

    t0 = time.monotonic()
    try:
        with locks.lock_for(env).hold(reason, wait=0) as held:
            log(held.message)
            data["lock"] = held.message
            yield held
            data["outcome"] = "succeeded"
    except locks.LockHeld:
        raise   # refused: nothing ran, nothing to record
    except BaseException as e:   # an interrupt is recorded too, as what stopped the run
        data["error"] = str(e) if isinstance(e, Exception) else f"interrupted ({type(e).__name__}) {e}".strip()
        if not isinstance(e, Exception) and data.get("outcome") in (None, "failed"):
            data["outcome"] = "interrupted"   # the ledger says so, as a release's does (not "failed")
        raise
    finally:
        data["duration_s"] = round(time.monotonic() - t0, 1)
        if "lock" in data:
            entry = record_data(name, env, {param: data}, record_id=record_id, started=started, log=log)
            data["record"] = entry.get("id", record_id)


# -- what the Invoke tasks call ----------------------------------------------------------------
def describe(runbooks_dir: Path | None = None) -> str:
    """Every runbook and the parameters an operator gives it."""
    lines = []
    for name in names(runbooks_dir):
        lines.append(name)
        lines.extend(f"    {p.describe()}" for p in parameters(name, runbooks_dir) if p.name not in INJECTED)
    return "\n".join(lines) or f"no runbooks in {runbooks_dir or RUNBOOKS}"


_WRITTEN_BY = re.compile(r"\((invoke [a-z.]+) passes it\)")


def run_cli(name: str, env: Env, pairs: list[str] | None = None, parent: str | None = None) -> dict:
    """`invoke runbook NAME -p key=value`: the values are converted by the declared types. A runbook that
    only renders what its task did (its required parameter is the JSON "invoke X passes it": release,
    snapshot, drill, refresh, provision) is refused: run by hand, it stored a failed record of that kind
    in the environment's ledger, which reads as an operation that ran."""
    declared = parameters(name)
    for p in declared:
        written_by = _WRITTEN_BY.search(p.help)
        if written_by:
            task = written_by.group(1)
            raise RunbookError(f"runbook {name} is the record `{task}` writes of what it did (its {p.name} is that "
                               f"task's own); run `{task}` instead (`invoke --help {task.split()[1]}`). Nothing "
                               f"was run.")
    return run(name, env, parse_cli_parameters(name, declared, pairs or []), parent_record_id=parent)
