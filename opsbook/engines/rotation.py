"""Rotation: taking app hosts out of the load balancer and putting them back, whichever it is.

Which load balancer an environment has is inventory configuration (``opsbook_lb_kind``): ``haproxy``
(lb hosts; the lab) or ``alb`` (an AWS Application Load Balancer's target group). The release asks
:func:`rotation_for` and uses the same calls for either:

- ``drain(hosts)`` before switching a batch, ``enable(hosts)`` once it switched (not called when the
  switch failed: the hosts stay out until put back);
- ``put_back(hosts=None)``: put these hosts back (default: every app host that answers /version), after a
  release that failed or was interrupted.
- ``status()``: app host -> {load balancer: state}, "UP" meaning in rotation and healthy.

With **haproxy** the drain and the re-enable happen on the lb hosts inside the switch playbook
(roles/app/tasks/switch.yml and rotation.yml, through haproxy's admin socket), in the same Ansible
run as the switch itself, so ``drain``, ``enable`` and ``put_back`` add nothing
around it; ``status``
reads every lb host's ``show stat``. With an **ALB** the controller does it through the AWS API: it
deregisters the hosts' instances from the environment's target group (found by its tags), waits
until draining has finished (the target group's deregistration delay lets in-flight requests end),
and after the switch registers them again and waits until the ALB's health check (GET /ping) finds
them healthy. An environment whose load balancer is an ALB has no lb hosts, so the switch playbook's
haproxy tasks loop over nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

from opsbook.core.errors import OpsbookError


class RotationError(OpsbookError):
    """Hosts could not be taken out of, or put back into, the load balancer."""


class Rotation(Protocol):
    kind: str

    def drain(self, hosts: list[str]) -> None: ...
    def enable(self, hosts: list[str]) -> None: ...
    def put_back(self, hosts: list[str] | None = None) -> None: ...
    def status(self) -> dict[str, dict[str, str]]: ...


class HaproxyRotation:
    """haproxy on the lb hosts: the switch playbook drains and re-enables in-band (see the module doc)."""

    kind = "haproxy"

    def __init__(self, env):
        self.env = env

    def drain(self, hosts: list[str]) -> None:
        return   # switch.yml drains each host on every lb host before switching it

    def enable(self, hosts: list[str]) -> None:
        return   # switch.yml re-enables each host once it serves the release

    def put_back(self, hosts: list[str] | None = None) -> None:
        return   # rotation.yml (run by the release after a failure) re-enables every answering host

    def status(self) -> dict[str, dict[str, str]]:
        from opsbook.engines import fleet

        return fleet.rotation(self.env)


# The states an ALB gives a target, in the words `invoke status` uses for haproxy's.
_ALB_STATES = {"healthy": "UP", "draining": "DRAIN", "unused": "MAINT", "unhealthy": "DOWN", "initial": "INITIAL",
               "unavailable": "DOWN", "unhealthy.draining": "DRAIN"}


class AlbRotation:
    """An Application Load Balancer's target group, driven through the AWS API (deregister, wait for
    draining, register, wait for healthy). Hosts are EC2 instances: the aws_ec2 inventory names them
    by instance id (or gives their `instance_id` host variable)."""

    kind = "alb"

    def __init__(self, env, *, drain_timeout: float | None = None, health_timeout: float | None = None,
                 poll_seconds: float = 2.0):
        from opsbook.engines import aws

        self.env = env
        self.target = aws.target(env)
        self.drain_timeout = float(drain_timeout if drain_timeout is not None
                                   else env.var("opsbook_release_drain_timeout", 30))
        self.health_timeout = float(health_timeout if health_timeout is not None
                                    else env.var("opsbook_release_health_timeout", 60))
        self.poll_seconds = poll_seconds
        self._tg: tuple[str, str, int] | None = None

    # -- where -------------------------------------------------------------------------------
    def target_group(self) -> tuple[str, str, int]:
        """(ARN, name, port) of the environment's app target group: the one tagged opsbook:role=tg-app."""
        if self._tg is None:
            from opsbook.engines import aws

            groups = [r for r in aws.find_load_balancing(self.target, self.env.name)
                      if r.kind == "target-group" and r.role == "tg-app"]
            if len(groups) != 1:
                found = "; ".join(r.describe() for r in groups) or "none"
                raise RotationError(
                    f"{self.env.name} needs exactly one target group tagged opsbook:role=tg-app for its ALB; found "
                    f"{found}. Nothing was changed. `invoke provision --env {self.env.name}` creates it; "
                    f"`invoke env.resources --env {self.env.name}` lists what is tagged.")
            tg = aws.client(self.target, "elbv2").describe_target_groups(TargetGroupArns=[groups[0].id])
            g = tg["TargetGroups"][0]
            self._tg = (g["TargetGroupArn"], g["TargetGroupName"], int(g["Port"]))
        return self._tg

    def _instance(self, host: str) -> str:
        try:
            return str(self.env.host_var(host, "instance_id", host))
        except OpsbookError:
            return host

    def _targets(self, hosts: list[str]) -> list[dict[str, object]]:
        _, _, port = self.target_group()
        return [{"Id": self._instance(h), "Port": port} for h in hosts]

    def _elb(self):
        from opsbook.engines import aws

        return aws.client(self.target, "elbv2")

    def _wait(self, waiter: str, hosts: list[str], timeout: float, what: str) -> None:
        from botocore.exceptions import WaiterError

        arn, name, _ = self.target_group()
        attempts = max(1, int(timeout / self.poll_seconds))
        try:
            self._elb().get_waiter(waiter).wait(TargetGroupArn=arn, Targets=self._targets(hosts),
                                                WaiterConfig={"Delay": self.poll_seconds, "MaxAttempts": attempts})
        except WaiterError as e:
            states = self.states(hosts)
            raise RotationError(
                f"{', '.join(hosts)} did not {what} in target group {name} within {timeout:.0f} s (states now: "
                + ", ".join(f"{h} {s}" for h, s in states.items())
                + f"; {e.last_response.get('Error', {}).get('Message', '') if e.last_response else ''}).") from e

    # -- the three calls -------------------------------------------------------------------
    def states(self, hosts: list[str] | None = None) -> dict[str, str]:
        """host -> the ALB's state for it (healthy, draining, unused when not registered, ...)."""
        arn, _, _ = self.target_group()
        by_id = {self._instance(h): h for h in hosts} if hosts is not None else None
        args: dict[str, object] = {"TargetGroupArn": arn}
        if hosts is not None:
            args["Targets"] = self._targets(hosts)
        out: dict[str, str] = {}
        for d in self._elb().describe_target_health(**args)["TargetHealthDescriptions"]:
            tid = d["Target"]["Id"]
            host = by_id.get(tid, tid) if by_id is not None else tid
            out[host] = d["TargetHealth"]["State"]
        if hosts is not None:
            for h in hosts:
                out.setdefault(h, "unused")
        return out

    def drain(self, hosts: list[str]) -> None:
        """Deregister the hosts and wait until draining is over (in-flight requests have finished)."""
        if not hosts:
            return
        arn, _, _ = self.target_group()
        self._elb().deregister_targets(TargetGroupArn=arn, Targets=self._targets(hosts))
        self._wait("target_deregistered", hosts, self.drain_timeout, "finish draining")

    def enable(self, hosts: list[str]) -> None:
        """Register the hosts and wait until the ALB's health check finds them healthy."""
        if not hosts:
            return
        arn, _, _ = self.target_group()
        self._elb().register_targets(TargetGroupArn=arn, Targets=self._targets(hosts))
        self._wait("target_in_service", hosts, self.health_timeout, "become healthy")

    def put_back(self, hosts: list[str] | None = None) -> None:
        if hosts is None:
            from opsbook.engines import fleet

            hosts = [h for h, version in fleet.served_versions(self.env).items() if version]
        self.enable(hosts)

    def entry_url(self) -> str:
        """Where clients reach the service: the environment's ALB (tagged opsbook:role=alb) on lb_http_port."""
        from opsbook.engines import aws

        albs = [r for r in aws.find_load_balancing(self.target, self.env.name)
                if r.kind == "load-balancer" and r.role == "alb"]
        if len(albs) != 1:
            found = "; ".join(r.describe() for r in albs) or "none"
            raise RotationError(f"{self.env.name} needs exactly one load balancer tagged opsbook:role=alb; found "
                                f"{found}. Nothing was changed. `invoke provision --env {self.env.name}` creates it.")
        return f"http://{albs[0].extra['dns']}:{int(self.env.var('lb_http_port', 80))}"

    def status(self) -> dict[str, dict[str, str]]:
        _, name, _ = self.target_group()
        apps = [h.name for h in self.env.hosts("app")]
        states = self.states(apps)
        return {h: {f"alb {name}": _ALB_STATES.get(states[h], states[h].upper())} for h in apps}


def rotation_for(env) -> Rotation:
    """The environment's rotation, as its inventory says (``opsbook_lb_kind``: haproxy by default)."""
    kind = env.var("opsbook_lb_kind", "haproxy")
    if kind == "haproxy":
        return HaproxyRotation(env)
    if kind == "alb":
        return AlbRotation(env)
    raise OpsbookError(f"opsbook_lb_kind for {env.name!r} is {kind!r}; it must be haproxy or alb. Fix "
                       f"{env.path}/group_vars/all/. Nothing was changed.")


@contextlib.contextmanager
def held_out(env, hosts: list[str]) -> Iterator[None]:
    """Take `hosts` out of the load balancer for the block (in-flight requests finish), and put them back
    after it whatever happens. A measurement with fewer app hosts (the scaling check's per-host capacity)
    uses it; a release drains in-band instead (see the module doc). haproxy: the lb hosts' admin socket
    (`set server <backend>/<host> state maint|ready`); an ALB: deregister and register the instances."""
    if not hosts:
        yield
        return
    if env.var("opsbook_lb_kind", "haproxy") == "alb":
        rot = AlbRotation(env)
        rot.drain(hosts)
        try:
            yield
        finally:
            rot.enable(hosts)
        return
    from opsbook.engines import ansible

    backend, socket = env.var("lb_backend_name"), env.var("lb_admin_socket")

    def state(value: str) -> None:
        commands = "; ".join(f"echo 'set server {backend}/{h} state {value}' | socat stdio {socket}" for h in hosts)
        answers = ansible.raw(env, "lb", commands)
        failed = [lb for lb, a in answers.items() if not a or a[0] != 0]
        if failed:
            raise RotationError(f"could not set {', '.join(hosts)} to {value} on {', '.join(failed)}; "
                                f"`invoke status --env {env.name}` shows how each load balancer sees each host, "
                                f"`ansible-playbook playbooks/rotation.yml` puts every answering host back.")

    state("maint")
    try:
        yield
    finally:
        state("ready")
