"""A runbook that runs outside opsbook (opened in JupyterLab, or given to papermill by hand) is not
a record: nothing would keep its executed notebook, and nothing would take the environment's lock
for it the way `invoke` does. Every runbook calls :func:`require_record` first thing after its
parameters: with its default parameters it then changes nothing anywhere.

opsbook's runner injects ``record_id`` into every run; without one, the run is not opsbook's.
This module is imported inside runbook kernels, so it stays light.
"""

from __future__ import annotations

from typing import Any

from opsbook.core.errors import OpsbookError


class NotARecord(OpsbookError):
    """The runbook was run outside opsbook in a way that would change something, or without the
    parameters it needs; nothing was done."""


def require_record(runbook: str, record_id: str | None, env: str | None, *, changes: bool = True,
                   command: str = "", required: dict[str, Any] | None = None) -> None:
    """Refuse a run outside opsbook that would change something (`changes`), or that lacks its
    environment or a required parameter. A run by opsbook (a `record_id`) always passes: the
    runner has checked its parameters already."""
    if record_id:
        return
    how = command or f"invoke runbook {runbook} --env ENV -p NAME=VALUE"
    if changes:
        raise NotARecord(
            f"runbook {runbook} changes an environment, and this run is not a record (opsbook did not start it): "
            f"nothing was changed. Run it through `{how}` so it takes the environment's lock and leaves a "
            "record (the executed notebook, its HTML and a ledger entry).")
    missing = ["env"] if not env else []
    missing += [name for name, value in (required or {}).items() if value is None]
    if missing:
        raise NotARecord(
            f"runbook {runbook}: {', '.join(missing)} not set, and this run is not a record: nothing was done. "
            f"Set {' and '.join(missing)} in the parameters cell for a look that changes nothing and leaves no "
            f"record, or run it through `{how}`.")
