"""One boto3 client per target, service and credential settings in a process (opsbook.engines.aws.client):
made once, and made again when what decides its credentials or endpoint changes. No request is sent."""

from __future__ import annotations

import threading

from opsbook.engines import aws

T = aws.Target(env="staging", account_id="123456789012", region="us-east-1", profile=None,
               endpoint_url="http://127.0.0.1:9")


def _fake_credentials(monkeypatch, key: str = "one") -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def test_the_same_target_and_service_get_the_same_client(monkeypatch):
    _fake_credentials(monkeypatch)
    first = aws.client(T, "s3")
    assert aws.client(T, "s3") is first
    assert aws.client(T, "ec2") is not first
    other_region = aws.Target(**{**T.__dict__, "region": "eu-west-1"})
    assert aws.client(other_region, "s3") is not first
    assert aws.client(other_region, "s3").meta.region_name == "eu-west-1"


def test_changed_credentials_get_a_new_client_that_uses_them(monkeypatch):
    _fake_credentials(monkeypatch, "one")
    before = aws.client(T, "sts")
    _fake_credentials(monkeypatch, "two")
    after = aws.client(T, "sts")
    assert after is not before
    assert after._request_signer._credentials.access_key == "two"
    assert before._request_signer._credentials.access_key == "one"


def test_threads_asking_at_once_share_one_client(monkeypatch):
    _fake_credentials(monkeypatch, "threads")
    got, start = [], threading.Barrier(8)

    def ask():
        start.wait()
        got.append(aws.client(T, "dynamodb"))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8
    assert len({id(c) for c in got}) == 1


def test_a_process_keeps_a_bounded_number_of_clients_the_oldest_let_go(monkeypatch):
    _fake_credentials(monkeypatch, "many")
    monkeypatch.setattr(aws, "_CLIENTS", {})
    first = aws.client(T, "s3")
    for port in range(aws._CLIENTS_KEPT):
        aws.client(aws.Target(**{**T.__dict__, "endpoint_url": f"http://127.0.0.1:{10000 + port}"}), "s3")
    assert len(aws._CLIENTS) == aws._CLIENTS_KEPT
    assert aws.client(T, "s3") is not first   # made again: it was the oldest
