"""Names opsbook gives what it makes and later prunes by age sort in the order they were made,
also when two are made in the same second (the random part after the time must never decide)."""

from datetime import UTC, datetime, timedelta

from opsbook.core import facts
from opsbook.engines.clones.aurora import clone_id
from opsbook.engines.snapshots.aws import snapshot_id


def test_names_made_within_one_second_sort_in_the_order_they_were_made():
    start = datetime(2026, 1, 30, 10, 15, 0, 999_000, tzinfo=UTC)
    times = [start + timedelta(milliseconds=ms) for ms in (0, 1, 7, 250, 998, 999)]  # crosses into 10:15:01
    for make in (clone_id, snapshot_id):
        for _ in range(20):                                     # the random suffixes come out differently each time
            names = [make("staging", t) for t in times]
            assert sorted(names) == names, names
    keys = [facts.time_key(t) for t in times]
    assert sorted(keys) == keys
    assert len(set(keys)) == len(keys)
    assert facts.time_key(datetime(2026, 1, 30, 10, 15, 0, 123_456, tzinfo=UTC)) == "20260130-101500123"
