"""The records site of an S3 store, built into the same bucket under the store's prefix (a real
moto server): pages with their content types, relative links to the records, incremental rebuilds."""

import boto3
import pytest

from opsbook.engines.records.store import open_store
from opsbook.operations.records_site import builder
from tests.unit.test_records_site import _entry, _quiet, _write

pytestmark = pytest.mark.moto


def test_site_is_written_back_to_the_bucket_under_the_stores_prefix(s3_bucket, aws):
    store = open_store(f"s3://{s3_bucket}/staging/records")
    store.check()
    ok = _write(store, _entry(runbook="release", env="staging", figures={"version": "1.2.0"}))
    bad = _write(store, _entry(runbook="migrate", outcome="failed", at_h=1, env="staging"))
    built = builder.build(store, log=_quiet)
    assert built.index == f"s3://{s3_bucket}/staging/records/site/index.html"

    s3 = boto3.client("s3", endpoint_url=aws)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="staging/records/site/")["Contents"]}
    assert keys == {f"staging/records/site/{p}" for p in (
        "index.html", "releases.html", "runbooks/release.html", "runbooks/migrate.html", "site.css", "site.js",
        "manifest.json")}
    index = s3.get_object(Bucket=s3_bucket, Key="staging/records/site/index.html")
    assert index["ContentType"] == "text/html; charset=utf-8"
    page = index["Body"].read().decode()
    assert f'href="../{ok["html"]}"' in page, "links are relative to the store's root, in the same bucket"
    assert f'href="../{bad["html"]}#cell-id=' in page
    js = s3.get_object(Bucket=s3_bucket, Key="staging/records/site/site.js")
    assert js["ContentType"].startswith("text/javascript")

    assert builder.build(store, log=_quiet).rendered == []
    _write(store, _entry(runbook="migrate", at_h=2, env="staging"))
    assert sorted(builder.build(store, log=_quiet).rendered) == ["index.html", "runbooks/migrate.html"]
    # Records stay as they were: the site is beside them, never over them.
    assert len(store.ledger()) == 3
    assert store.get(ok["html"]) == b"<html><body>record</body></html>"
