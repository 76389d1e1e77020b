"""End to end without AWS: `invoke release --env E` where E is an AWS environment whose control plane
is the moto server and whose instances are the lab's real hosts (moto keeps the private address an
instance is created with). The release goes through the aws_ec2 inventory plugin (hosts found by
their tags in moto), the account guard (STS), secrets from Secrets Manager, the DynamoDB lock and
the S3 record store, to real hosts over SSH, under the probe, with zero failed requests.

E is built for the run, outside the repository (OPSBOOK_INVENTORY_PATH), from the lab's inventory:
its hosts.yml replaced by an aws_ec2.yml, its secrets read from Secrets Manager instead of .lab/,
its lock and records in moto. Its database is a managed one, as in AWS: no db host in the inventory,
its address read from SSM Parameter Store (bl_api_db_address, as `invoke provision` publishes an RDS
endpoint), where the lab's db1 answers. Load balancing stays haproxy on lb1 (moto's ALB forwards
nothing).

As staging and prod are, E's hosts are reached through a bastion: the lab's db2 (which E does not
use) is the bastion instance, each host carries the opsbook:ssh-jump tag provisioning gives it, and
E's aws_ec2.yml composes the SSH arguments with staging's own expression (a ProxyJump). E's hosts
admit what its security groups would: SSH from the bastion only, the service port from the load
balancer only, the database from the app hosts only; so nothing in the release can reach them but
through the bastion (opsbook reads the versions they serve on the hosts, `opsbook_fleet_reads: ssh`,
and reaches the database through an app host, `opsbook_db_reach: ssh`). Afterwards the test gives the
controller its way back in and converges those hosts to the lab's configuration again.
"""

from __future__ import annotations

import shutil
import socket
import uuid

import boto3
import pytest
import yaml

from opsbook.core.inventory import INVENTORY_PATH_VARIABLE, load
from opsbook.core.paths import INVENTORIES, ROOT
from opsbook.engines import ansible, database
from opsbook.engines import fleet as fleets
from opsbook.engines.records.store import store_for
from tests.fixtures.aws_env import MOTO_ACCOUNT
from tests.fixtures.lab import haproxy_status, invoke, ssh

pytestmark = [pytest.mark.lab, pytest.mark.moto, pytest.mark.slow]

REGION = "us-east-1"


def _make_environment(root, name: str, endpoint: str, lab, bastion) -> None:
    """inventories-like directory `root/name`: the lab's inventory, its hosts found in moto by tags,
    reached through `bastion` (a lab host)."""
    path = root / name
    shutil.copytree(INVENTORIES / "lab", path)
    staging = yaml.safe_load((INVENTORIES / "staging" / "aws_ec2.yml").read_text())
    # What an operator's ~/.ssh/config holds for an AWS environment: the key and host-key policy for
    # the bastion (ssh passes -F to the ProxyJump leg, and no -o option) and the hosts behind it.
    ssh_config = root.parent / f"{name}-ssh_config"   # beside, not in, the inventory (not a source)
    ssh_config.write_text("\n".join([
        "Host *", f"  IdentityFile {ROOT / '.lab' / 'ssh' / 'id_ed25519'}", "  IdentitiesOnly yes",
        "  BatchMode yes", "  StrictHostKeyChecking no", "  UserKnownHostsFile /dev/null", "  LogLevel ERROR", ""]))
    (path / "hosts.yml").write_text(yaml.safe_dump({"all": {"children": {"lb": {}, "app": {}, "db": {}}}}))
    (path / "aws_ec2.yml").write_text(yaml.safe_dump({
        "plugin": staging["plugin"],
        "regions": [REGION],
        "filters": {"tag:opsbook:env": name, "tag:opsbook:managed-by": "opsbook",
                    "instance-state-name": "running"},
        "exclude_filters": staging["exclude_filters"],   # the bastion is the way in, not a host
        "hostnames": ["tag:Name"],            # the lab's names, which its haproxy backend knows
        "compose": {
            "ansible_host": staging["compose"]["ansible_host"],
            # staging's ProxyJump expression, after the operator's ssh config and a control socket of
            # this environment's own (a lab connection kept open to the same host is not reused).
            "ansible_ssh_common_args": (f"'-F {ssh_config} -o ControlPath=/tmp/opsbook-ssh-{name}-%C ' ~ "
                                        f"({staging['compose']['ansible_ssh_common_args']})"),
        },
        "strict": staging["strict"],
        "groups": {g: f"tags.get('opsbook:role') == '{g}'" for g in ("app", "lb", "db")},
    }))
    secret = ("{{{{ lookup('amazon.aws.secretsmanager_secret', opsbook_aws_secret_prefix ~ '{}', "
              "region=opsbook_aws_region) }}}}")
    (path / "group_vars" / "all" / "zz-aws.yml").write_text(yaml.safe_dump({
        "opsbook_env_kind": "aws",
        "opsbook_aws_account_id": MOTO_ACCOUNT,
        "opsbook_aws_region": REGION,
        "opsbook_aws_profile": "",
        "opsbook_aws_endpoint_url": endpoint,
        "opsbook_aws_secret_prefix": f"opsbook/{name}/",
        "opsbook_record_store": f"s3://opsbook-records-{name}/records",
        "opsbook_lock_backend": "dynamodb",
        "opsbook_lock_table": f"opsbook-locks-{name}",
        "bl_api_db_address": ("{{ lookup('amazon.aws.ssm_parameter', '/opsbook/' ~ opsbook_env_name ~ '/db-address', "
                              "region=opsbook_aws_region) }}"),
        "vault_bl_api_db_password": secret.format("bl_api_db_password"),
        "vault_opsbook_db_admin_password": secret.format("opsbook_db_admin_password"),
        "opsbook_fleet_reads": "ssh",
        "opsbook_db_reach": "ssh",
        # The security groups: SSH from the bastion only; the service port (group_vars/app below) from
        # the load balancer only.
        "common_firewall_admin_sources": [f"{bastion.address}/32"],
    }))
    (path / "group_vars" / "app" / "zz-aws.yml").write_text(yaml.safe_dump({"common_firewall_allow": [{
        "port": "{{ bl_api_port }}", "from": "{{ groups['lb'] | map('extract', hostvars, 'ansible_host') | list }}",
        "why": "bl-api: the load balancer (its security group)"}]}))

    # The control plane: the lab's hosts as instances, the secrets, the lock table, the records bucket.
    ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name=REGION)
    vpc = ec2.create_vpc(CidrBlock="10.89.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=lab.var("opsbook_lab_subnet"))["Subnet"]["SubnetId"]
    def instance(address: str, role: str, host_name: str, jump: str | None = None) -> None:
        tags = {"opsbook:env": name, "opsbook:managed-by": "opsbook", "opsbook:role": role, "Name": host_name,
                **({"opsbook:ssh-jump": jump} if jump else {})}
        ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="t3.small", SubnetId=subnet,
                          PrivateIpAddress=address, TagSpecifications=[{"ResourceType": "instance", "Tags": [
                              {"Key": k, "Value": v} for k, v in tags.items()]}])

    instance(bastion.address, "bastion", "bastion")
    for host in lab.hosts():
        role = next((g for g in ("app", "lb", "db") if g in host.groups), None)
        if role in (None, "db"):   # the database is a managed one (below); db2 is the bastion here
            continue
        instance(host.address, role, host.name, jump=f"root@{bastion.address}")   # as aws_env tags them
    boto3.client("ssm", endpoint_url=endpoint, region_name=REGION).put_parameter(
        Name=f"/opsbook/{name}/db-address", Value=lab.host("db1").address, Type="String",
        Tags=[{"Key": "opsbook:env", "Value": name}, {"Key": "opsbook:managed-by", "Value": "opsbook"},
              {"Key": "opsbook:role", "Value": "db-address"}])
    sm = boto3.client("secretsmanager", endpoint_url=endpoint, region_name=REGION)
    for var, value in lab.secret_values().items():   # the lab's databases know these passwords
        sm.create_secret(Name=f"opsbook/{name}/{var.removeprefix('vault_')}", SecretString=value)
    boto3.client("dynamodb", endpoint_url=endpoint, region_name=REGION).create_table(
        TableName=f"opsbook-locks-{name}", KeySchema=[{"AttributeName": "lock_id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "lock_id", "AttributeType": "S"}], BillingMode="PAY_PER_REQUEST")
    boto3.client("s3", endpoint_url=endpoint, region_name=REGION).create_bucket(Bucket=f"opsbook-records-{name}")


def _refused(address: str, port: int) -> bool:
    """True when a TCP connection from here to address:port is refused or rejected (the firewall)."""
    try:
        socket.create_connection((address, port), timeout=5).close()
    except OSError:
        return True
    return False


def test_a_release_to_an_aws_environment_of_real_hosts_through_its_bastion(lab_env, fleet, aws, monkeypatch,
                                                                           tmp_path):
    _, b = fleet   # the lab serves the other one; this environment's release brings b
    name = f"awslab-{uuid.uuid4().hex[:6]}"
    bastion = lab_env.host("db2")
    _make_environment(tmp_path, name, aws, lab_env, bastion)
    monkeypatch.setenv(INVENTORY_PATH_VARIABLE, str(tmp_path))
    monkeypatch.setenv("AWS_URL", aws)
    env = load(name)
    assert env.kind == "aws"
    assert sorted(h.name for h in env.hosts("app")) == sorted(h.name for h in lab_env.hosts("app"))
    assert {h.address for h in env.hosts()} < {h.address for h in lab_env.hosts()}
    assert bastion.address not in {h.address for h in env.hosts()}   # the way in, not a host
    assert env.hosts("db") == []
    assert database.address(env) == lab_env.host("db1").address
    gateway = lab_env.var("opsbook_lab_gateway")
    behind = [h for h in lab_env.hosts() if h.address in {x.address for x in env.hosts()}]
    try:
        # The security groups' rules, as provisioning makes them: SSH to the hosts from the bastion; the
        # database from the app hosts only (as RDS, it takes the admin role from them, and no longer
        # from here).
        for h in behind:
            ssh(h.name, f"nft insert rule inet opsbook input ip saddr {bastion.address} tcp dport 22 accept")
        apps = [h.address for h in env.hosts("app")]
        ssh("db1", "set -e; v=$(ls /etc/postgresql); f=/etc/postgresql/$v/main/pg_hba.conf; "
            + "; ".join(f"echo 'host all opsbook {a}/32 scram-sha-256' >> $f" for a in apps)
            + f"; systemctl reload postgresql@$v-main; nft insert rule inet opsbook input ip saddr {gateway} tcp dport "
            + f"{lab_env.var('bl_api_db_port')} reject")
        assert _refused(lab_env.host("db1").address, lab_env.var("bl_api_db_port"))

        proc = invoke("release", "--env", name, "--version", b)
        out = proc.stdout + proc.stderr
        failing = [line for line in out.splitlines() if line.startswith(("FAILED", "E  ", "fatal:", "ERROR"))]
        figures = [e.get("figures") for e in store_for(env).ledger() if e["runbook"] == "release"]
        assert proc.returncode == 0, "\n".join(failing[:80]) + "\n...\n" + out[-3000:] + f"\n{figures}"

        # The release converged the hosts to E's firewall: from here, neither SSH nor the service
        # port answers, so all of it went through the bastion; every host sees its SSH session come
        # from the bastion's address.
        app1 = lab_env.host("app1").address
        assert _refused(app1, 22)
        assert _refused(app1, lab_env.var("bl_api_port"))
        assert _refused(lab_env.host("lb1").address, 22)
        assert _refused(lab_env.host("db1").address, lab_env.var("bl_api_db_port"))   # opsbook's went via app
        clients = ansible.raw(env, "all", "echo $SSH_CLIENT")
        assert {h: (a[1].split() or [""])[0] if a else None for h, a in clients.items()} == {
            h.name: bastion.address for h in behind}, clients

        # The lab's real hosts serve b (read on each host, over SSH through the bastion), each UP in
        # haproxy; the record is in the environment's bucket (moto's S3), with the probe's figures:
        # no failed request, no lost acknowledged write.
        served = fleets.served_versions(env)
        assert set(served.values()) == {b}, served.reasons
        assert {lbs["lb1"] for lbs in fleets.rotation(env).values()} == {"UP"}
        releases = [e for e in store_for(env).ledger() if e["runbook"] == "release"]
        assert [e["outcome"] for e in releases] == ["succeeded"]
        figures = releases[0]["figures"]
        assert figures["version"] == b
        assert figures["requests"] > 0, figures
        # Its configuration (a new inventory) differs from the one the hosts were converged to: the
        # release converged them under the probe, and not one request failed for it.
        assert set(figures["converged"]) >= {h.name for h in lab_env.hosts("app")}, figures
        assert figures["failed_requests"] == 0, figures
        assert figures["missing_acknowledged_writes"] == 0, figures
        # The lock was taken and released in DynamoDB: free again.
        assert "free" in invoke("lock", "--env", name, check=True).stdout
        # The lab's own records did not get this release: it belongs to the other environment.
        assert not any(e["id"] == releases[0]["id"] for e in store_for(lab_env).ledger())
    finally:
        # The controller's way back in (through the bastion), then the lab's own configuration on
        # those hosts again, and the firewall each host's configuration says loaded again (a rule
        # added by hand is not in any file, so no converge would take it away). Killed before this,
        # the hosts do not answer the controller's SSH, and `invoke lab.up` (the suite's first step)
        # recreates them.
        ansible.raw(env, "all", f"nft insert rule inet opsbook input ip saddr {gateway} accept")
        monkeypatch.delenv(INVENTORY_PATH_VARIABLE)
        touched = [*(h.name for h in behind), "db1"]
        invoke("provision", "--env", "lab", "--hosts", ",".join(touched), check=True)
        for h in touched:
            ssh(h, "systemctl reload nftables")
        assert haproxy_status("app1") == "UP"
