"""The ALB rotation against a real moto server: a batch's instances are deregistered from the
environment's target group (found by its tags) and waited for, the others keep serving, and they are
registered again and healthy when the switch succeeded; when it failed they stay out until put back.
The haproxy rotation is the lab's (tested by the lab release tests); which one a release gets is the
inventory's opsbook_lb_kind."""

from __future__ import annotations

import boto3
import pytest

from opsbook.core.inventory import Env
from opsbook.engines import rotation

pytestmark = pytest.mark.moto


@pytest.fixture
def alb_env(aws_inventory, aws):
    """An AWS environment on moto with an ALB, its tagged target group and three registered app instances."""
    env = aws_inventory("staging", opsbook_release_drain_timeout=20, opsbook_release_health_timeout=20)
    tags = [{"Key": "opsbook:env", "Value": env.name}, {"Key": "opsbook:managed-by", "Value": "opsbook"}]
    ec2 = boto3.client("ec2", endpoint_url=aws)
    vpc = ec2.create_vpc(CidrBlock="10.70.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.70.{i}.0/24", AvailabilityZone=f"us-east-1{z}")
               ["Subnet"]["SubnetId"] for i, z in ((1, "a"), (2, "b"))]
    ids = [i["InstanceId"] for i in ec2.run_instances(
        ImageId="ami-12c6146b", MinCount=3, MaxCount=3, SubnetId=subnets[0],
        TagSpecifications=[{"ResourceType": "instance",
                            "Tags": [*tags, {"Key": "opsbook:role", "Value": "app"}]}])["Instances"]]
    elb = boto3.client("elbv2", endpoint_url=aws)
    tg = elb.create_target_group(Name=f"opsbook-{env.name}-app", Protocol="HTTP", Port=8000, VpcId=vpc,
                                 HealthCheckPath="/ping", TargetType="instance",
                                 Tags=[*tags, {"Key": "opsbook:role", "Value": "tg-app"}])["TargetGroups"][0]
    # A target group of the same name pattern but another environment's: never touched.
    elb.create_target_group(Name=f"opsbook-x{env.name[-6:]}-app", Protocol="HTTP", Port=8000, VpcId=vpc,
                            Tags=[{"Key": "opsbook:env", "Value": "elsewhere"},
                                  {"Key": "opsbook:managed-by", "Value": "opsbook"},
                                  {"Key": "opsbook:role", "Value": "tg-app"}])
    lb = elb.create_load_balancer(Name=f"opsbook-{env.name}", Subnets=subnets, Scheme="internet-facing",
                                  Tags=[*tags, {"Key": "opsbook:role", "Value": "alb"}])["LoadBalancers"][0]
    elb.create_listener(LoadBalancerArn=lb["LoadBalancerArn"], Protocol="HTTP", Port=80,
                        DefaultActions=[{"Type": "forward", "TargetGroupArn": tg["TargetGroupArn"]}])
    elb.register_targets(TargetGroupArn=tg["TargetGroupArn"], Targets=[{"Id": i, "Port": 8000} for i in ids])
    return env, ids, tg["TargetGroupArn"]


def _now(env) -> rotation.Rotation:
    """The rotation of the environment as its inventory sees it now (the aws_ec2 plugin reads the
    instances when the inventory is loaded)."""
    return rotation.rotation_for(Env(env.name, path=env.path))


def _registered(aws, arn: str) -> dict[str, str]:
    health = boto3.client("elbv2", endpoint_url=aws).describe_target_health(TargetGroupArn=arn)
    return {d["Target"]["Id"]: d["TargetHealth"]["State"] for d in health["TargetHealthDescriptions"]}


def test_the_inventory_chooses_the_rotation(alb_env, aws_inventory):
    env, _, _ = alb_env
    assert isinstance(rotation.rotation_for(env), rotation.AlbRotation)
    assert isinstance(rotation.rotation_for(aws_inventory("staging", opsbook_lb_kind="haproxy")),
                      rotation.HaproxyRotation)


def test_a_batch_is_drained_switched_and_registered_again_while_the_others_serve(alb_env, aws):
    env, ids, arn = alb_env
    rot = rotation.rotation_for(env)
    assert rot.target_group()[0] == arn
    batch, rest = ids[:1], ids[1:]
    rot.drain(batch)                 # what the release does around switching a batch
    registered = _registered(aws, arn)
    assert batch[0] not in registered, registered              # deregistered, draining finished
    assert all(registered[i] == "healthy" for i in rest)        # the others keep serving
    assert rot.states(batch) == {batch[0]: "unused"}
    rot.enable(batch)
    assert _registered(aws, arn) == dict.fromkeys(ids, "healthy")   # back, and healthy
    # `invoke status` sees each app host (the aws_ec2 inventory names them by instance id) as UP.
    assert _now(env).status() == {i: {f"alb opsbook-{env.name}-app": "UP"} for i in ids}


def test_a_failed_switch_leaves_its_batch_out_until_put_back(alb_env, aws):
    env, ids, arn = alb_env
    rot = rotation.rotation_for(env)
    rot.drain(ids[:2])   # the switch then fails: the release never calls enable, the batch stays out
    assert set(_registered(aws, arn)) == {ids[2]}
    assert _now(env).status()[ids[0]] == {f"alb opsbook-{env.name}-app": "MAINT"}
    rot.put_back(ids[:2])
    assert _registered(aws, arn) == dict.fromkeys(ids, "healthy")


def test_no_tagged_target_group_is_refused_naming_what_to_do(aws_inventory):
    env = aws_inventory("staging")
    with pytest.raises(rotation.RotationError, match=r"exactly one target group tagged opsbook:role=tg-app.*"
                                                     r"found none.*invoke provision"):
        rotation.rotation_for(env).drain(["i-0123456789abcdef0"])


def test_the_release_switch_drains_through_the_alb_around_the_playbook(alb_env, aws, monkeypatch):
    """The release's `_switch` with an ALB environment: while switch.yml runs (replaced here by a
    recorder: it needs real hosts), the batch is out of the target group and the others serve; after a
    good switch the batch is back and healthy; after a failed one it stays out."""
    from opsbook.engines import ansible
    from opsbook.engines.ansible import PlaybookFailed
    from opsbook.operations.release import steps

    env, ids, arn = alb_env
    seen = []

    def switch_yml(_env, playbook, **kwargs):
        seen.append((playbook, kwargs["limit"], _registered(aws, arn)))
        if kwargs["extra_vars"]["opsbook_release_version"] == "bad":
            raise PlaybookFailed("switch failed on purpose")
        return {}

    monkeypatch.setattr(ansible, "run_playbook", switch_yml)
    steps._switch(env, ids[:2], "1.2.3", "batch 1")
    assert seen[0][:2] == ("switch.yml", f"{ids[0]},{ids[1]}")
    assert set(seen[0][2]) == {ids[2]}                                # only the other host served meanwhile
    assert _registered(aws, arn) == dict.fromkeys(ids, "healthy")
    with pytest.raises(PlaybookFailed):
        steps._switch(env, ids[2:], "bad", "batch 2")
    assert set(_registered(aws, arn)) == set(ids[:2])                 # the failed batch stays out


def test_the_release_probe_goes_through_the_alb(alb_env, aws):
    from opsbook.engines import probe

    env, _, _ = alb_env
    dns = boto3.client("elbv2", endpoint_url=aws).describe_load_balancers(
        Names=[f"opsbook-{env.name}"])["LoadBalancers"][0]["DNSName"]
    assert probe.probe_url(env) == f"http://{dns}:80"   # the URL only: nothing is sent to it here
