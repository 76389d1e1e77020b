"""The inventory's numeric opsbook settings, checked when a task loads its environment: a value opsbook
cannot use (`opsbook_release_gate_seconds: abc`, `opsbook_release_keep: -1`) is refused with the list
of every such setting before anything is touched, instead of a Python error half-way through a
release (after its first batch switched, for the gate's seconds). Settings an inventory leaves out
take the defaults the code documents; only what an inventory sets is checked here."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from opsbook.core.errors import OpsbookError


@dataclass(frozen=True)
class Number:
    minimum: float
    whole: bool = False          # a count: 1, 2, 3 (not 2.5)
    above: bool = False          # strictly above the minimum (a timeout of 0 would never wait)
    unit: str = "seconds"

    def text(self) -> str:
        kind = "a whole number" if self.whole else f"a number of {self.unit}"
        bound = f"above {self.minimum:g}" if self.above else f"{self.minimum:g} or more"
        return f"{kind}, {bound}"

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool):
            return False
        try:
            number = float(value)
        except (TypeError, ValueError):
            return False
        if not math.isfinite(number) or (self.whole and number != int(number)):
            return False
        return number > self.minimum if self.above else number >= self.minimum


NUMBERS: dict[str, Number] = {
    "opsbook_release_gate_seconds": Number(0),
    "opsbook_release_health_timeout": Number(0, above=True),
    "opsbook_release_drain_timeout": Number(0),
    "opsbook_lock_lease_seconds": Number(0, above=True),
    "opsbook_probe_rate": Number(0, above=True, unit="requests per second"),
    "opsbook_probe_max_seconds": Number(0, above=True),
    "opsbook_release_keep": Number(1, whole=True),
    "opsbook_snapshot_keep": Number(1, whole=True),
    "opsbook_refresh_keep": Number(1, whole=True),
    "opsbook_repo_keep_free_mb": Number(0, unit="MiB"),
    "opsbook_refresh_keep_free_mb": Number(0, unit="MiB"),
    "opsbook_scale_check_step_seconds": Number(0, above=True),
    "opsbook_scale_check_max_seconds": Number(0, above=True),
}


class SettingsInvalid(OpsbookError):
    """Settings in an inventory that opsbook cannot use; the message lists each and what it must be."""


def check(env: Any) -> None:
    """Refuse `env` when its inventory sets any of NUMBERS to a value opsbook cannot use."""
    bad = []
    for name, number in NUMBERS.items():
        value = env.var(name, None)
        if value is not None and not number.accepts(value):
            bad.append(f"{name} is {value!r} ({number.text()} is needed)")
    if bad:
        raise SettingsInvalid(f"{env.name}'s inventory ({env.path}) sets what opsbook cannot use: {'; '.join(bad)}. "
                              f"Nothing was changed. Fix the inventory (`group_vars/`), then run the task again.")
