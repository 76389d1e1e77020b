"""The release lock's S3 and DynamoDB stores against a real moto server: conditional writes decide
which of several racing releases wins, an expired lease is taken over by exactly one, break works."""

from __future__ import annotations

import threading
import time
import uuid

import boto3
import pytest

from opsbook.engines.lock import DynamoDBLockStore, LockHeld, ReleaseLock, S3LockStore

pytestmark = pytest.mark.moto

RACERS = 6


@pytest.fixture
def dynamodb_table(aws):
    name = f"opsbook-locks-{uuid.uuid4().hex[:8]}"
    DynamoDBLockStore(name, "unused", region="us-east-1", endpoint_url=aws).create_table()
    return name


@pytest.fixture(params=["s3", "dynamodb"])
def new_store(request, aws):
    """A factory of stores that all point at one fresh lock (each with its own client)."""
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        key = f"locks/release-{uuid.uuid4().hex[:8]}.json"

        def make():
            return S3LockStore(bucket, key, region="us-east-1", endpoint_url=aws,
                               client=boto3.client("s3", region_name="us-east-1", endpoint_url=aws))
    else:
        table = request.getfixturevalue("dynamodb_table")
        lock_id = f"release-{uuid.uuid4().hex[:8]}"

        def make():
            return DynamoDBLockStore(table, lock_id, endpoint_url=aws, client=boto3.client(
                "dynamodb", region_name="us-east-1", endpoint_url=aws))
    return make


def race(locks: list[ReleaseLock]) -> tuple[list, list]:
    """Start every acquirer at the same instant; (winners' HeldLocks, refusals)."""
    barrier = threading.Barrier(len(locks))
    won, refused, errors = [], [], []
    guard = threading.Lock()

    def attempt(i: int, lock: ReleaseLock) -> None:
        barrier.wait()
        try:
            held = lock.acquire(f"release racer {i}")
        except LockHeld as e:
            with guard:
                refused.append(e)
        except Exception as e:  # noqa: BLE001 - reported below, fails the test
            with guard:
                errors.append(e)
        else:
            with guard:
                won.append(held)

    threads = [threading.Thread(target=attempt, args=(i, lock)) for i, lock in enumerate(locks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return won, refused


def test_racing_releases_on_a_free_lock_exactly_one_wins(new_store):
    locks = [ReleaseLock("prod", new_store(), lease_seconds=30) for _ in range(RACERS)]
    won, refused = race(locks)
    try:
        assert len(won) == 1, [w.info for w in won]
        assert len(refused) == RACERS - 1
        winner = won[0].info
        assert all(r.holder.token == winner.token for r in refused)
        assert all(winner.reason in str(r) for r in refused)
        assert locks[0].holder().token == winner.token
    finally:
        for w in won:
            w.release()
    assert locks[0].holder() is None


def test_racing_releases_on_an_expired_lease_exactly_one_takes_it_over(new_store):
    dead = ReleaseLock("prod", new_store(), lease_seconds=0.5).acquire("release that died")
    dead._stop.set()                                  # stops renewing, as a killed process would
    time.sleep(1.0)
    assert dead.info.expired()
    locks = [ReleaseLock("prod", new_store(), lease_seconds=30) for _ in range(RACERS)]
    won, refused = race(locks)
    try:
        assert len(won) == 1, [w.info for w in won]
        assert len(refused) == RACERS - 1
        assert won[0].previous_expired.token == dead.info.token
        assert "previous lease expired" in won[0].message
    finally:
        for w in won:
            w.release()


def test_held_lock_is_renewed_refuses_others_and_break_returns_the_holder(new_store):
    lock = ReleaseLock("prod", new_store(), lease_seconds=0.9)
    with lock.hold("release 3.1.0") as held:
        time.sleep(2.0)                               # more than two leases: renewed meanwhile
        with pytest.raises(LockHeld, match=r"release 3\.1\.0"):
            ReleaseLock("prod", new_store()).acquire("release 3.1.1")
        broken = ReleaseLock("prod", new_store()).break_("stuck release", by="oncall@example")
        assert broken.token == held.info.token
        assert lock.holder() is None
        with ReleaseLock("prod", new_store()).hold("release 3.1.1") as other:
            time.sleep(0.6)
            assert held.lost
            held.release()                            # the broken release leaves the new lock alone
            assert lock.holder().token == other.info.token
    assert lock.holder() is None


def test_the_store_refuses_a_second_create_and_any_write_with_a_stale_version(new_store):
    lock = ReleaseLock("prod", new_store(), lease_seconds=30)
    first, second = lock._new_info("first"), lock._new_info("second")
    store = new_store()
    assert store.create(first)
    assert not new_store().create(second)             # IfNoneMatch="*" / attribute_not_exists
    info, version = store.read()
    assert info.token == first.token
    assert store.replace(second, version)             # the version read is current: accepted
    assert not new_store().replace(first, version)    # that version is now stale: refused
    assert not new_store().delete(version)
    assert store.read()[0].token == second.token
    assert store.delete(store.read()[1])
    assert store.read() == (None, None)
