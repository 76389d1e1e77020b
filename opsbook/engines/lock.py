"""The release lock: one release at a time per environment.

A lock has an owner (user@host and pid), a reason, when it was acquired, and a lease. The
release holding it renews the lease from a background thread (every third of the lease);
a release that dies (even SIGKILL) stops renewing, so its lease runs out and the next
release proceeds, saying whose lease expired. Until then others are refused, told who holds
it, why, since when and until when.

Where the lock lives is the inventory's choice (``opsbook_lock_backend``):

- ``file``: a JSON file (``opsbook_lock_path``, default ``<opsbook_lab_dir>/release.lock``).
  Every read-compare-write happens under a short ``flock`` on a sidecar ``.guard`` file and
  writes are atomic replaces; the lease is in the content, so a killed holder is noticed
  by its lease expiring, not by the kernel dropping a lock.
- ``s3``: an object (``opsbook_lock_bucket``, ``opsbook_lock_key``). Created with
  ``IfNoneMatch="*"``; renewed, taken over or deleted with ``IfMatch=<etag>``, so of two
  releases racing for a free or expired lock exactly one write succeeds.
- ``dynamodb``: an item keyed by environment in ``opsbook_lock_table`` (hash key
  ``lock_id``). Same compare-and-swap through condition expressions on a per-write
  ``version`` attribute (``attribute_not_exists(lock_id)`` to create).

The AWS backends read ``opsbook_aws_region``, ``opsbook_aws_profile`` (the credentials the
account guard checked) and ``opsbook_aws_endpoint_url`` (default None; a moto server in tests).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from opsbook.core import facts
from opsbook.core.errors import OpsbookError
from opsbook.core.inventory import Env

DEFAULT_LEASE_SECONDS = 60.0


class LockHeld(OpsbookError):
    """Another release holds the lock (and its lease has not expired)."""

    def __init__(self, message: str, holder: LockInfo):
        super().__init__(message)
        self.holder = holder


class LeaseLost(OpsbookError):
    """The lock this release held was broken or taken over (its lease was not renewed in time)."""


class LockBackendError(OpsbookError):
    pass


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class LockInfo:
    """Who holds the lock, why, since when and until when (epoch seconds, UTC)."""

    env: str
    owner: str          # user@host
    pid: int
    reason: str
    acquired_at: float
    lease_expires: float
    lease_seconds: float
    token: str          # unique per acquisition: tells this holder from a later one

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.lease_expires

    def gone_from_here(self) -> bool:
        """The holder was a process of this machine (same user@host) that no longer runs."""
        return self.owner == facts.operator() and not _pid_alive(self.pid)

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        left = self.lease_expires - now
        lease = (f"lease expires {_iso(self.lease_expires)} (in {left:.0f} s)" if left > 0
                 else f"lease expired {_iso(self.lease_expires)} ({-left:.0f} s ago)")
        return (f"{self.owner} (pid {self.pid}) since {_iso(self.acquired_at)} "
                f"for {self.reason!r}; {lease}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["acquired_at_iso"] = _iso(self.acquired_at)
        d["lease_expires_iso"] = _iso(self.lease_expires)
        return d

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> LockInfo:
        raw = json.loads(data)
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__})


# --- storage: read, and conditional create / replace / delete ------------------------------
class LockStore(Protocol):
    """Where one lock lives. ``version`` is an opaque token of the stored state (an ETag, a
    content hash, a version attribute); conditional writes succeed only if it still matches."""

    where: str

    def read(self) -> tuple[LockInfo | None, Any]: ...
    def create(self, info: LockInfo) -> bool: ...
    def replace(self, info: LockInfo, version: Any) -> bool: ...
    def delete(self, version: Any) -> bool: ...


class FileLockStore:
    """A JSON lock file; each operation runs under a short flock on ``<path>.guard``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.guard_path = self.path.with_name(self.path.name + ".guard")
        self.where = f"file {self.path}"

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.guard_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)   # closing drops the flock

    def _read_raw(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def _write(self, info: LockInfo) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, info.to_json())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    @staticmethod
    def _version(raw: bytes | None) -> str | None:
        return None if raw is None else hashlib.sha256(raw).hexdigest()

    def read(self) -> tuple[LockInfo | None, Any]:
        raw = self._read_raw()
        if raw is None:
            return None, None
        try:
            return LockInfo.from_json(raw), self._version(raw)
        except (ValueError, KeyError, TypeError) as e:
            raise LockBackendError(
                f"the lock file {self.path} is not a lock this opsbook wrote ({e}); nothing was "
                f"changed. Look at it, then remove it or `invoke lock.break` if no release runs."
            ) from e

    def create(self, info: LockInfo) -> bool:
        with self._guarded():
            if self._read_raw() is not None:
                return False
            self._write(info)
            return True

    def replace(self, info: LockInfo, version: Any) -> bool:
        with self._guarded():
            if self._version(self._read_raw()) != version:
                return False
            self._write(info)
            return True

    def delete(self, version: Any) -> bool:
        with self._guarded():
            if self._version(self._read_raw()) != version:
                return False
            self.path.unlink()
            return True


def _aws_client(service: str, region: str | None, endpoint_url: str | None, profile: str | None = None):
    from opsbook.engines.aws import boto_session

    # The environment's credentials profile (opsbook_aws_profile), the one its account was checked with.
    return boto_session(profile or None).client(service, region_name=region, endpoint_url=endpoint_url)


def _error_code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


class S3LockStore:
    """A lock object in S3, written only with IfNoneMatch="*" (create) or IfMatch=<etag>."""

    def __init__(self, bucket: str, key: str, *, region: str | None = None,
                 endpoint_url: str | None = None, client=None, profile: str | None = None):
        self.bucket, self.key = bucket, key
        self.client = client or _aws_client("s3", region, endpoint_url, profile)
        self.where = f"s3://{bucket}/{key}"

    def read(self) -> tuple[LockInfo | None, Any]:
        from botocore.exceptions import ClientError

        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if _error_code(e) in {"NoSuchKey", "404"}:
                return None, None
            raise
        return LockInfo.from_json(obj["Body"].read()), obj["ETag"]

    def _conditional(self, call: Callable[[], Any]) -> bool:
        from botocore.exceptions import ClientError

        try:
            call()
        except ClientError as e:
            # 412: the condition did not hold; 409: a concurrent conditional write won; 404:
            # IfMatch on an object that is gone.
            if _error_code(e) in {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey",
                                  "412", "409", "404"}:
                return False
            raise
        return True

    def create(self, info: LockInfo) -> bool:
        return self._conditional(lambda: self.client.put_object(
            Bucket=self.bucket, Key=self.key, Body=info.to_json(), IfNoneMatch="*",
            ContentType="application/json"))

    def replace(self, info: LockInfo, version: Any) -> bool:
        return self._conditional(lambda: self.client.put_object(
            Bucket=self.bucket, Key=self.key, Body=info.to_json(), IfMatch=version,
            ContentType="application/json"))

    def delete(self, version: Any) -> bool:
        return self._conditional(lambda: self.client.delete_object(
            Bucket=self.bucket, Key=self.key, IfMatch=version))


class DynamoDBLockStore:
    """A lock item ``{lock_id: <env>, version, lock: <json>}`` written with condition expressions."""

    def __init__(self, table: str, lock_id: str, *, region: str | None = None,
                 endpoint_url: str | None = None, client=None, profile: str | None = None):
        self.table, self.lock_id = table, lock_id
        self.client = client or _aws_client("dynamodb", region, endpoint_url, profile)
        self.where = f"dynamodb table {table}, item {lock_id}"

    def create_table(self) -> None:
        """Create the lock table (on-demand billing; hash key ``lock_id``). For provisioning and tests."""
        self.client.create_table(
            TableName=self.table, BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[{"AttributeName": "lock_id", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "lock_id", "KeyType": "HASH"}],
        )
        self.client.get_waiter("table_exists").wait(TableName=self.table)

    def read(self) -> tuple[LockInfo | None, Any]:
        item = self.client.get_item(TableName=self.table, Key={"lock_id": {"S": self.lock_id}},
                                    ConsistentRead=True).get("Item")
        if not item:
            return None, None
        return LockInfo.from_json(item["lock"]["S"]), item["version"]["S"]

    def _item(self, info: LockInfo) -> dict[str, Any]:
        return {"lock_id": {"S": self.lock_id}, "version": {"S": uuid.uuid4().hex},
                "lock": {"S": info.to_json().decode()},
                "lease_expires": {"N": repr(info.lease_expires)}}

    def _conditional(self, call: Callable[[], Any]) -> bool:
        from botocore.exceptions import ClientError

        try:
            call()
        except ClientError as e:
            if _error_code(e) == "ConditionalCheckFailedException":
                return False
            raise
        return True

    def create(self, info: LockInfo) -> bool:
        return self._conditional(lambda: self.client.put_item(
            TableName=self.table, Item=self._item(info),
            ConditionExpression="attribute_not_exists(lock_id)"))

    def replace(self, info: LockInfo, version: Any) -> bool:
        return self._conditional(lambda: self.client.put_item(
            TableName=self.table, Item=self._item(info),
            ConditionExpression="version = :v", ExpressionAttributeValues={":v": {"S": version}}))

    def delete(self, version: Any) -> bool:
        return self._conditional(lambda: self.client.delete_item(
            TableName=self.table, Key={"lock_id": {"S": self.lock_id}},
            ConditionExpression="version = :v", ExpressionAttributeValues={":v": {"S": version}}))


# --- the lock ------------------------------------------------------------------------------
class HeldLock:
    """The lock while this release holds it: what it holds, what it took over, whether it lost it."""

    def __init__(self, lock: ReleaseLock, info: LockInfo, previous: LockInfo | None, waited: float):
        self.lock = lock
        self.info = info
        self.previous_expired = previous     # a dead holder's expired lease this release took over
        self.waited = waited                 # seconds spent waiting for the lock
        self.lost: str | None = None         # why the lease was lost, if it was
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def message(self) -> str:
        parts = [f"release lock for {self.lock.env} acquired ({self.lock.store.where}) by "
                 f"{self.info.owner} (pid {self.info.pid}) for {self.info.reason!r}"]
        if self.waited >= 0.5:
            parts.append(f"after waiting {self.waited:.0f} s")
        if self.previous_expired is not None:
            p = self.previous_expired
            parts.append(f"the previous lease expired: {p.owner} (pid {p.pid}) held it since "
                         f"{_iso(p.acquired_at)} for {p.reason!r} and stopped renewing; its lease ran out "
                         f"{_iso(p.lease_expires)}")
        return "; ".join(parts)

    def renew(self) -> None:
        """Extend the lease by a full lease from now; raises LeaseLost if someone else holds it now."""
        with self._mutex:
            if self.lost:
                raise LeaseLost(self.lost)
            current, version = self.lock.store.read()
            if current is None or current.token != self.info.token:
                by = "nobody (it was broken)" if current is None else current.describe()
                self.lost = (f"the release lock for {self.lock.env} was broken or taken over while this "
                             f"release ran; it is now held by {by}. Stop here: another operator "
                             f"may be acting on {self.lock.env}.")
                raise LeaseLost(self.lost)
            now = time.time()
            new = replace(self.info, lease_expires=now + self.info.lease_seconds)
            if not self.lock.store.replace(new, version):
                self.lost = (f"the release lock for {self.lock.env} changed while its lease was being "
                             f"renewed; this release no longer holds it.")
                raise LeaseLost(self.lost)
            self.info = new

    def check(self) -> None:
        """Raise LeaseLost if the lease was lost (call between release steps)."""
        if self.lost:
            raise LeaseLost(self.lost)

    def _heartbeat(self) -> None:
        interval = self.info.lease_seconds / 3
        while not self._stop.wait(interval):
            try:
                self.renew()
            except LeaseLost:
                return
            except Exception:  # noqa: BLE001 - a failed renewal is retried; the lease covers two misses
                if time.time() >= self.info.lease_expires:
                    self.lost = (f"the release lock for {self.lock.env} could not be renewed before "
                                 f"its lease ran out ({_iso(self.info.lease_expires)}); another release "
                                 f"may have taken it.")
                    return

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, name=f"lock-heartbeat-{self.lock.env}",
                                        daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.info.lease_seconds)
        with self._mutex:
            current, version = self.lock.store.read()
            if current is not None and current.token == self.info.token:
                self.lock.store.delete(version)


class ReleaseLock:
    """The release lock of one environment, in one store."""

    def __init__(self, env: str, store: LockStore, *, lease_seconds: float = DEFAULT_LEASE_SECONDS,
                 poll_seconds: float = 1.0):
        self.env = env
        self.store = store
        self.lease_seconds = float(lease_seconds)
        self.poll_seconds = poll_seconds

    def __repr__(self) -> str:
        return f"ReleaseLock({self.env!r}, {self.store.where})"

    def holder(self) -> LockInfo | None:
        """Who holds the lock now (an expired lease is still shown, with its expiry); read-only."""
        return self.store.read()[0]

    def _new_info(self, reason: str) -> LockInfo:
        now = time.time()
        return LockInfo(env=self.env, owner=facts.operator(), pid=os.getpid(), reason=reason, acquired_at=now,
                        lease_expires=now + self.lease_seconds, lease_seconds=self.lease_seconds,
                        token=uuid.uuid4().hex)

    def _try_acquire(self, reason: str) -> tuple[LockInfo, LockInfo | None] | LockInfo:
        """One attempt: (info, expired previous holder) if acquired, else the live holder.

        A conditional write that loses means the lock changed between our read and our write
        (released, renewed or taken by a racing release): read again, a few times at most.
        """
        for _attempt in range(10):
            current, version = self.store.read()
            if current is not None and not current.expired():
                return current
            info = self._new_info(reason)
            won = self.store.create(info) if current is None else self.store.replace(info, version)
            if not won:
                continue
            # The store's conditional write is the arbiter; reading back confirms it.
            mine = self.store.read()[0]
            if mine is not None and mine.token == info.token:
                return info, current
        raise LockBackendError(
            f"the release lock for {self.env} ({self.store.where}) kept changing under ten attempts "
            f"to take it; nothing was changed. Look at `invoke lock --env {self.env}` and retry.")

    def acquire(self, reason: str, wait: float = 0, on_wait: Callable[[str], None] | None = None) -> HeldLock:
        """Take the lock (waiting up to ``wait`` seconds) and start renewing it; see ``hold``.
        While it waits, ``on_wait`` is told who holds it, at first and every 15 s."""
        if not reason or not reason.strip():
            raise OpsbookError("a release lock needs a reason (what this release is for); "
                               "nothing was changed.")
        started = time.monotonic()
        told = -math.inf
        while True:
            got = self._try_acquire(reason)
            if isinstance(got, tuple):
                info, previous = got
                held = HeldLock(self, info, previous, waited=time.monotonic() - started)
                held._start()
                return held
            waited = time.monotonic() - started
            if waited >= wait:
                raise LockHeld(self._refusal(got, wait), got)
            if on_wait is not None and waited - told >= 15:
                told = waited
                on_wait(f"waiting for the release lock for {self.env} ({waited:.0f} of {wait:.0f} s): held by "
                        f"{got.describe()}")
            time.sleep(min(self.poll_seconds, max(0.05, wait - waited)))

    def _refusal(self, holder: LockInfo, wait: float) -> str:
        waited = f" (waited {wait:.0f} s)" if wait > 0 else ""
        note = ""
        if holder.gone_from_here():
            note = (f" Its process {holder.pid} no longer runs on this machine; the lease will expire "
                    f"{_iso(holder.lease_expires)} and the next release will proceed then.")
        return (f"the release lock for {self.env} is held by {holder.describe()}{waited}. Nothing was "
                f"changed.{note} Wait for that release (retry, or pass a wait), check `invoke lock "
                f"--env {self.env}`, or if that release is dead and you cannot wait for its lease, "
                f"`invoke lock.break --env {self.env} --reason ...`.")

    @contextlib.contextmanager
    def hold(self, reason: str, wait: float = 0, on_wait: Callable[[str], None] | None = None
             ) -> Iterator[HeldLock]:
        """``with lock.hold("release 1.4.0") as held:`` acquire, renew in the background, release on exit.

        Raises LockHeld (naming holder, reason and since when) if another live lease holds it
        after ``wait`` seconds. ``held.message`` says whether a dead holder's lease expired.
        """
        held = self.acquire(reason, wait=wait, on_wait=on_wait)
        try:
            yield held
        finally:
            held.release()

    def break_(self, reason: str, by: str | None = None) -> LockInfo | None:
        """Remove the lock whoever holds it; returns the broken holder (None if it was free).

        ``reason`` and ``by`` (default: this user@host) are the caller's to record with the
        returned holder; the store keeps no trace of a break. A release whose lock was broken
        finds out at its next renewal (``held.check()`` raises LeaseLost).
        """
        by = by or facts.operator()
        if not reason or not reason.strip():
            raise OpsbookError("breaking the release lock needs a reason; nothing was changed.")
        while True:
            current, version = self.store.read()
            if current is None:
                return None
            if self.store.delete(version):
                return current


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_for(env: Env, *, lease_seconds: float | None = None) -> ReleaseLock:
    """The release lock of an environment, backend from its inventory."""
    e = env
    backend = e.var("opsbook_lock_backend", "file")
    lease = float(lease_seconds if lease_seconds is not None
                  else e.var("opsbook_lock_lease_seconds", DEFAULT_LEASE_SECONDS))
    store: LockStore
    if backend == "file":
        path = e.var("opsbook_lock_path", None)
        if not path:
            lab_dir = e.var("opsbook_lab_dir", None)
            if not lab_dir:
                raise OpsbookError(
                    f"environment {e.name!r} uses the file lock backend but defines neither "
                    f"opsbook_lock_path nor opsbook_lab_dir; add one to {e.path}/group_vars/all/. "
                    f"Nothing was changed.")
            path = Path(lab_dir) / f"release-{e.name}.lock"
        store = FileLockStore(Path(path).resolve())
    elif backend in {"s3", "dynamodb"}:
        region = e.var("opsbook_aws_region", None)
        endpoint = e.var("opsbook_aws_endpoint_url", None) or None
        profile = e.var("opsbook_aws_profile", None) or None
        if backend == "s3":
            store = S3LockStore(e.var("opsbook_lock_bucket"),
                                e.var("opsbook_lock_key", f"opsbook/locks/release-{e.name}.json"),
                                region=region, endpoint_url=endpoint, profile=profile)
        else:
            store = DynamoDBLockStore(e.var("opsbook_lock_table"), f"release-{e.name}",
                                      region=region, endpoint_url=endpoint, profile=profile)
    else:
        raise OpsbookError(
            f"opsbook_lock_backend for {e.name!r} is {backend!r}; it must be file, s3 or dynamodb. "
            f"Fix {e.path}/group_vars/all/. Nothing was changed.")
    return ReleaseLock(e.name, store, lease_seconds=lease)


def status_text(lock: ReleaseLock) -> str:
    """What `invoke lock` prints: the holder, or that the lock is free, and where it lives."""
    holder = lock.holder()
    if holder is None:
        return f"release lock for {lock.env}: free ({lock.store.where})"
    state = "held (lease expired: the next release will take it over)" if holder.expired() else "held"
    note = ""
    if holder.gone_from_here():
        note = (f"; its process {holder.pid} no longer runs on this machine (killed?): the next release waits "
                f"for the lease (`--wait`), or `invoke lock.break --env {lock.env} --reason ...`")
    return f"release lock for {lock.env}: {state} by {holder.describe()} ({lock.store.where}){note}"
