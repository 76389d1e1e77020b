"""Record stores: where executed runbooks, their HTML and the ledger live.

The environment chooses its store with ``opsbook_record_store``: a directory (the lab:
``records/lab``) or ``s3://bucket/prefix`` (AWS environments). Both hold the same keys::

    records/<record id>/notebook.ipynb   the executed notebook (secrets replaced)
    records/<record id>/record.html      its HTML rendering (nbconvert)
    ledger/<record id>.json              the ledger entry, one write-once object per run
    index.html                           a rendered listing (`invoke records.index`), not a record

Records are written once and never edited: a local store links a finished temporary file into
place (``os.link`` fails if the name exists) and makes it read-only; an S3 store puts with
``IfNoneMatch="*"``, which S3 (and moto) refuse for an existing key. The ledger entry is
written last, so a ledger entry always points at a complete record.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from abc import ABC, abstractmethod
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opsbook.core.errors import OpsbookError

RECORD_ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[A-Za-z0-9_-]+-[0-9a-f]{6}$")
LEDGER = "ledger"
RECORDS = "records"
OUTCOMES = ("succeeded", "failed", "interrupted", "refused")


class StoreUnreachable(OpsbookError):
    pass


class RecordExists(OpsbookError):
    pass


class UnknownRecord(OpsbookError):
    pass


def new_record_id(runbook: str, now: datetime | None = None) -> str:
    """Sortable by time, unique enough for humans to quote: 20250101T120000Z-migrate-3fa9c1."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{runbook}-{secrets.token_hex(3)}"


def check_record_id(record_id: str) -> str:
    if not RECORD_ID_RE.match(record_id or ""):
        raise UnknownRecord(
            f"{record_id!r} is not a record id (they look like 20250101T120000Z-migrate-3fa9c1); "
            "`invoke records` lists them."
        )
    return record_id


class Store(ABC):
    """A write-once key/value place for records, plus the ledger read back from it."""

    url: str

    # -- primitives each store implements ------------------------------------------------
    @abstractmethod
    def check(self) -> None:
        """Raise StoreUnreachable unless records can be written here. Writes nothing lasting."""

    @abstractmethod
    def put_once(self, key: str, data: bytes, content_type: str) -> None:
        """Write a new object; raise RecordExists if the key already exists."""

    @abstractmethod
    def put_replaceable(self, key: str, data: bytes, content_type: str) -> None:
        """Write or replace an object that is not a record (the rendered index)."""

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def keys(self, prefix: str) -> list[str]: ...

    @abstractmethod
    def location(self, key: str) -> str:
        """Where an operator finds this key (a path or an s3:// URL)."""

    # -- records -------------------------------------------------------------------------
    def write_record(self, entry: dict[str, Any], notebook: bytes, html: bytes, *,
                     resume: bool = False) -> dict[str, Any]:
        """Store one run: notebook, HTML, then its ledger entry (last, so it only points at what exists).
        `resume`: finishing a record that an earlier attempt stored in part (the spool uploads so)."""
        record_id = check_record_id(entry["id"])
        entry = dict(entry)
        entry["notebook"] = f"{RECORDS}/{record_id}/notebook.ipynb"
        entry["html"] = f"{RECORDS}/{record_id}/record.html"
        for key, data, kind in ((entry["notebook"], notebook, "application/x-ipynb+json"),
                                (entry["html"], html, "text/html; charset=utf-8")):
            try:
                self.put_once(key, data, kind)
            except RecordExists:
                if not resume:
                    raise
        blob = json.dumps(entry, indent=1, sort_keys=True).encode() + b"\n"
        self.put_once(f"{LEDGER}/{record_id}.json", blob, "application/json")
        return entry

    def ledger(self) -> list[dict[str, Any]]:
        """Every ledger entry, oldest first."""
        out = []
        for key in sorted(self.keys(f"{LEDGER}/")):
            if key.endswith(".json"):
                out.append(json.loads(self.get(key)))
        out.sort(key=lambda e: (e.get("start", ""), e.get("id", "")))
        return out

    def entry(self, record_id: str) -> dict[str, Any]:
        check_record_id(record_id)
        try:
            return json.loads(self.get(f"{LEDGER}/{record_id}.json"))
        except KeyError:
            raise UnknownRecord(
                f"no record {record_id} in {self.url}; `invoke records --env ENV` lists the records there."
            ) from None


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.url = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({self.url!r})"

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise OpsbookError(f"refusing a record key outside the store: {key!r}")
        return path

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreUnreachable(
                f"record store {self.url} cannot be created ({e.strerror}). Nothing was run. "
                "Fix the path or its permissions (opsbook_record_store in the environment's group_vars)."
            ) from None
        if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreUnreachable(
                f"record store {self.url} is not a writable directory. Nothing was run. "
                "Fix the path or its permissions (opsbook_record_store in the environment's group_vars)."
            )

    def put_once(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        tmp.write_bytes(data)
        tmp.chmod(0o440)   # read-only, and not world-readable: records describe production
        try:
            # link() fails if the name exists: the write-once check and the publish in one step,
            # and readers never see a half-written file.
            os.link(tmp, path)
        except FileExistsError:
            raise RecordExists(f"{path} already exists; records are never rewritten.") from None
        finally:
            tmp.unlink()

    def put_replaceable(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def keys(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not base.is_dir():
            return []
        files = (p for p in base.rglob("*") if p.is_file() and not p.name.startswith("."))
        return sorted(str(p.relative_to(self.root)) for p in files)

    def location(self, key: str) -> str:
        return str(self._path(key))


class S3Store(Store):
    def __init__(self, url: str, *, endpoint_url: str | None = None, region: str | None = None,
                 profile: str | None = None):
        if not url.startswith("s3://"):
            raise OpsbookError(f"not an S3 URL: {url!r} (expected s3://bucket/prefix)")
        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not bucket:
            raise OpsbookError(f"no bucket in {url!r} (expected s3://bucket/prefix)")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        from botocore.config import Config

        from opsbook.engines.aws import boto_session

        # Short timeouts and few retries: an unreachable store should say so in seconds, before
        # anything runs, not after botocore's default backoff.
        config = Config(connect_timeout=5, read_timeout=20, retries={"max_attempts": 2, "mode": "standard"})
        # The environment's credentials profile (opsbook_aws_profile), the one its account was checked with.
        session = boto_session(profile or None)
        self._s3 = session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)

    def __repr__(self) -> str:
        return f"S3Store({self.url!r})"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            what = "does not exist" if code in ("404", "NoSuchBucket") else f"cannot be reached ({code})"
            raise StoreUnreachable(
                f"record store {self.url}: bucket {self.bucket!r} {what}. Nothing was run. "
                "Create the bucket (the environment's provisioning does) or fix opsbook_record_store."
            ) from None
        except BotoCoreError as e:
            raise StoreUnreachable(
                f"record store {self.url} cannot be reached: {e}. Nothing was run. "
                "Check credentials, network and the endpoint, then run again."
            ) from None

    def put_once(self, key: str, data: bytes, content_type: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self._s3.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type, IfNoneMatch="*"
            )
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                where = self.location(key)
                raise RecordExists(f"{where} already exists; records are never rewritten.") from None
            raise

    def put_replaceable(self, key: str, data: bytes, content_type: str) -> None:
        self._s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type)

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self._s3.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise KeyError(key) from None
            raise

    def keys(self, prefix: str) -> list[str]:
        out = []
        strip = len(self._key("")) if self.prefix else 0
        paginator = self._s3.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix))
        for page in pages:
            out.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(out)

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"


def open_store(url: str, *, endpoint_url: str | None = None, region: str | None = None,
               profile: str | None = None) -> Store:
    """The store at a URL: ``s3://bucket/prefix`` or a directory path."""
    if url.startswith("s3://"):
        return S3Store(url, endpoint_url=endpoint_url, region=region, profile=profile)
    if "://" in url:
        raise OpsbookError(f"record store {url!r}: only a directory or s3://bucket/prefix is supported")
    return LocalStore(url)


def store_for(env) -> Store:
    """The record store an environment names (``opsbook_record_store``)."""
    return open_store(
        str(env.var("opsbook_record_store")),
        endpoint_url=env.var("opsbook_aws_endpoint_url", None) or None,   # empty: AWS itself
        region=env.var("opsbook_aws_region", None),
        profile=env.var("opsbook_aws_profile", None) or None,
    )
