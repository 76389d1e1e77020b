"""The S3 record store against a real moto server: write-once puts, ledger, unreachable bucket."""

import boto3
import pytest

from opsbook.engines.records.store import RecordExists, S3Store, StoreUnreachable, new_record_id, open_store

pytestmark = pytest.mark.moto


def _entry(runbook="snapshot", outcome="succeeded"):
    return {
        "id": new_record_id(runbook),
        "runbook": runbook,
        "env": "staging",
        "outcome": outcome,
        "start": "2025-01-01T00:00:00+00:00",
        "end": "2025-01-01T00:00:05+00:00",
        "duration_s": 5.0,
    }


def test_record_round_trip_and_records_are_never_rewritten(s3_bucket, aws):
    store = open_store(f"s3://{s3_bucket}/staging/records")
    assert isinstance(store, S3Store)
    store.check()
    first = store.write_record(_entry(), b'{"cells": []}', b"<html></html>")
    second = store.write_record(_entry("release", "failed"), b"{}", b"<html>2</html>")
    assert store.ledger() == [first, second] or store.ledger() == [second, first]
    assert store.entry(first["id"]) == first
    assert store.location(first["html"]) == f"s3://{s3_bucket}/staging/records/{first['html']}"
    # IfNoneMatch="*": the second writer of a key is refused and the first bytes stay.
    with pytest.raises(RecordExists, match="never rewritten"):
        store.put_once(first["notebook"], b"tampered", "application/x-ipynb+json")
    with pytest.raises(RecordExists):
        store.write_record(first, b"tampered", b"tampered")
    assert store.get(first["notebook"]) == b'{"cells": []}'
    keys = [
        o["Key"] for o in boto3.client("s3", endpoint_url=aws).list_objects_v2(Bucket=s3_bucket)["Contents"]
    ]
    assert all(k.startswith("staging/records/") for k in keys)
    assert len(keys) == 6


def test_missing_bucket_says_so(aws):
    with pytest.raises(StoreUnreachable, match=r"bucket 'opsbook-nowhere' does not exist"):
        S3Store("s3://opsbook-nowhere/x").check()


def test_unreachable_endpoint_says_so(aws, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = S3Store("s3://bucket/x", endpoint_url=f"http://127.0.0.1:{port}")
    with pytest.raises(StoreUnreachable, match="cannot be reached"):
        store.check()
