"""AWS environments: the account guard, clients aimed at the environment's account, region and
endpoint, and the environment's resources found by their tags.

Each AWS environment's inventory (``group_vars/all/``) names the account it lives in
(``opsbook_aws_account_id``), its region (``opsbook_aws_region``) and the credentials profile to use
(``opsbook_aws_profile``; empty: the default credential chain). ``opsbook_aws_endpoint_url`` points
every client at another endpoint (a moto server in tests; empty for AWS itself).

**The account guard** (:func:`check_account`) calls STS ``GetCallerIdentity`` before anything else
touches AWS and refuses, naming the expected and the actual account, when they differ or when no
usable credentials exist. Every AWS-touching operation calls it first.

**Tags are the state.** Every resource opsbook creates carries ``opsbook:env`` (the environment),
``opsbook:managed-by`` (``opsbook``) and ``opsbook:role`` (what it is for: ``vpc``, ``sg-app``,
``alb`` ...). There is no state file: :func:`find` asks each service for what is tagged for an
environment, :func:`check_unique` refuses when two resources claim the same role, and
:func:`destroy` deletes exactly what :func:`find` returned.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from opsbook.core.errors import OpsbookError

TAG_ENV = "opsbook:env"
TAG_MANAGED_BY = "opsbook:managed-by"
TAG_ROLE = "opsbook:role"
MANAGED_BY = "opsbook"
# A purpose environment's (`invoke env.create`) own tags, on every one of its resources: which
# inventory it is like, who made it, when, and when it expires. Read back from its VPC.
TAG_LIKE = "opsbook:like"
TAG_OWNER = "opsbook:owner"
TAG_CREATED = "opsbook:created"
TAG_EXPIRES = "opsbook:expires"
PURPOSE_TAGS = (TAG_LIKE, TAG_OWNER, TAG_CREATED, TAG_EXPIRES)
IAM_PATH = "/opsbook/"   # opsbook's IAM roles and instance profiles live under this path


class AwsError(OpsbookError):
    """An AWS environment cannot be acted on (credentials, account, configuration)."""


class AccountMismatch(AwsError):
    """The credentials in use belong to another account than the environment's."""


class NoCredentials(AwsError):
    """No usable AWS credentials were found (none, expired, or an unknown profile)."""


class AmbiguousResources(AwsError):
    """More than one resource is tagged for the same role of an environment."""


# --- where an environment lives ---------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """The AWS account, region, credentials profile and endpoint of one environment (its inventory's)."""

    env: str
    account_id: str
    region: str
    profile: str | None
    endpoint_url: str | None

    def describe(self) -> str:
        how = f"profile {self.profile}" if self.profile else "the default credential chain"
        where = f" via {self.endpoint_url}" if self.endpoint_url else ""
        return f"account {self.account_id}, {self.region}, {how}{where}"


def target(env) -> Target:
    """The environment's AWS coordinates, read from its inventory; refuses a non-AWS environment."""
    if env.kind != "aws":
        raise AwsError(f"environment {env.name!r} is a {env.kind} environment, not an AWS one "
                       f"(opsbook_env_kind in {env.path}/group_vars/all/). Nothing was changed.")
    account = str(env.var("opsbook_aws_account_id", "") or "")
    if not re.fullmatch(r"[0-9]{12}", account):
        raise AwsError(f"environment {env.name!r} names no valid AWS account (opsbook_aws_account_id is "
                       f"{account!r}; it must be the 12-digit id of the account {env.name} lives in). "
                       f"Nothing was changed. Set it in {env.path}/group_vars/all/.")
    region = str(env.var("opsbook_aws_region", "") or "")
    if not region:
        raise AwsError(f"environment {env.name!r} names no AWS region (opsbook_aws_region in "
                       f"{env.path}/group_vars/all/). Nothing was changed.")
    return Target(env=env.name, account_id=account, region=region,
                  profile=str(env.var("opsbook_aws_profile", "") or "") or None,
                  endpoint_url=str(env.var("opsbook_aws_endpoint_url", "") or "") or None)


# botocore data loaders by search path: each caches the service models it has parsed (see boto_session).
_LOADERS: dict[tuple[str, ...], Any] = {}


def boto_session(profile: str | None, region: str | None = None):
    """A new boto3 session, as `boto3.Session(profile_name=..., region_name=...)` makes it (its own
    credentials, resolved as boto3 resolves them), whose clients read the services' models through
    one botocore data loader per process. A loader caches each JSON model it parses; a session's
    own would parse EC2's (megabytes) again for every client, about 0.3 s of CPU each time. Only the
    models are shared: nothing that names an account, a credential or a region."""
    import boto3
    import botocore.session

    core = botocore.session.get_session()
    made = boto3.Session(botocore_session=core, profile_name=profile, region_name=region)
    own = core.get_component("data_loader")   # the session's, with boto3's search paths added
    core.register_component("data_loader", _LOADERS.setdefault(tuple(own.search_paths), own))
    return made


def session(t: Target):
    from botocore.exceptions import ProfileNotFound

    try:
        return boto_session(t.profile, t.region)
    except ProfileNotFound:
        raise NoCredentials(
            f"the AWS profile {t.profile!r} that {t.env} names (opsbook_aws_profile) is not configured on "
            f"this machine. Nothing was changed. Configure it (`aws configure sso --profile {t.profile}`) "
            f"for account {t.account_id}, or fix the inventory.") from None


# Clients made, by what decides who they act as and where (see client). A lock, because runbooks and the
# release's threads ask for clients concurrently; a made client itself is thread-safe (boto3's documentation).
_CLIENTS: dict[tuple, Any] = {}
_CLIENTS_LOCK = threading.Lock()
_CLIENTS_KEPT = 64   # the oldest made is let go past this many (an operation uses a dozen)
# The process environment that decides a client's credentials and endpoint besides the Target: a client
# made before one of these changed is not reused after.
_CLIENT_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
               "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_ENDPOINT_URL", "AWS_CA_BUNDLE")


def client(t: Target, service: str):
    """A boto3 client for the environment: its profile, region and endpoint; short timeouts.

    One per process for the same target, service and credential settings: making a client costs about
    50 ms of CPU (its service model, endpoint rules and event handlers), and an AWS task asked for one
    per call, 160 in one provision-and-destroy test. botocore refreshes a client's temporary credentials
    (SSO, assumed roles) itself, as for any long-lived client."""
    import os

    from botocore.config import Config

    key = (t, service, tuple(os.environ.get(name) for name in _CLIENT_ENV))
    with _CLIENTS_LOCK:
        made = _CLIENTS.get(key)
        if made is None:
            config = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"})
            made = _CLIENTS[key] = session(t).client(service, endpoint_url=t.endpoint_url, config=config)
            while len(_CLIENTS) > _CLIENTS_KEPT:   # a long-lived process (the suite's) meets many endpoints
                del _CLIENTS[next(iter(_CLIENTS))]
        return made


def process_env(env) -> dict[str, str]:
    """Environment variables for Ansible and testinfra subprocesses acting on an AWS environment:
    the region, profile and endpoint of its inventory, where the aws_ec2 inventory plugin and the
    Secrets Manager lookups (which read no inventory variables) find them."""
    if env.kind != "aws":
        return {}
    t = target(env)
    out = {"AWS_REGION": t.region, "AWS_DEFAULT_REGION": t.region}
    if t.profile:
        out["AWS_PROFILE"] = t.profile
    if t.endpoint_url:
        out["AWS_URL"] = t.endpoint_url             # amazon.aws modules and plugins
        out["AWS_ENDPOINT_URL"] = t.endpoint_url    # boto3 itself
    return out


def activate(env):
    """Make this process act as the environment says: its profile, region and endpoint in the process
    environment (read by the aws_ec2 inventory plugin, which knows no inventory variable, by the
    Secrets Manager lookups and by runbook kernels). Returns the environment, read again when that
    changed anything, so that its hosts are the ones the plugin finds with those credentials. For a
    command-line process acting on one environment (`tasks.load_env`)."""
    import os

    from opsbook.core.inventory import Env

    wanted = process_env(env)
    if all(os.environ.get(k) == v for k, v in wanted.items()):
        return env
    os.environ.update(wanted)
    return Env(env.name, path=env.path, like=env.like)


# --- the account guard --------------------------------------------------------------------------
@dataclass(frozen=True)
class Identity:
    account: str
    arn: str


def check_account(env) -> Identity:
    """Refuse unless the credentials in use belong to the environment's account (STS GetCallerIdentity).

    Called before anything else touches AWS. The messages name the expected and the actual account.
    """
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    t = target(env)
    try:
        answer = client(t, "sts").get_caller_identity()
    except NoCredentialsError:
        raise NoCredentials(
            f"no AWS credentials for {t.env} (expected {t.describe()}). Nothing was changed. Log in to "
            f"account {t.account_id} (e.g. `aws sso login --profile {t.profile or 'PROFILE'}`) and run again."
        ) from None
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        raise NoCredentials(
            f"AWS refused the credentials for {t.env} ({code}: {e.response.get('Error', {}).get('Message', '')}); "
            f"expected {t.describe()}. Nothing was changed. Renew them for account {t.account_id} and run again."
        ) from None
    except BotoCoreError as e:
        raise NoCredentials(
            f"the caller's identity could not be checked for {t.env} ({e}); expected {t.describe()}. "
            f"Nothing was changed. Check the network, the endpoint and the credentials, then run again."
        ) from None
    who = Identity(account=str(answer["Account"]), arn=str(answer["Arn"]))
    if who.account != t.account_id:
        raise AccountMismatch(
            f"refusing to act on {t.env}: it lives in AWS account {t.account_id}, but the credentials in use "
            f"belong to account {who.account} ({who.arn}). Nothing was changed. Use credentials for account "
            f"{t.account_id} (opsbook_aws_profile: {t.profile or 'the default chain'}), or, if the inventory is "
            f"wrong, fix opsbook_aws_account_id in inventories/{t.env}/group_vars/all/."
        )
    return who


# --- resources found by tags ----------------------------------------------------------------
@dataclass(frozen=True)
class Resource:
    kind: str          # what it is (vpc, subnet, security-group, alb, ...)
    id: str            # the id or ARN its service deletes it by
    name: str          # what an operator recognizes it by
    role: str          # the opsbook:role tag
    env: str           # the opsbook:env tag
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def describe(self) -> str:
        shown = self.name if self.name == self.id else f"{self.name} ({self.id})"
        return f"{self.kind} {shown} [role {self.role}]"


def _tags(pairs: list[dict[str, str]] | None) -> dict[str, str]:
    return {p.get("Key", p.get("key", "")): p.get("Value", p.get("value", "")) for p in pairs or []}


def _ec2_filter(env_name: str) -> list[dict[str, Any]]:
    return [{"Name": f"tag:{TAG_ENV}", "Values": [env_name]}, {"Name": f"tag:{TAG_MANAGED_BY}", "Values": [MANAGED_BY]}]


def _ours(tags: dict[str, str], env_name: str) -> bool:
    return tags.get(TAG_ENV) == env_name and tags.get(TAG_MANAGED_BY) == MANAGED_BY


def _resource(kind: str, rid: str, name: str, tags: dict[str, str], **extra) -> Resource:
    return Resource(kind=kind, id=rid, name=name or rid, role=tags.get(TAG_ROLE, "?"), env=tags.get(TAG_ENV, "?"),
                    extra=extra)


def _find_ec2(t: Target, env_name: str) -> Iterator[Resource]:
    ec2 = client(t, "ec2")
    f = _ec2_filter(env_name)
    for r in ec2.describe_instances(Filters=[*f, {"Name": "instance-state-name",
                                                  "Values": ["pending", "running", "stopping", "stopped"]}]
                                    )["Reservations"]:
        for i in r["Instances"]:
            tags = _tags(i.get("Tags"))
            yield _resource("instance", i["InstanceId"], tags.get("Name", ""), tags)
    for lt in ec2.describe_launch_templates(Filters=f)["LaunchTemplates"]:
        # DescribeTags: moto 5.2.5 leaves tags added by CreateTags out of DescribeLaunchTemplates.
        tags = _tags(ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [lt["LaunchTemplateId"]]}])["Tags"])
        yield _resource("launch-template", lt["LaunchTemplateId"], lt["LaunchTemplateName"], tags)
    for sg in ec2.describe_security_groups(Filters=f)["SecurityGroups"]:
        yield _resource("security-group", sg["GroupId"], sg["GroupName"], _tags(sg.get("Tags")))
    for rt in ec2.describe_route_tables(Filters=f)["RouteTables"]:
        assoc = [a["RouteTableAssociationId"] for a in rt.get("Associations", []) if not a.get("Main")]
        yield _resource("route-table", rt["RouteTableId"], _tags(rt.get("Tags")).get("Name", ""), _tags(rt.get("Tags")),
                        associations=assoc)
    for igw in ec2.describe_internet_gateways(Filters=f)["InternetGateways"]:
        yield _resource("internet-gateway", igw["InternetGatewayId"], _tags(igw.get("Tags")).get("Name", ""),
                        _tags(igw.get("Tags")), vpcs=[a["VpcId"] for a in igw.get("Attachments", [])])
    for sn in ec2.describe_subnets(Filters=f)["Subnets"]:
        tags = _tags(sn.get("Tags"))
        yield _resource("subnet", sn["SubnetId"], tags.get("Name", ""), tags, az=sn["AvailabilityZone"])
    for vpc in ec2.describe_vpcs(Filters=f)["Vpcs"]:
        tags = _tags(vpc.get("Tags"))
        yield _resource("vpc", vpc["VpcId"], tags.get("Name", ""), tags)


def _find_autoscaling(t: Target, env_name: str) -> Iterator[Resource]:
    asg = client(t, "autoscaling")
    pages = asg.get_paginator("describe_auto_scaling_groups").paginate(
        Filters=[{"Name": f"tag:{TAG_ENV}", "Values": [env_name]}])
    for page in pages:
        for g in page["AutoScalingGroups"]:
            tags = _tags(g.get("Tags"))
            if _ours(tags, env_name):
                yield _resource("autoscaling-group", g["AutoScalingGroupName"], g["AutoScalingGroupName"], tags)


def _elbv2_tagged(elb, arns: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for i in range(0, len(arns), 20):
        for d in elb.describe_tags(ResourceArns=arns[i:i + 20])["TagDescriptions"]:
            out[d["ResourceArn"]] = _tags(d.get("Tags"))
    return out


def find_load_balancing(t: Target, env_name: str) -> Iterator[Resource]:
    """The environment's load balancers and target groups (read-only)."""
    elb = client(t, "elbv2")
    lbs = elb.describe_load_balancers()["LoadBalancers"]
    tags = _elbv2_tagged(elb, [lb["LoadBalancerArn"] for lb in lbs])
    for lb in lbs:
        if _ours(tags.get(lb["LoadBalancerArn"], {}), env_name):
            yield _resource("load-balancer", lb["LoadBalancerArn"], lb["LoadBalancerName"], tags[lb["LoadBalancerArn"]],
                            dns=lb.get("DNSName"))
    tgs = elb.describe_target_groups()["TargetGroups"]
    tags = _elbv2_tagged(elb, [tg["TargetGroupArn"] for tg in tgs])
    for tg in tgs:
        if _ours(tags.get(tg["TargetGroupArn"], {}), env_name):
            yield _resource("target-group", tg["TargetGroupArn"], tg["TargetGroupName"], tags[tg["TargetGroupArn"]])


def _find_rds(t: Target, env_name: str) -> Iterator[Resource]:
    rds = client(t, "rds")
    for c in rds.describe_db_clusters()["DBClusters"]:
        tags = _tags(c.get("TagList"))
        if _ours(tags, env_name):
            yield _resource("db-cluster", c["DBClusterIdentifier"], c["DBClusterIdentifier"], tags)
    for i in rds.describe_db_instances()["DBInstances"]:
        tags = _tags(i.get("TagList"))
        if _ours(tags, env_name):
            yield _resource("db-instance", i["DBInstanceIdentifier"], i["DBInstanceIdentifier"], tags,
                            cluster=i.get("DBClusterIdentifier"))
    for g in rds.describe_db_subnet_groups()["DBSubnetGroups"]:
        tags = _tags(rds.list_tags_for_resource(ResourceName=g["DBSubnetGroupArn"]).get("TagList"))
        if _ours(tags, env_name):
            yield _resource("db-subnet-group", g["DBSubnetGroupName"], g["DBSubnetGroupName"], tags)


def _find_s3(t: Target, env_name: str) -> Iterator[Resource]:
    from botocore.exceptions import ClientError

    s3 = client(t, "s3")
    for b in s3.list_buckets().get("Buckets", []):
        try:
            tags = _tags(s3.get_bucket_tagging(Bucket=b["Name"]).get("TagSet"))
        except ClientError:   # NoSuchTagSet: an untagged bucket is not ours
            continue
        if _ours(tags, env_name):
            yield _resource("s3-bucket", b["Name"], b["Name"], tags)


def _find_dynamodb(t: Target, env_name: str) -> Iterator[Resource]:
    ddb = client(t, "dynamodb")
    for page in ddb.get_paginator("list_tables").paginate():
        for name in page["TableNames"]:
            arn = ddb.describe_table(TableName=name)["Table"]["TableArn"]
            tags = _tags(ddb.list_tags_of_resource(ResourceArn=arn).get("Tags"))
            if _ours(tags, env_name):
                yield _resource("dynamodb-table", name, name, tags)


def _find_secrets(t: Target, env_name: str) -> Iterator[Resource]:
    sm = client(t, "secretsmanager")
    for page in sm.get_paginator("list_secrets").paginate(Filters=[{"Key": "tag-key", "Values": [TAG_ENV]}]):
        for s in page["SecretList"]:
            tags = _tags(s.get("Tags"))
            if _ours(tags, env_name):
                yield _resource("secret", s["ARN"], s["Name"], tags)


def _find_ssm(t: Target, env_name: str) -> Iterator[Resource]:
    ssm = client(t, "ssm")
    named = [{"Key": "Name", "Option": "BeginsWith", "Values": [f"/opsbook/{env_name}/"]}]
    for page in ssm.get_paginator("describe_parameters").paginate(ParameterFilters=named):
        for p in page["Parameters"]:
            tags = _tags(ssm.list_tags_for_resource(ResourceType="Parameter", ResourceId=p["Name"]).get("TagList"))
            if _ours(tags, env_name):
                yield _resource("parameter", p["Name"], p["Name"], tags)


def _find_iam(t: Target, env_name: str) -> Iterator[Resource]:
    iam = client(t, "iam")
    for page in iam.get_paginator("list_roles").paginate(PathPrefix=IAM_PATH):
        for r in page["Roles"]:
            tags = _tags(iam.list_role_tags(RoleName=r["RoleName"]).get("Tags"))
            if _ours(tags, env_name):
                yield _resource("iam-role", r["RoleName"], r["RoleName"], tags)
    for page in iam.get_paginator("list_instance_profiles").paginate(PathPrefix=IAM_PATH):
        for p in page["InstanceProfiles"]:
            # GetInstanceProfile carries the tags (moto 5.2.5 has no ListInstanceProfileTags).
            tags = _tags(iam.get_instance_profile(InstanceProfileName=p["InstanceProfileName"])["InstanceProfile"]
                         .get("Tags"))
            if _ours(tags, env_name):
                yield _resource("instance-profile", p["InstanceProfileName"], p["InstanceProfileName"], tags,
                                roles=[r["RoleName"] for r in p.get("Roles", [])])


FINDERS: tuple[Callable[[Target, str], Iterator[Resource]], ...] = (
    _find_autoscaling, find_load_balancing, _find_rds, _find_ec2, _find_s3, _find_dynamodb, _find_secrets, _find_ssm,
    _find_iam)


def find(t: Target, env_name: str | None = None) -> list[Resource]:
    """Every resource tagged ``opsbook:env=<env>`` and ``opsbook:managed-by=opsbook``, in the order
    :func:`destroy` deletes them (dependents first). Read-only."""
    name = env_name or t.env
    return [r for finder in FINDERS for r in finder(t, name)]


def duplicates(resources: list[Resource]) -> dict[str, list[Resource]]:
    """role -> the resources claiming it, for every role claimed more than once."""
    by_role: dict[str, list[Resource]] = {}
    for r in resources:
        if r.kind == "instance":   # app hosts share their role: the Auto Scaling group owns them
            continue
        by_role.setdefault(r.role, []).append(r)
    return {role: rs for role, rs in by_role.items() if len(rs) > 1}


def check_unique(resources: list[Resource], env_name: str) -> None:
    """Refuse when two resources are tagged for the same role of the environment: opsbook never guesses
    which one is the environment's."""
    dups = duplicates(resources)
    if dups:
        lines = "\n".join(f"  role {role}: " + "; ".join(r.describe() for r in rs) for role, rs in sorted(dups.items()))
        raise AmbiguousResources(
            f"more than one resource is tagged {TAG_ENV}={env_name} for the same role:\n{lines}\n"
            f"Nothing was changed. Find out which one {env_name} uses, then delete or re-tag the other "
            f"(its {TAG_ENV} tag) and run again.")


# --- purpose environments ----------------------------------------------------------------------
@dataclass(frozen=True)
class PurposeEnv:
    """A purpose environment as its VPC's tags describe it."""

    name: str
    like: str
    owner: str
    created: str     # ISO 8601, UTC
    expires: str     # ISO 8601, UTC
    vpc_id: str

    def tags(self) -> dict[str, str]:
        return {TAG_LIKE: self.like, TAG_OWNER: self.owner, TAG_CREATED: self.created, TAG_EXPIRES: self.expires}


def _purpose(vpc: dict[str, Any]) -> PurposeEnv | None:
    tags = _tags(vpc.get("Tags"))
    if not all(tags.get(k) for k in PURPOSE_TAGS) or tags.get(TAG_MANAGED_BY) != MANAGED_BY:
        return None
    return PurposeEnv(name=tags.get(TAG_ENV, "?"), like=tags[TAG_LIKE], owner=tags[TAG_OWNER],
                      created=tags[TAG_CREATED], expires=tags[TAG_EXPIRES], vpc_id=vpc["VpcId"])


def purpose_env(t: Target, env_name: str) -> PurposeEnv | None:
    """The purpose environment `env_name` as its VPC's tags say, or None when it has no VPC with them."""
    vpcs = client(t, "ec2").describe_vpcs(Filters=_ec2_filter(env_name))["Vpcs"]
    found = [p for p in map(_purpose, vpcs) if p is not None]
    return found[0] if len(found) == 1 else None


def purpose_envs(t: Target, like: str) -> list[PurposeEnv]:
    """Every purpose environment made like `like` in the target's account and region (read-only)."""
    vpcs = client(t, "ec2").describe_vpcs(Filters=[{"Name": f"tag:{TAG_LIKE}", "Values": [like]},
                                                   {"Name": f"tag:{TAG_MANAGED_BY}", "Values": [MANAGED_BY]}])["Vpcs"]
    return sorted((p for p in map(_purpose, vpcs) if p is not None), key=lambda p: p.name)


# --- destroy ----------------------------------------------------------------------------------
def _wait(what: str, done: Callable[[], bool], timeout: float = 900, every: float = 2) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AwsError(f"timed out after {timeout:.0f} s waiting for {what}; what was deleted so far is "
                           f"gone, the rest is left. Run the same destroy again to finish.")
        time.sleep(every)


WAIT = {"Delay": 5, "MaxAttempts": 180}   # deletions are polled every 5 s, for up to 15 minutes


def _delete_asg(t: Target, r: Resource, **_) -> None:
    asg = client(t, "autoscaling")
    asg.delete_auto_scaling_group(AutoScalingGroupName=r.id, ForceDelete=True)
    _wait(f"Auto Scaling group {r.id} to go", lambda: not asg.describe_auto_scaling_groups(
        AutoScalingGroupNames=[r.id])["AutoScalingGroups"])


def _delete_db_instance(t: Target, r: Resource, *, final_snapshot: str | None, **_) -> None:
    rds = client(t, "rds")
    args: dict[str, Any] = {"DBInstanceIdentifier": r.id}
    if not r.extra.get("cluster"):   # a cluster's instances have no snapshot of their own
        args.update({"FinalDBSnapshotIdentifier": f"{final_snapshot}-{r.id}"} if final_snapshot
                    else {"SkipFinalSnapshot": True})
    rds.delete_db_instance(**args)
    rds.get_waiter("db_instance_deleted").wait(DBInstanceIdentifier=r.id, WaiterConfig=WAIT)


def _delete_db_cluster(t: Target, r: Resource, *, final_snapshot: str | None, **_) -> None:
    from botocore.exceptions import ClientError

    rds = client(t, "rds")
    args: dict[str, Any] = {"DBClusterIdentifier": r.id}
    args.update({"FinalDBSnapshotIdentifier": f"{final_snapshot}-{r.id}"} if final_snapshot
                else {"SkipFinalSnapshot": True})
    rds.delete_db_cluster(**args)

    def gone() -> bool:
        try:
            rds.describe_db_clusters(DBClusterIdentifier=r.id)
        except ClientError:
            return True
        return False

    _wait(f"DB cluster {r.id} to go", gone)


def _delete_instance(t: Target, r: Resource, **_) -> None:
    ec2 = client(t, "ec2")
    ec2.terminate_instances(InstanceIds=[r.id])
    ec2.get_waiter("instance_terminated").wait(InstanceIds=[r.id], WaiterConfig=WAIT)


def _revoke_security_group_rules(t: Target, r: Resource, **_) -> None:
    """Rules naming other groups keep those from being deleted: every group's are revoked first."""
    ec2 = client(t, "ec2")
    sg = ec2.describe_security_groups(GroupIds=[r.id])["SecurityGroups"][0]
    if sg.get("IpPermissions"):
        ec2.revoke_security_group_ingress(GroupId=r.id, IpPermissions=sg["IpPermissions"])
    egress = [p for p in sg.get("IpPermissionsEgress", []) if p.get("UserIdGroupPairs")]
    if egress:
        ec2.revoke_security_group_egress(GroupId=r.id, IpPermissions=egress)


def _delete_route_table(t: Target, r: Resource, **_) -> None:
    ec2 = client(t, "ec2")
    for a in r.extra.get("associations", []):
        ec2.disassociate_route_table(AssociationId=a)
    ec2.delete_route_table(RouteTableId=r.id)


def _delete_internet_gateway(t: Target, r: Resource, **_) -> None:
    ec2 = client(t, "ec2")
    for vpc in r.extra.get("vpcs", []):
        ec2.detach_internet_gateway(InternetGatewayId=r.id, VpcId=vpc)
    ec2.delete_internet_gateway(InternetGatewayId=r.id)


def _delete_bucket(t: Target, r: Resource, **_) -> None:
    s3 = client(t, "s3")
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=r.id):
        objs = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
        if objs:
            s3.delete_objects(Bucket=r.id, Delete={"Objects": objs, "Quiet": True})
    s3.delete_bucket(Bucket=r.id)


def _delete_secret(t: Target, r: Resource, *, secret_recovery_days: int, **_) -> None:
    sm = client(t, "secretsmanager")
    if secret_recovery_days > 0:
        sm.delete_secret(SecretId=r.id, RecoveryWindowInDays=secret_recovery_days)
    else:
        sm.delete_secret(SecretId=r.id, ForceDeleteWithoutRecovery=True)


def _delete_table(t: Target, r: Resource, **_) -> None:
    """DeleteTable only starts the deletion (the table is DELETING for a while on AWS): waited for, so that
    what destroy finds afterwards is what is really left."""
    ddb = client(t, "dynamodb")
    ddb.delete_table(TableName=r.id)
    ddb.get_waiter("table_not_exists").wait(TableName=r.id, WaiterConfig=WAIT)


def _delete_instance_profile(t: Target, r: Resource, **_) -> None:
    iam = client(t, "iam")
    for role in r.extra.get("roles", []):
        iam.remove_role_from_instance_profile(InstanceProfileName=r.id, RoleName=role)
    iam.delete_instance_profile(InstanceProfileName=r.id)


def _delete_role(t: Target, r: Resource, **_) -> None:
    iam = client(t, "iam")
    for p in iam.list_attached_role_policies(RoleName=r.id)["AttachedPolicies"]:
        iam.detach_role_policy(RoleName=r.id, PolicyArn=p["PolicyArn"])
    for name in iam.list_role_policies(RoleName=r.id)["PolicyNames"]:
        iam.delete_role_policy(RoleName=r.id, PolicyName=name)
    for p in iam.list_instance_profiles_for_role(RoleName=r.id)["InstanceProfiles"]:
        iam.remove_role_from_instance_profile(InstanceProfileName=p["InstanceProfileName"], RoleName=r.id)
    iam.delete_role(RoleName=r.id)


def _simple(service: str, method: str, arg: str) -> Callable[..., None]:
    def call(t: Target, r: Resource, **_) -> None:
        getattr(client(t, service), method)(**{arg: r.id})
    return call


# kind -> how to delete it, in the order destroy deletes (what depends on others first).
DELETERS: dict[str, Callable[..., None]] = {
    "autoscaling-group": _delete_asg,
    "instance": _delete_instance,
    "load-balancer": _simple("elbv2", "delete_load_balancer", "LoadBalancerArn"),
    "target-group": _simple("elbv2", "delete_target_group", "TargetGroupArn"),
    "launch-template": _simple("ec2", "delete_launch_template", "LaunchTemplateId"),
    "db-instance": _delete_db_instance,
    "db-cluster": _delete_db_cluster,
    "db-subnet-group": _simple("rds", "delete_db_subnet_group", "DBSubnetGroupName"),
    "instance-profile": _delete_instance_profile,
    "iam-role": _delete_role,
    "secret": _delete_secret,
    "parameter": _simple("ssm", "delete_parameter", "Name"),
    "dynamodb-table": _delete_table,
    "s3-bucket": _delete_bucket,
    "route-table": _delete_route_table,
    "internet-gateway": _delete_internet_gateway,
    "security-group": _simple("ec2", "delete_security_group", "GroupId"),
    "subnet": _simple("ec2", "delete_subnet", "SubnetId"),
    "vpc": _simple("ec2", "delete_vpc", "VpcId"),
}
DELETE_ORDER = tuple(DELETERS)


def destroy(t: Target, resources: list[Resource], *, log: Callable[[str], None] = print,
            final_snapshot: str | None = None, secret_recovery_days: int = 7) -> list[Resource]:
    """Delete exactly `resources` (found by :func:`find` for this environment), dependents first.

    Security groups are emptied of their rules before any is deleted (the app group is named by the
    database group's rule). Returns what was deleted. A failure stops here: what was deleted is gone,
    the rest is left and named, and running again finishes the job.
    """
    if any(r.env != t.env for r in resources):
        other = sorted({r.env for r in resources if r.env != t.env})
        raise AwsError(f"refusing to destroy resources of {', '.join(other)} while destroying {t.env}; nothing "
                       f"was deleted.")
    unknown = sorted({r.kind for r in resources} - set(DELETERS))
    if unknown:
        raise AwsError(f"opsbook does not know how to delete {', '.join(unknown)}; nothing was deleted.")
    ordered = sorted(resources, key=lambda r: DELETE_ORDER.index(r.kind))
    deleted: list[Resource] = []
    revoked = False
    for r in ordered:
        try:
            if r.kind == "security-group" and not revoked:
                for g in (x for x in ordered if x.kind == "security-group"):
                    _revoke_security_group_rules(t, g)
                revoked = True
            DELETERS[r.kind](t, r, final_snapshot=final_snapshot, secret_recovery_days=secret_recovery_days)
        except Exception as e:
            left = [x.describe() for x in ordered if x not in deleted]
            raise AwsError(f"deleting {r.describe()} failed ({type(e).__name__}: {e}). Deleted so far: "
                           f"{len(deleted)} resource(s); left: " + "; ".join(left)
                           + f". Run `invoke env.destroy --env {t.env}` again to finish.") from e
        deleted.append(r)
        log(f"deleted {r.describe()}")
    return deleted
