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


# --- bad input is refused before anything is built, read or touched ----------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"batch": "0"}, "neither a positive number"),
    ({"batch": "-1"}, "neither a positive number"),
    ({"wait": -5}, "--wait -5"),
    ({"version": "1.0;rm -rf /"}, "is not a release version"),
    ({"version": "../../etc/passwd"}, "is not a release version"),
])
def test_bad_release_input_is_refused_before_a_build(monkeypatch, kwargs, message):
    from opsbook.core.errors import OpsbookError
    from opsbook.core.inventory import load
    from opsbook.engines import artifact
    from opsbook.operations import release as rel

    def no_build(*_a, **_k):
        raise AssertionError("built an artifact for input that is refused")

    monkeypatch.setattr(artifact, "build", no_build)
    with pytest.raises(OpsbookError) as e:
        rel.release(load("lab"), **kwargs)
    assert message in str(e.value)
    assert "invoke build --version" not in str(e.value)   # never a command line made of hostile input
    if "version" not in kwargs:
        assert "Nothing was changed" in str(e.value)


def test_bad_rollback_input_is_refused_before_the_fleet_is_read(monkeypatch):
    from opsbook.core.errors import OpsbookError
    from opsbook.core.inventory import load
    from opsbook.engines import fleet
    from opsbook.operations import release as rel

    monkeypatch.setattr(fleet, "served_versions", lambda *_a, **_k: pytest.fail("read the fleet"))
    for kwargs in ({"batch": "abc"}, {"wait": -1}):
        with pytest.raises(OpsbookError, match="Nothing was changed"):
            rel.rollback(load("lab"), **kwargs)


# --- what putting hosts back left is read back, not assumed -------------------------------------
@pytest.mark.parametrize(("seen", "said"), [
    ({"app1": {"lb1": "UP"}, "app2": {"lb1": "DOWN"}}, None),                 # a host that does not answer stays out
    ({"app1": {"lb1": "unknown"}, "app2": {"lb1": "unknown"}}, "load balancer lb1 did not answer"),
    ({"app1": {"lb1": "UP"}, "app2": {"lb1": "MAINT"}}, "still out of rotation (MAINT): app2"),
])
def test_the_put_back_says_what_the_load_balancers_show(monkeypatch, seen, said):
    from opsbook.core.inventory import load
    from opsbook.engines import fleet
    from opsbook.operations.release import steps

    monkeypatch.setattr(fleet, "rotation", lambda _env: seen)
    text = steps._rotation_after_put_back(load("lab"))
    if said is None:
        assert text == steps.PUT_BACK
    else:
        assert said in text
        assert "every app host that answers" not in text
