"""How a release splits the fleet into batches (`--batch` or the inventory's batch size)."""

import pytest

from opsbook.core.errors import OpsbookError
from opsbook.operations.release import batches_of


def test_bad_batch_sizes_are_refused_and_good_ones_split_the_fleet():
    hosts = [f"app{i}" for i in range(1, 8)]
    assert batches_of(hosts, "3") == [hosts[0:3], hosts[3:6], hosts[6:]]
    assert batches_of(hosts, "50%") == [hosts[0:3], hosts[3:6], hosts[6:]]
    assert batches_of(hosts, "1%") == [[h] for h in hosts]       # never a batch of no hosts
    assert batches_of(hosts, "100%") == [hosts]
    for bad in ("0", "-1", "abc", "0%", "150%", "", "2.5"):
        with pytest.raises(OpsbookError, match="neither a positive number of hosts nor a percentage"):
            batches_of(hosts, bad)
