"""One parser for the ages operators write (core/ages.py), and the refusals of each setting that takes one:
a typo's age (too long for a date) is refused with the setting's name, never a traceback."""

from datetime import timedelta

import pytest

from opsbook.core import ages
from opsbook.core.errors import OpsbookError
from opsbook.engines import rehearsal, scale_gate
from opsbook.engines.snapshots import base


def test_the_forms_operators_write():
    assert ages.parse("30m") == timedelta(minutes=30)
    assert ages.parse(" 12h ") == timedelta(hours=12)
    assert ages.parse("7 d") == timedelta(days=7)
    assert ages.parse("2w") == timedelta(weeks=2)
    assert ages.parse("0m") == timedelta(0)
    assert ages.parse("5200w") == timedelta(weeks=5200)          # 99.7 years: long, but a date
    for bad in ("", "7", "7s", "-1d", "1.5h", "7 days", "d", "7d7h", None, "99999999w", "5300w", "36700d"):
        assert ages.parse(bad) is None, bad
    assert ages.parse("90", seconds=True) == timedelta(seconds=90)
    assert ages.parse("90s", seconds=True) == timedelta(seconds=90)
    assert ages.parse(3600, seconds=True) == timedelta(hours=1)
    assert ages.parse("999999999999999999999", seconds=True) is None
    assert ages.parse("8h", units="mhd") == timedelta(hours=8)
    assert ages.parse("2w", units="mhd") is None


def test_each_setting_refuses_a_typo_by_its_name():
    with pytest.raises(OpsbookError, match=r"opsbook_rehearsal_max_age: '99999999w' is not an age"):
        rehearsal.parse_max_age("99999999w")
    assert rehearsal.parse_max_age(None) == timedelta(days=7)
    with pytest.raises(OpsbookError, match=r"opsbook_scale_check_max_age '99999999w': expected an age"):
        scale_gate.parse_age("99999999w")
    assert scale_gate.parse_age(600) == timedelta(minutes=10)
    with pytest.raises(base.SnapshotError, match=r"opsbook_snapshot_max_age: '99999999w' is not an age"):
        base.parse_age("99999999w", "opsbook_snapshot_max_age")
    assert base.parse_age("", "opsbook_snapshot_max_age") is None
    assert base.parse_age("off", "opsbook_snapshot_max_age") is None
    assert base.parse_age("2w", "opsbook_snapshot_max_age") == timedelta(weeks=2)
