"""Ages as operators write them, in inventories and on the command line: ``30m``, ``12h``, ``7d``,
``2w`` (and plain seconds where a setting takes them). One parser for every such setting
(retention and max ages of snapshots, the rehearsal and scaling-check gates, `--since`): each caller
words its own refusal, naming the setting or flag. (A library would parse more forms than we want
operators to write, and these are the only ones the docs promise.)"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

_AGE = re.compile(r"^\s*([0-9]+)\s*([smhdw]?)\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
LONGEST = timedelta(days=100 * 366)   # longer than any record store, snapshot or gate lives: a typo
FORMS = "30m, 12h, 7d or 2w"


def parse(value: Any, *, seconds: bool = False, units: str = "mhdw") -> timedelta | None:
    """The age `value` writes, or None when it is not one: not of the forms above in `units` (a bare
    number only when `seconds`), or longer than LONGEST (`99999999w` would overflow a date, and means
    nothing)."""
    m = _AGE.match(str(value))
    if not m or (m.group(2) in ("", "s") and not seconds) or (m.group(2) not in ("", "s") and m.group(2) not in units):
        return None
    n = int(m.group(1))
    unit = _UNITS[m.group(2) or "s"]
    if n > LONGEST / timedelta(**{unit: 1}):
        return None
    return timedelta(**{unit: n})
