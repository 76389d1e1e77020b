"""The app hosts' Auto Scaling group and its target-tracking policy, judged against measured capacity.

``app_group(target, env_name)`` reads the group tagged ``opsbook:env=<env>`` and ``opsbook:role=app``
(min, max, desired, warmup) and its target-tracking policies through boto3. ``assess(group, ...)`` does the
capacity arithmetic from figures a scaling check measured (capacity per host, CPU share and request rate per
host at the knee): AWS (and moto, which stores policies but never scales) is not asked to scale anything.

The findings an operator asks for:
- **max covers the target with headroom**: max hosts x capacity per host ≥ target x (1 + headroom);
- **the policy scales out before the knee**: its target value is below what a host shows at the knee (CPU
  share for ASGAverageCPUUtilization, requests per minute for ALBRequestCountPerTarget);
- **scale-out is faster than the ramp**: a target-tracking alarm needs 3 one-minute datapoints above its
  target, then an instance launches and warms up (the policy's EstimatedInstanceWarmup, else the group's
  DefaultInstanceWarmup, else its health check grace period); the load must not outgrow the hosts standing
  by in that time (``ramp_seconds``: how long the load takes to climb from the policy's trigger to the knee).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from opsbook.core.errors import OpsbookError

ALARM_SECONDS = 180          # target tracking's scale-out alarm: 3 datapoints of 1 minute
DEFAULT_WARMUP = 300         # what AWS assumes without any warmup setting


class AutoscalingError(OpsbookError):
    pass


@dataclass
class Policy:
    name: str
    metric: str                  # ASGAverageCPUUtilization | ALBRequestCountPerTarget | ASGAverageNetworkIn | custom
    target_value: float
    warmup_s: int | None
    disable_scale_in: bool


@dataclass
class Group:
    name: str
    min_size: int
    max_size: int
    desired: int
    default_warmup_s: int | None
    health_check_grace_s: int | None
    policies: list[Policy] = field(default_factory=list)


def app_group(t, env_name: str) -> Group:
    """The environment's app Auto Scaling group and its target-tracking policies (read-only)."""
    from opsbook.engines import aws

    asg = aws.client(t, "autoscaling")
    found = []
    for page in asg.get_paginator("describe_auto_scaling_groups").paginate(
            Filters=[{"Name": f"tag:{aws.TAG_ENV}", "Values": [env_name]}]):
        for g in page["AutoScalingGroups"]:
            tags = {x["Key"]: x["Value"] for x in g.get("Tags", [])}
            if tags.get(aws.TAG_ENV) == env_name and tags.get("opsbook:role") == "app":
                found.append(g)
    if len(found) != 1:
        names = ", ".join(g["AutoScalingGroupName"] for g in found) or "none"
        raise AutoscalingError(
            f"{env_name} needs exactly one Auto Scaling group tagged opsbook:env={env_name}, opsbook:role=app; found "
            f"{names}. Nothing was changed. `invoke provision --env {env_name}` creates it.")
    g = found[0]
    policies = []
    for page in asg.get_paginator("describe_policies").paginate(
            AutoScalingGroupName=g["AutoScalingGroupName"], PolicyTypes=["TargetTrackingScaling"]):
        for p in page["ScalingPolicies"]:
            cfg = p.get("TargetTrackingConfiguration") or {}
            spec = cfg.get("PredefinedMetricSpecification") or {}
            metric = spec.get("PredefinedMetricType") or (cfg.get("CustomizedMetricSpecification") or {}).get(
                "MetricName", "custom")
            policies.append(Policy(p["PolicyName"], metric, float(cfg.get("TargetValue", 0)),
                                   p.get("EstimatedInstanceWarmup"), bool(cfg.get("DisableScaleIn", False))))
    return Group(g["AutoScalingGroupName"], int(g["MinSize"]), int(g["MaxSize"]), int(g["DesiredCapacity"]),
                 g.get("DefaultInstanceWarmup"), g.get("HealthCheckGracePeriod"), policies)


@dataclass
class Finding:
    name: str
    ok: bool
    text: str


@dataclass
class Assessment:
    group: str
    findings: list[Finding]
    hosts_needed: int | None

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)

    def as_dict(self) -> dict[str, Any]:
        return {"group": self.group, "ok": self.ok, "hosts_needed": self.hosts_needed,
                "findings": [asdict(f) for f in self.findings]}


def assess(group: Group, *, target_rate: float, capacity_per_host: float | None, knee_cpu_share: float | None,
           knee_requests_per_host_per_s: float | None, ramp_seconds: float, headroom: float = 0.25) -> Assessment:
    """The group against the target, from measured figures (see the module doc)."""
    findings: list[Finding] = []
    needed = None
    if not capacity_per_host or capacity_per_host <= 0:
        findings.append(Finding("max covers the target", False, "no capacity per host was measured (the check "
                                                                "found no knee), so no host count can be trusted"))
    else:
        needed = math.ceil(target_rate * (1 + headroom) / capacity_per_host)
        findings.append(Finding(
            "max covers the target", group.max_size >= needed,
            f"{target_rate:g}/s with {headroom:.0%} headroom at {capacity_per_host:g}/s per host needs {needed} hosts; "
            f"max is {group.max_size} ({group.max_size * capacity_per_host:g}/s)"))
        findings.append(Finding(
            "desired carries the target now", group.desired * capacity_per_host >= target_rate,
            f"desired {group.desired} hosts carry {group.desired * capacity_per_host:g}/s against {target_rate:g}/s"))
    if not group.policies:
        findings.append(Finding("scales out before the knee", False,
                                "no target-tracking policy: the group never scales out, whatever the load"))
        return Assessment(group.name, findings, needed)
    for p in group.policies:
        if p.metric == "ASGAverageCPUUtilization":
            if knee_cpu_share is None:
                findings.append(Finding(f"{p.name} scales out before the knee", False,
                                        "no CPU share per host was measured at the knee"))
            else:
                findings.append(Finding(
                    f"{p.name} scales out before the knee", p.target_value / 100 < knee_cpu_share,
                    f"target {p.target_value:g} % CPU; hosts were at {knee_cpu_share:.0%} CPU at the knee"))
        elif p.metric == "ALBRequestCountPerTarget":
            if knee_requests_per_host_per_s is None:
                findings.append(Finding(f"{p.name} scales out before the knee", False,
                                        "no request rate per host was measured at the knee"))
            else:
                per_minute = knee_requests_per_host_per_s * 60
                findings.append(Finding(
                    f"{p.name} scales out before the knee", p.target_value < per_minute,
                    f"target {p.target_value:g} requests per host per minute; a host took {per_minute:g} at the knee"))
        else:
            findings.append(Finding(f"{p.name} scales out before the knee", False,
                                    f"metric {p.metric} is not one a scaling check measures; judge it by hand"))
        warmup = p.warmup_s or group.default_warmup_s or group.health_check_grace_s or DEFAULT_WARMUP
        scale_out = ALARM_SECONDS + warmup
        findings.append(Finding(
            f"{p.name} scales out within the ramp", scale_out <= ramp_seconds,
            f"a scale-out takes about {scale_out} s (alarm {ALARM_SECONDS} s + warmup {warmup} s); the load climbs "
            f"from the trigger to the knee in {ramp_seconds:g} s"))
    return Assessment(group.name, findings, needed)
