"""The autoscaling policy check against the moto server: the group and its target-tracking policy are
read through boto3; the capacity arithmetic is opsbook's (moto stores policies, never scales)."""

from __future__ import annotations

import boto3
import pytest

from opsbook.engines import autoscaling, aws

pytestmark = pytest.mark.moto


def _group(endpoint: str, env_name: str, *, max_size: int, policy: dict | None, warmup: int | None = 60):
    ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name="us-east-1")
    lt = f"lt-{env_name}"
    ec2.create_launch_template(LaunchTemplateName=lt, LaunchTemplateData={"ImageId": "ami-12c6146b",
                                                                          "InstanceType": "t3.small"})
    asg = boto3.client("autoscaling", endpoint_url=endpoint, region_name="us-east-1")
    name = f"opsbook-{env_name}-app"
    asg.create_auto_scaling_group(
        AutoScalingGroupName=name, LaunchTemplate={"LaunchTemplateName": lt, "Version": "$Latest"},
        MinSize=2, MaxSize=max_size, DesiredCapacity=2, AvailabilityZones=["us-east-1a"],
        HealthCheckGracePeriod=120,
        Tags=[{"Key": "opsbook:env", "Value": env_name, "PropagateAtLaunch": True},
              {"Key": "opsbook:role", "Value": "app", "PropagateAtLaunch": True}])
    if policy is not None:
        kwargs = {"EstimatedInstanceWarmup": warmup} if warmup else {}
        asg.put_scaling_policy(AutoScalingGroupName=name, PolicyName="app-cpu", PolicyType="TargetTrackingScaling",
                               TargetTrackingConfiguration=policy, **kwargs)
    return name


def _target(endpoint: str, env_name: str) -> aws.Target:
    return aws.Target(env_name, "123456789012", "us-east-1", None, endpoint)


def test_the_group_and_its_policy_are_read_and_judged(aws_inventory, aws):
    env = aws_inventory("staging")
    _group(aws, env.name, max_size=8, policy={
        "PredefinedMetricSpecification": {"PredefinedMetricType": "ASGAverageCPUUtilization"}, "TargetValue": 60.0})
    group = autoscaling.app_group(_target(aws, env.name), env.name)
    assert (group.min_size, group.max_size, group.desired) == (2, 8, 2)
    assert [(p.metric, p.target_value) for p in group.policies] == [("ASGAverageCPUUtilization", 60.0)]
    # Measured: 900 responses/s per host, hosts at 85 % CPU at the knee; 3,000/s target with 25 % headroom.
    a = autoscaling.assess(group, target_rate=3000, capacity_per_host=900, knee_cpu_share=0.85,
                           knee_requests_per_host_per_s=90, ramp_seconds=600)
    by = {f.name: f for f in a.findings}
    assert a.hosts_needed == 5                       # ceil(3000 * 1.25 / 900)
    assert by["max covers the target"].ok
    assert not by["desired carries the target now"].ok   # 2 x 900 < 3000: it must scale out to get there
    assert by["app-cpu scales out before the knee"].ok   # 60 % < 85 %
    assert by["app-cpu scales out within the ramp"].ok   # 180 + 60 s ≤ 600 s
    assert not a.ok


def test_a_policy_that_triggers_after_the_knee_and_a_small_max_are_findings(aws_inventory, aws):
    env = aws_inventory("staging")
    _group(aws, env.name, max_size=3, warmup=None, policy={
        "PredefinedMetricSpecification": {"PredefinedMetricType": "ASGAverageCPUUtilization"}, "TargetValue": 90.0})
    group = autoscaling.app_group(_target(aws, env.name), env.name)
    a = autoscaling.assess(group, target_rate=3000, capacity_per_host=900, knee_cpu_share=0.85,
                           knee_requests_per_host_per_s=90, ramp_seconds=240)
    by = {f.name: f for f in a.findings}
    assert not by["max covers the target"].ok        # 3 x 900 < 3750
    assert not by["app-cpu scales out before the knee"].ok
    assert not by["app-cpu scales out within the ramp"].ok   # 180 + 120 s (grace period) > 240 s
    assert "120" in by["app-cpu scales out within the ramp"].text


def test_no_policy_means_no_scale_out(aws_inventory, aws):
    env = aws_inventory("staging")
    _group(aws, env.name, max_size=10, policy=None)
    a = autoscaling.assess(autoscaling.app_group(_target(aws, env.name), env.name), target_rate=1000,
                           capacity_per_host=900, knee_cpu_share=0.8, knee_requests_per_host_per_s=90,
                           ramp_seconds=600)
    assert [f.name for f in a.findings if not f.ok] == ["scales out before the knee"]   # 2 x 900 ≥ 1,000 today
    assert "never scales out" in a.findings[-1].text


def test_an_environment_without_its_group_is_told_what_to_do(aws_inventory, aws):
    env = aws_inventory("staging")
    with pytest.raises(autoscaling.AutoscalingError, match="invoke provision"):
        autoscaling.app_group(_target(aws, env.name), env.name)
