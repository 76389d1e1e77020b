#!/usr/bin/python
"""The release lock's DynamoDB table, converged: the aws_env role's own module.

Why not community.aws.dynamodb_table: in community.aws 10.0.0 (ansible 12.3, the newest that runs on
ansible-core 2.19) and on the collection's main branch, the module reads `TableId` from every
DescribeTable answer (`table["id"] = table["table_id"]`, before it compares anything), and moto 5.2.5,
which the tests run against, does not return it: every run fails with "Module failed: 'table_id'",
after the first one has created the table. No option avoids that path. It also manages neither
point-in-time recovery nor deletion protection. This module does the one thing the lock needs
(opsbook.engines.lock.DynamoDBLockStore): a table keyed by the string `lock_id`, its billing mode,
its tags and its point-in-time recovery, with boto3 through amazon.aws's AnsibleAWSModule (the same
region, profile and endpoint options as every amazon.aws module), idempotent and check-mode aware.
"""

from __future__ import annotations

import botocore.exceptions  # the controller runs this module; amazon.aws needs botocore there anyway
from ansible_collections.amazon.aws.plugins.module_utils.botocore import is_boto3_error_code
from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry
from ansible_collections.amazon.aws.plugins.module_utils.tagging import (
    ansible_dict_to_boto3_tag_list,
    boto3_tag_list_to_ansible_dict,
    compare_aws_tags,
)

DOCUMENTATION = r"""
module: aws_env_lock_table
short_description: The release lock's DynamoDB table (hash key lock_id, string)
description:
  - Creates the table, or converges its billing mode, tags and point-in-time recovery; deletes it with
    I(state=absent). Its key schema is fixed (the lock engine's) and is never changed on an existing
    table: a table with another key schema is refused.
options:
  name: {description: The table's name., type: str, required: true}
  billing_mode: {description: PAY_PER_REQUEST (on demand) or PROVISIONED (1 read and 1 write unit)., type: str,
                 default: PAY_PER_REQUEST, choices: [PAY_PER_REQUEST, PROVISIONED]}
  point_in_time_recovery: {description: Whether point-in-time recovery is on., type: bool, default: false}
  tags: {description: The table's tags., type: dict, default: {}}
  purge_tags: {description: Remove tags that I(tags) does not name., type: bool, default: true}
  state: {description: present or absent., type: str, default: present, choices: [present, absent]}
  wait_timeout: {description: Seconds to wait for the table to become ACTIVE or to be gone., type: int, default: 600}
extends_documentation_fragment: [amazon.aws.common.modules, amazon.aws.region.modules, amazon.aws.boto3]
"""

EXAMPLES = r"""
- name: Ensure the lock table exists
  aws_env_lock_table:
    name: opsbook-locks-staging
    tags: {"opsbook:env": staging, "opsbook:role": lock}
    state: present
"""

RETURN = r"""
table:
  description: The table as converged (name, arn, key schema, billing mode, point-in-time recovery, tags).
  returned: when state is present
  type: dict
"""

HASH_KEY = "lock_id"   # opsbook.engines.lock.DynamoDBLockStore's key: one item per environment
KEY_SCHEMA = [{"AttributeName": HASH_KEY, "KeyType": "HASH"}]
ATTRIBUTES = [{"AttributeName": HASH_KEY, "AttributeType": "S"}]


def describe(client, name):
    try:
        return client.describe_table(aws_retry=True, TableName=name)["Table"]
    except is_boto3_error_code("ResourceNotFoundException"):
        return None


def wait(module, client, waiter_name, name):
    delay = 5
    client.get_waiter(waiter_name).wait(
        TableName=name, WaiterConfig={"Delay": delay, "MaxAttempts": max(1, module.params["wait_timeout"] // delay)})


def pitr_on(client, name):
    answer = client.describe_continuous_backups(aws_retry=True, TableName=name)["ContinuousBackupsDescription"]
    return answer.get("PointInTimeRecoveryDescription", {}).get("PointInTimeRecoveryStatus") == "ENABLED"


def throughput(billing_mode):
    return {"ProvisionedThroughput": {"ReadCapacityUnits": 1, "WriteCapacityUnits": 1}} \
        if billing_mode == "PROVISIONED" else {}


def converge(module, client, table):
    """Billing mode, tags, point-in-time recovery of an existing table; returns whether anything changed."""
    p = module.params
    name, changed = p["name"], False
    keys = sorted((k["AttributeName"], k["KeyType"]) for k in table["KeySchema"])
    types = {a["AttributeName"]: a["AttributeType"] for a in table["AttributeDefinitions"]}
    if keys != [(HASH_KEY, "HASH")] or types.get(HASH_KEY) != "S":
        module.fail_json(
            msg=f"the DynamoDB table {name} exists with the key schema {keys} ({types}), not the lock's (hash key "
                f"{HASH_KEY}, a string). Nothing was changed. A table's keys cannot change: point "
                f"opsbook_lock_table at another name, or delete this table if nothing else uses it, and run again.")
    billing = table.get("BillingModeSummary", {}).get("BillingMode", "PROVISIONED")
    if billing != p["billing_mode"]:
        changed = True
        if not module.check_mode:
            client.update_table(aws_retry=True, TableName=name, BillingMode=p["billing_mode"],
                                **throughput(p["billing_mode"]))
            wait(module, client, "table_exists", name)
    current = boto3_tag_list_to_ansible_dict(
        client.list_tags_of_resource(aws_retry=True, ResourceArn=table["TableArn"]).get("Tags", []))
    add, remove = compare_aws_tags(current, p["tags"], purge_tags=p["purge_tags"])
    if add or remove:
        changed = True
        if not module.check_mode and add:
            client.tag_resource(aws_retry=True, ResourceArn=table["TableArn"], Tags=ansible_dict_to_boto3_tag_list(add))
        if not module.check_mode and remove:
            client.untag_resource(aws_retry=True, ResourceArn=table["TableArn"], TagKeys=remove)
    if pitr_on(client, name) != p["point_in_time_recovery"]:
        changed = True
        if not module.check_mode:
            client.update_continuous_backups(
                aws_retry=True, TableName=name,
                PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": p["point_in_time_recovery"]})
    return changed


def result(client, name):
    table = describe(client, name)
    if table is None:   # check mode, before creation
        return {"name": name}
    tags = boto3_tag_list_to_ansible_dict(
        client.list_tags_of_resource(aws_retry=True, ResourceArn=table["TableArn"]).get("Tags", []))
    return {"name": name, "arn": table["TableArn"], "status": table["TableStatus"],
            "key_schema": table["KeySchema"],
            "billing_mode": table.get("BillingModeSummary", {}).get("BillingMode", "PROVISIONED"),
            "point_in_time_recovery": pitr_on(client, name), "tags": tags}


def main():
    module = AnsibleAWSModule(
        argument_spec={
            "name": {"type": "str", "required": True},
            "billing_mode": {"type": "str", "default": "PAY_PER_REQUEST",
                             "choices": ["PAY_PER_REQUEST", "PROVISIONED"]},
            "point_in_time_recovery": {"type": "bool", "default": False},
            "tags": {"type": "dict", "default": {}},
            "purge_tags": {"type": "bool", "default": True},
            "state": {"type": "str", "default": "present", "choices": ["present", "absent"]},
            "wait_timeout": {"type": "int", "default": 600},
        },
        supports_check_mode=True,
    )
    p = module.params
    name = p["name"]
    client = module.client("dynamodb", retry_decorator=AWSRetry.jittered_backoff(
        catch_extra_error_codes=["LimitExceededException", "ResourceInUseException"]))
    try:
        table = describe(client, name)
        if p["state"] == "absent":
            if table is None:
                module.exit_json(changed=False)
            if not module.check_mode:
                client.delete_table(aws_retry=True, TableName=name)
                wait(module, client, "table_not_exists", name)
            module.exit_json(changed=True)
        if table is None:
            if not module.check_mode:
                client.create_table(aws_retry=True, TableName=name, KeySchema=KEY_SCHEMA,
                                    AttributeDefinitions=ATTRIBUTES, BillingMode=p["billing_mode"],
                                    Tags=ansible_dict_to_boto3_tag_list(p["tags"]), **throughput(p["billing_mode"]))
                wait(module, client, "table_exists", name)
                if p["point_in_time_recovery"]:
                    client.update_continuous_backups(
                        aws_retry=True, TableName=name,
                        PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True})
            module.exit_json(changed=True, table=result(client, name))
        changed = converge(module, client, table)
        module.exit_json(changed=changed, table=result(client, name))
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError,
            botocore.exceptions.WaiterError) as e:
        module.fail_json_aws(e, msg=f"the DynamoDB table {name} could not be converged; what the message names "
                                    f"was not done. Fix the cause and run again (a second run finishes the job)")


if __name__ == "__main__":
    main()
