"""The account guard against a real moto server: an AWS environment is acted on only with
credentials of the account its inventory names; a mismatch, no credentials or an unknown profile
are refused before anything changes, naming the expected and the actual account."""

from __future__ import annotations

import boto3
import pytest

from opsbook.engines import aws as awsenv
from tests.fixtures.aws_env import MOTO_ACCOUNT

pytestmark = pytest.mark.moto

OTHER_ACCOUNT = "210987654321"


def _credentials_in(account: str, endpoint: str) -> tuple[str, str]:
    """An IAM user's access key created in `account` of the moto server (moto then answers
    GetCallerIdentity for that key with that account, as AWS would)."""
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")

    def to_account(request, **_):
        request.headers["x-moto-account-id"] = account

    iam.meta.events.register("before-send.iam.*", to_account)
    user = f"deployer-{account[-4:]}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def test_the_environments_own_account_passes(aws_inventory):
    env = aws_inventory("staging")
    who = awsenv.check_account(env)
    assert who.account == MOTO_ACCOUNT
    assert "arn:aws" in who.arn


def test_credentials_of_another_account_are_refused_naming_both(aws_inventory, aws, monkeypatch):
    env = aws_inventory("staging")
    key, secret = _credentials_in(OTHER_ACCOUNT, aws)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    with pytest.raises(awsenv.AccountMismatch) as e:
        awsenv.check_account(env)
    msg = str(e.value)
    assert f"lives in AWS account {MOTO_ACCOUNT}" in msg
    assert f"belong to account {OTHER_ACCOUNT}" in msg
    assert "Nothing was changed" in msg


def test_an_inventory_naming_another_account_is_refused(aws_inventory):
    env = aws_inventory("prod", opsbook_aws_account_id=OTHER_ACCOUNT)
    with pytest.raises(awsenv.AccountMismatch, match=rf"lives in AWS account {OTHER_ACCOUNT}.*account {MOTO_ACCOUNT}"):
        awsenv.check_account(env)


def test_no_credentials_are_refused(aws_inventory, monkeypatch, tmp_path):
    env = aws_inventory("staging")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    # No shared files, no instance metadata: nothing left in the credential chain.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    expected = rf"no AWS credentials for {env.name} \(expected account {MOTO_ACCOUNT}"
    with pytest.raises(awsenv.NoCredentials, match=expected):
        awsenv.check_account(env)


def test_an_unknown_profile_is_refused(aws_inventory, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    env = aws_inventory("staging", opsbook_aws_profile="opsbook-nowhere")
    with pytest.raises(awsenv.NoCredentials, match=r"profile 'opsbook-nowhere'.*not configured"):
        awsenv.check_account(env)


def test_provisioning_with_another_accounts_credentials_changes_nothing(aws_inventory, aws, monkeypatch):
    from opsbook.operations import provision

    env = aws_inventory("staging")
    key, secret = _credentials_in("333333333333", aws)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    with pytest.raises(awsenv.AccountMismatch):
        provision.provision(env)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    assert awsenv.find(awsenv.target(env)) == []


@pytest.mark.parametrize("task", [["env.destroy", "--env", "prod", "--confirm", "prod", "--reason", "test"],
                                  ["lock", "--env", "prod"]], ids=["env.destroy", "lock"])
def test_every_task_on_the_real_prod_inventory_checks_the_account_first(aws, tmp_path, task):
    """`invoke TASK --env prod` with the repository's own prod inventory, its profile configured with
    credentials moto places in account 123456789012: refused before anything, naming both accounts.
    Every endpoint is the moto server's (AWS_ENDPOINT_URL for boto3, AWS_URL for the aws_ec2 plugin)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from opsbook.core.paths import ROOT

    config = tmp_path / "config"
    config.write_text("[profile opsbook-prod]\naws_access_key_id = testing\naws_secret_access_key = testing\n"
                      "region = us-east-1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(config), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_ENDPOINT_URL=aws, AWS_URL=aws, AWS_EC2_METADATA_DISABLED="true")
    proc = subprocess.run([str(Path(sys.executable).parent / "invoke"), *task], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "refusing to act on prod: it lives in AWS account 123098765432, but the credentials in use belong to " \
           f"account {MOTO_ACCOUNT}" in proc.stderr, proc.stderr
    assert "would be deleted" not in proc.stdout


def test_the_lock_and_the_record_store_use_the_profile_the_account_was_checked_with(aws_inventory, aws,
                                                                                     monkeypatch, tmp_path):
    """The inventory's profile holds credentials of the environment's account while the default chain
    (the process environment) holds another account's: the account guard, the lock and the record
    store all act with the profile, never with the default chain."""
    from opsbook.engines import lock
    from opsbook.engines.lock import DynamoDBLockStore
    from opsbook.engines.records.store import store_for

    # The DynamoDB lock: moto keeps tables per account (its S3 buckets are one namespace for all
    # accounts, so the record store's bucket cannot tell which credentials reached it).
    table = f"opsbook-locks-{tmp_path.name[-12:]}"
    env = aws_inventory("staging", opsbook_aws_profile="opsbook-test", opsbook_lock_backend="dynamodb",
                        opsbook_lock_table=table)
    DynamoDBLockStore(table, "unused", region="us-east-1", endpoint_url=aws).create_table()   # moto's account
    boto3.client("s3", endpoint_url=aws).create_bucket(Bucket=env.var("opsbook_record_store").split("/")[2])
    key, secret = _credentials_in("444444444444", aws)
    config = tmp_path / "config"
    config.write_text("[profile opsbook-test]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)          # the default chain: another account
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)   # no credentials cached from before
    assert awsenv.check_account(env).account == MOTO_ACCOUNT
    with lock.lock_for(env).hold("profile test") as held:
        assert held.info.reason == "profile test"
    store_for(env).check()
