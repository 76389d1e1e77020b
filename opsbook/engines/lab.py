"""The lab: real Linux hosts (podman containers booting systemd + sshd) on this machine.

The hosts, their addresses and the network come from `inventories/lab/` (the single source of
environment configuration); this module only makes the machine match it. Facts behind the
podman flags are in shared/LAB-NOTES.md (runc, explicit ulimits, --privileged, stale hosts).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from opsbook.core.errors import OpsbookError
from opsbook.core.inventory import Env
from opsbook.core.paths import ROOT

LABEL = "opsbook.lab"
ENV_LABEL = "opsbook.env"   # which lab environment a host belongs to (lab, lab-staging share the network)
CONTAINERS_CONF = ROOT / "lab" / "containers.conf"
SUITE = "bookworm"
# What the baked image holds, like an AMI: everything the roles need, so hosts never fetch
# packages at provision time (the lab network reaches nothing but itself).
BASE_PACKAGES = [
    "python3", "openssh-server", "systemd", "systemd-sysv", "iproute2", "sudo", "ca-certificates",
    "dbus",
]
EXTRA_PACKAGES = [
    "postgresql-15", "postgresql-client-15", "haproxy", "python3-venv", "python3-psycopg2",
    "python3-apt", "curl", "socat", "procps", "less", "iputils-ping", "netcat-openbsd", "tzdata",
    "locales", "rsync", "nftables", "pgbackrest", "btrfs-progs",
]
IMAGE_RECIPE_VERSION = "3"   # bump when the bake steps below change


class LabError(OpsbookError):
    pass


def log(msg: str) -> None:
    print(f"[lab] {msg}", flush=True)


# --- podman -------------------------------------------------------------------------------
def podman(*args: str, check: bool = True, capture: bool = True, input: bytes | None = None,
           timeout: float | None = 300) -> subprocess.CompletedProcess:
    if not shutil.which("podman"):
        raise LabError(
            "podman is not installed, so the lab cannot start. Nothing was changed. "
            "Run `./run invoke lab.up` (it installs podman, runc and debootstrap) or "
            "`apt-get install podman runc debootstrap`."
        )
    env = dict(os.environ, CONTAINERS_CONF=str(CONTAINERS_CONF))
    proc = subprocess.run(["podman", *args], capture_output=capture, input=input, env=env,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        err = (proc.stderr or b"").decode(errors="replace").strip()
        raise LabError(f"`podman {' '.join(args[:3])} …` failed (exit {proc.returncode}): {err}")
    return proc


def image_name() -> str:
    spec = json.dumps([IMAGE_RECIPE_VERSION, SUITE, BASE_PACKAGES, EXTRA_PACKAGES]).encode()
    return f"localhost/opsbook-lab:{hashlib.sha256(spec).hexdigest()[:12]}"


def lab_dir(env: Env) -> Path:
    """Where the lab keeps its SSH key, generated secrets and image build (`opsbook_lab_dir`)."""
    return Path(env.var("opsbook_lab_dir")).resolve()


def debian_mirror() -> str:
    """The Debian mirror this machine's apt sources name (the lab image uses the same one)."""
    candidates = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        for m in re.finditer(r"(?:^URIs:\s*|^deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text, re.M):
            uri = m.group(1)
            if "security" not in uri and uri.startswith("http"):
                return uri
    raise LabError("this machine's apt sources (/etc/apt/sources.list, /etc/apt/sources.list.d/) name no Debian "
                   "mirror, and the lab image is baked from the mirror this machine uses. Nothing was changed. "
                   "Add the mirror to the apt sources (`apt-get update` must work), then run `invoke lab.up`.")


# --- the image ----------------------------------------------------------------------------
def ensure_image(env: Env, rebuild: bool = False) -> str:
    """Bake the host image (debootstrap + podman import) unless a matching one is cached."""
    name = image_name()
    if not rebuild and podman("image", "exists", name, check=False).returncode == 0:
        return name
    if not shutil.which("debootstrap"):
        raise LabError("debootstrap is not installed; run `./run invoke lab.image` (it installs it). "
                       "Nothing was changed.")
    build = lab_dir(env) / "image-build"
    rootfs = build / "rootfs"
    if build.exists():
        shutil.rmtree(build)
    rootfs.mkdir(parents=True)
    mirror = debian_mirror()
    t0 = time.monotonic()
    log(f"baking lab image {name} from {mirror} (about 2 minutes, once)")
    log("step 1/3: debootstrap minbase")
    _run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE,
          str(rootfs), mirror], "debootstrap")
    log("step 2/3: install service packages in the image")
    shutil.copy("/etc/resolv.conf", rootfs / "etc/resolv.conf")
    (rootfs / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")   # no daemons in the chroot
    (rootfs / "usr/sbin/policy-rc.d").chmod(0o755)
    _run(["chroot", str(rootfs), "apt-get", "install", "-y", "-q", "--no-install-recommends",
          *EXTRA_PACKAGES], "apt-get install in the image", env={"DEBIAN_FRONTEND": "noninteractive"})
    _customize_rootfs(rootfs)
    log("step 3/3: podman import")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
    env = dict(os.environ, CONTAINERS_CONF=str(CONTAINERS_CONF))
    imp = subprocess.run(
        ["podman", "import", "--change", "CMD=/sbin/init", "--change", "STOPSIGNAL=SIGRTMIN+3",
         "-", name], stdin=tar.stdout, capture_output=True, env=env, check=False)
    tar.wait()
    if imp.returncode != 0 or tar.returncode != 0:
        raise LabError(f"podman import failed: {imp.stderr.decode(errors='replace')}")
    shutil.rmtree(build, ignore_errors=True)
    log(f"image {name} baked in {time.monotonic() - t0:.0f}s")
    return name


def _customize_rootfs(rootfs: Path) -> None:
    (rootfs / "usr/sbin/policy-rc.d").unlink()
    (rootfs / "etc/resolv.conf").unlink(missing_ok=True)
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        key.unlink()   # every host gets its own host keys at first boot (unit below)
    unit = rootfs / "etc/systemd/system/ssh-host-keys.service"
    unit.write_text(
        "[Unit]\nDescription=Generate this host's SSH host keys\nBefore=ssh.service\n"
        "ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key\n\n"
        "[Service]\nType=oneshot\nExecStart=/usr/bin/ssh-keygen -A\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
    wants = rootfs / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "ssh-host-keys.service").symlink_to("/etc/systemd/system/ssh-host-keys.service")
    # The image's packages start their default services; the roles decide what runs where.
    for svc in ("postgresql.service", "haproxy.service"):
        link = wants / svc
        if link.is_symlink():
            link.unlink()
    (rootfs / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
    (rootfs / "etc/machine-id").write_text("")   # systemd makes one per host at boot


def _run(cmd: list[str], what: str, env: dict | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, env=dict(os.environ, **(env or {})), check=False)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).decode(errors="replace").strip().splitlines()[-15:]
        raise LabError(f"{what} failed (exit {proc.returncode}); nothing was imported. Output:\n"
                       + "\n".join(tail))


# --- hosts --------------------------------------------------------------------------------
@dataclass
class LabHost:
    name: str
    address: str
    container: str
    data_volume: str | None = None   # database hosts: a podman volume that outlives the container


# Where a database host keeps its data: on a named volume, so recreating a stale db host (lab.up)
# keeps its databases, as a replaced EC2 instance keeps an EBS volume.
DATA_PATH = "/var/lib/postgresql"


def hosts(env: Env) -> list[LabHost]:
    return [LabHost(h.name, h.address, f"opsbook-lab-{h.name}",
                    f"opsbook-lab-{h.name}-data" if "db" in h.groups else None) for h in env.hosts()]


def network(env: Env) -> tuple[str, str, str]:
    return env.var("opsbook_lab_network"), env.var("opsbook_lab_subnet"), env.var("opsbook_lab_gateway")


def _inspect(container: str) -> dict | None:
    proc = podman("container", "inspect", container, check=False)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout)[0]


def _is_live(info: dict) -> bool:
    """Running according to podman *and* its init process exists (podman's state can be stale)."""
    state = info.get("State", {})
    pid = state.get("Pid") or 0
    return bool(state.get("Running")) and pid > 0 and Path(f"/proc/{pid}").exists()


def _remove(container: str) -> None:
    # A host whose processes were killed still shows `Up`; the first rm fails and marks it
    # exited, the second removes it (LAB-NOTES.md).
    for _ in range(3):
        if podman("rm", "-f", "-t", "5", container, check=False).returncode == 0:
            return
        if _inspect(container) is None:
            return
    raise LabError(f"could not remove stale lab host container {container}; "
                   f"try `podman rm -f {container}` by hand, then `invoke lab.up` again.")


def ensure_keys_and_secrets(env: Env) -> tuple[Path, bool]:
    """The lab's SSH key and generated secrets under .lab/ (0600). Returns (key, changed)."""
    base = lab_dir(env)
    changed = False
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    base.chmod(0o700)   # keys and secrets: nobody else on this machine reads them
    (base / "ssh").mkdir(parents=True, exist_ok=True, mode=0o700)
    key = base / "ssh" / "id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "opsbook-lab", "-f", str(key)],
                       check=True)
        changed = True
    key.chmod(0o600)
    secrets_dir = base / "secrets"
    secrets_dir.mkdir(exist_ok=True, mode=0o700)
    for name in env.secret_names():
        f = secrets_dir / name.removeprefix("vault_")
        if not f.exists():
            fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(24))
            changed = True
        f.chmod(0o600)
    return key, changed


def _ensure_network(env: Env, dry_run: bool) -> bool:
    name, subnet, gateway = network(env)
    if podman("network", "exists", name, check=False).returncode == 0:
        info = json.loads(podman("network", "inspect", name).stdout)[0]
        subnets = [s.get("subnet") for s in info.get("subnets", [])]
        if subnet not in subnets:
            raise LabError(f"podman network {name} exists with subnets {subnets}, not {subnet} as "
                           f"inventories/lab says. Nothing was changed. Run `invoke lab.down` and retry.")
        return False
    want = ipaddress.ip_network(subnet)
    for other in json.loads(podman("network", "ls", "--format", "json").stdout or "[]"):
        for s in other.get("subnets") or []:
            if s.get("subnet") and ipaddress.ip_network(s["subnet"]).overlaps(want):
                raise LabError(
                    f"the lab subnet {subnet} is already taken by podman network {other.get('name')!r}. "
                    f"Nothing was changed. Remove that network (`podman network rm {other.get('name')}`) "
                    f"or set another opsbook_lab_subnet (and host addresses) in inventories/lab/."
                )
    for line in subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True,
                               check=False).stdout.splitlines():
        m = re.search(r"inet (\S+)", line)
        if m and ipaddress.ip_interface(m.group(1)).network.overlaps(want):
            raise LabError(f"the lab subnet {subnet} overlaps an address of this machine ({line.split()[1]}: "
                           f"{m.group(1)}). Nothing was changed. Choose another opsbook_lab_subnet in "
                           f"inventories/lab/group_vars/all/main.yml.")
    if dry_run:
        log(f"would create network {name} ({subnet})")
        return True
    podman("network", "create", "--subnet", subnet, "--gateway", gateway, "--label", f"{LABEL}=1", name)
    log(f"created network {name} ({subnet})")
    return True


def up(env: Env, dry_run: bool = False) -> bool:
    """Make the lab match the inventory. Returns True when something changed."""
    podman("version", "--format", "{{.Client.Version}}")   # fails clearly without podman
    changed = _ensure_network(env, dry_run)
    if dry_run:
        for h in hosts(env):
            info = _inspect(h.container)
            state = "running" if info and _is_live(info) else ("stale" if info else "absent")
            if state != "running":
                log(f"would (re)create {h.name} at {h.address} ({state})")
        return changed
    image = ensure_image(env)
    key, secrets_changed = ensure_keys_and_secrets(env)
    changed |= secrets_changed
    pub = key.with_suffix(".pub").read_bytes()
    net_name = network(env)[0]
    lab_hosts = hosts(env)
    infos = {h.name: _inspect(h.container) for h in lab_hosts}
    answering = _answering([h for h in lab_hosts if infos[h.name] and _is_live(infos[h.name])], key)
    for h in lab_hosts:
        info = infos[h.name]
        if info and _is_live(info):
            older = info.get("ImageName") not in (image, None)
            if h.name in answering and not older:
                continue
            if older:
                # Like an instance replaced from a new AMI: what the roles expect to find installed
                # (pgbackrest, ...) is in the new image only. A database host keeps its data volume.
                log(f"{h.name}: runs an older image ({info.get('ImageName')}); recreating it from {image}"
                    + (" (its data volume is kept)" if h.data_volume else ""))
                _remove(h.container)
                info = None
            else:
                # Running but not answering this checkout's key: made by another checkout, whose secrets
                # (database passwords) it holds, or stale in a way podman cannot see (its pid was reused).
                # Either way it is recreated from the image, like a replaced instance; a database host
                # keeps its data volume, and the next release provisions it with this checkout's secrets.
                log(f"{h.name}: running, but does not answer this checkout's SSH key (another checkout's lab, "
                    f"or stale); recreating it")
                _remove(h.container)
                info = None
        if info:
            log(f"{h.name}: container exists but is not running; recreating it")
            _remove(h.container)
        _create(h, image, net_name, env.name)
        _install_key(env, h, pub)
        podman("start", h.container)
        log(f"{h.name}: started at {h.address}")
        changed = True
    if changed:
        wait_for_ssh(env, key)
    else:
        log("lab is up; nothing changed")
    return changed


def _create(h: LabHost, image: str, net_name: str, env_name: str) -> None:
    volume = []
    if h.data_volume:
        if podman("volume", "exists", h.data_volume, check=False).returncode != 0:
            podman("volume", "create", "--label", f"{LABEL}=1", h.data_volume)
        volume = ["--volume", f"{h.data_volume}:{DATA_PATH}"]   # a new volume starts as the image's copy
    podman("create", "--name", h.container, "--hostname", h.name, "--network", net_name,
           "--ip", h.address, "--privileged", "--label", f"{LABEL}=1", "--label", f"opsbook.host={h.name}",
           "--label", f"{ENV_LABEL}={env_name}",
           *volume, image, "/sbin/init")


def _answering(live: list[LabHost], key: Path) -> set[str]:
    """Names of the hosts that answer SSH, all asked at once (one round trip for the fleet)."""
    with ThreadPoolExecutor(max_workers=max(1, len(live))) as pool:
        answers = pool.map(lambda h: ssh_answers(h.address, key, timeout=3), live)
        return {h.name for h, ok in zip(live, answers, strict=True) if ok}


def _install_key(env: Env, h: LabHost, pub: bytes) -> None:
    authorized = lab_dir(env) / "ssh" / "authorized_keys"
    authorized.write_bytes(pub)
    authorized.chmod(0o600)
    podman("cp", str(authorized), f"{h.container}:/root/.ssh/authorized_keys")


def ssh_answers(address: str, key: Path, timeout: float = 5) -> bool:
    proc = subprocess.run(
        ["ssh", "-i", str(key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", f"ConnectTimeout={int(timeout)}",
         f"root@{address}", "true"],
        capture_output=True, timeout=timeout + 5, check=False)
    return proc.returncode == 0


def _port_open(address: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_ssh(env: Env, key: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(hosts(env))
    while waiting and time.monotonic() < deadline:
        waiting = [h for h in waiting if not (_port_open(h.address, 22) and ssh_answers(h.address, key))]
        if waiting:
            time.sleep(1)
    if waiting:
        names = ", ".join(h.name for h in waiting)
        raise LabError(f"lab hosts {names} did not answer SSH within {timeout:.0f}s. They were left running; "
                       f"look with `invoke lab.status` and `podman logs opsbook-lab-<host>`.")


def _owned(env: Env) -> tuple[list[str], list[str]]:
    """(this environment's lab containers, the other owners of lab containers on this machine)."""
    rows = podman("ps", "-a", "--filter", f"label={LABEL}=1", "--format",
                  "{{.Names}}\t{{index .Labels \"" + ENV_LABEL + "\"}}").stdout.decode().splitlines()
    names = {h.container for h in hosts(env)}
    listed, others = [], set()
    for row in rows:
        name, _, owner = row.partition("\t")
        owner = owner.strip()
        if owner in ("", "<no value>"):
            # made before hosts carried their environment: this one's if its inventory names it
            owner = env.name if name in names else f"{name} (unlabelled: `podman rm -f {name}` removes it)"
        if owner == env.name:
            listed.append(name)
        else:
            others.add(owner)
    return listed, sorted(others)


def _remove_network(env: Env, others: list[str], dry_run: bool) -> None:
    """The lab network goes with the last lab environment's hosts, and only when opsbook made it."""
    net_name = network(env)[0]
    if podman("network", "exists", net_name, check=False).returncode != 0:
        return
    info = json.loads(podman("network", "inspect", net_name).stdout)[0]
    if (info.get("labels") or {}).get(LABEL) != "1":
        log(f"network {net_name} was not created by opsbook; left in place")
    elif others:
        log(f"network {net_name} kept: {', '.join(others)} still has hosts on it (`invoke lab.down --env "
            f"ENV` removes an environment's)")
    elif dry_run:
        log(f"would remove network {net_name}")
    else:
        podman("network", "rm", "-f", net_name)
        log(f"removed network {net_name}")


def down(env: Env, dry_run: bool = False) -> None:
    """Remove this lab environment's hosts and their data volumes (those labelled as its own, or,
    made before hosts carried their environment, named by its inventory), and the network once no
    other lab environment's host uses it; keep the image and .lab/."""
    listed, others = _owned(env)
    for name in listed:
        if dry_run:
            log(f"would remove {name}")
        else:
            _remove(name)
            log(f"removed {name}")
    mine = {h.data_volume for h in hosts(env) if h.data_volume}
    volumes = podman("volume", "ls", "--filter", f"label={LABEL}=1", "--format", "{{.Name}}").stdout.decode().split()
    for name in volumes:
        if name not in mine:
            continue
        if dry_run:
            log(f"would remove volume {name}")
        else:
            podman("volume", "rm", "-f", name)
            log(f"removed volume {name}")
    _remove_network(env, others, dry_run)
    if not listed:
        log(f"no {env.name} hosts were running")


def status(env: Env) -> list[dict]:
    key = lab_dir(env) / "ssh" / "id_ed25519"
    rows = []
    for h in hosts(env):
        info = _inspect(h.container) if shutil.which("podman") else None
        if info is None:
            state = "absent"
        elif _is_live(info):
            state = "running"
        else:
            state = "stale" if info.get("State", {}).get("Running") else info.get("State", {}).get("Status", "?")
        answers = state == "running" and key.exists() and ssh_answers(h.address, key, timeout=3)
        rows.append({"host": h.name, "address": h.address, "container": state, "ssh": answers})
    return rows


def print_status(env: Env) -> None:
    rows = status(env)
    print(f"{'host':<8} {'address':<14} {'container':<10} ssh")
    for r in rows:
        print(f"{r['host']:<8} {r['address']:<14} {r['container']:<10} {'answers' if r['ssh'] else 'no'}")
