"""Environments: read from `inventories/<env>/`, the only source of environment configuration.

Python reads the same files Ansible reads, through Ansible's own inventory and variable
machinery (InventoryManager, VariableManager, Templar), so a value means the same thing to a
playbook and to opsbook. Variables whose name starts with ``vault_`` are secrets.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opsbook.core.errors import OpsbookError
from opsbook.core.paths import INVENTORIES, INVENTORY_PLUGINS, PLAYBOOKS


class UnknownEnvironment(OpsbookError):
    pass


# The process variable that carries the environment's name to Ansible's side: the aws_ec2 inventory
# plugin's tag filter and the opsbook_env_name default in group_vars read it (opsbook sets it for
# every Ansible process it starts, and while it parses an inventory itself).
ENV_NAME_VARIABLE = "OPSBOOK_ENV_NAME"


def default_env() -> str:
    """The default environment's name, as invoke.yaml names it (`opsbook.env`): the one place it is set."""
    import yaml

    from opsbook.core.paths import ROOT

    name = ((yaml.safe_load((ROOT / "invoke.yaml").read_text()) or {}).get("opsbook") or {}).get("env")
    if not name:
        raise OpsbookError("invoke.yaml names no default environment (opsbook.env); pass one explicitly.")
    return str(name)


# Directories of inventories besides the repository's own (like ANSIBLE_ROLES_PATH: colon-separated):
# an organization's private inventories, or a test's environment built for one run. The
# repository's inventories/ wins a name both hold.
INVENTORY_PATH_VARIABLE = "OPSBOOK_INVENTORY_PATH"


def _inventory_dirs() -> dict[str, Path]:
    """Environment name -> its inventory directory, from inventories/ and OPSBOOK_INVENTORY_PATH."""
    found: dict[str, Path] = {}
    extra = [Path(d) for d in os.environ.get(INVENTORY_PATH_VARIABLE, "").split(os.pathsep) if d]
    for root in [INVENTORIES, *extra]:
        if not root.is_dir():
            continue
        for p in sorted(root.iterdir()):
            if p.is_dir() and not p.name.startswith(".") and p.name not in found:
                found[p.name] = p
    return found


def environments() -> list[str]:
    """Names of the environments that exist (directories under inventories/ and OPSBOOK_INVENTORY_PATH)."""
    return sorted(_inventory_dirs())


# A purpose environment (`invoke env.create --name N --like staging`) is named <like>-<N>: its
# inventory is the `like` environment's, read under its own name (every name-dependent value in
# group_vars derives from opsbook_env_name; the aws_ec2 plugin filters on it), and AWS holds the
# rest in its resources' tags. The name says which inventory it is like, so nothing is stored here.
# At most 21 characters in all: the longest AWS name made from it (an ALB's) has a 32-character limit.
ENV_NAME = re.compile(r"^[a-z][a-z0-9-]{1,20}$")
PURPOSE_SUFFIX = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


def purpose_parts(name: str) -> tuple[str, str] | None:
    """(like, purpose) when `name` is a purpose environment of an inventory (`staging-loadtest` ->
    ("staging", "loadtest")), else None. Only the shape is checked here (not that it was created)."""
    names = environments()
    if name in names or not ENV_NAME.match(name):
        return None
    for like in sorted(names, key=len, reverse=True):
        suffix = name[len(like) + 1:] if name.startswith(like + "-") else ""
        if suffix and PURPOSE_SUFFIX.match(suffix):
            return like, suffix
    return None


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    groups: tuple[str, ...]
    vars: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)


class Env:
    """One environment: its hosts by group and its variables, rendered like Ansible renders them."""

    def __init__(self, name: str, path: Path | None = None, like: str | None = None):
        """`like`: this is a purpose environment read through that environment's inventory (`path`)."""
        dirs = _inventory_dirs() if path is None else {}
        if path is None and name not in dirs:
            parts = purpose_parts(name)
            if parts is None:
                raise UnknownEnvironment(
                    f"unknown environment {name!r}; environments that exist: {', '.join(environments())} "
                    f"(and purpose environments named <env>-<purpose>, made by `invoke env.create`). "
                    f"Nothing was changed. Pick one of those with --env"
                    # (no such hint for a name that is no directory name: "../lab", "lab/")
                    + (f", or add inventories/{name}/." if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name) else ".")
                )
            like = parts[0]
        if path is None:
            path = dirs[like or name]
        from ansible.inventory.manager import InventoryManager
        from ansible.parsing.dataloader import DataLoader
        from ansible.plugins.loader import init_plugin_loader
        from ansible.vars.manager import VariableManager

        _init_plugins(init_plugin_loader)
        self.name = name
        self.like = like
        self.path = Path(path)
        self._loader = DataLoader()
        # The aws_ec2 plugin (which sees no inventory variable) finds this environment's hosts by the
        # name in OPSBOOK_ENV_NAME (`aws_ec2.yml`): set while the inventory is parsed, then put back.
        before = os.environ.get(ENV_NAME_VARIABLE)
        os.environ[ENV_NAME_VARIABLE] = name
        try:
            self._inventory = InventoryManager(loader=self._loader, sources=[str(self.path)])
        finally:
            if before is None:
                os.environ.pop(ENV_NAME_VARIABLE, None)
            else:
                os.environ[ENV_NAME_VARIABLE] = before
        self._varman = VariableManager(loader=self._loader, inventory=self._inventory)
        if like is not None and self.kind != "aws":
            raise UnknownEnvironment(
                f"{name!r} would be a purpose environment like {like!r}, but {like} is a {self.kind} "
                f"environment: purpose environments (`invoke env.create`) are made in AWS only. Nothing was "
                f"changed."
            )

    def __repr__(self) -> str:
        return f"Env({self.name!r})"

    # -- variables ------------------------------------------------------------------
    @functools.cached_property
    def _raw_vars(self) -> dict[str, Any]:
        # Variables of the `all` group (group_vars/all/*), as Ansible gives them to any host:
        # the implicit localhost belongs to no other group, so it sees exactly those.
        raw = dict(self._varman.get_vars(host=self._inventory.get_host("localhost"), include_hostvars=False))
        raw["inventory_dir"] = str(self.path)
        raw["opsbook_env_name"] = self.name   # what names, buckets and tags derive from (see purpose_parts)
        raw.setdefault("playbook_dir", str(PLAYBOOKS))
        return raw

    def _render(self, value: Any, variables: dict[str, Any]) -> Any:
        from ansible.template import Templar

        return Templar(loader=self._loader, variables=variables).template(value)

    def var(self, name: str, default: Any = ...) -> Any:
        """One environment variable, rendered (e.g. ``env.var('opsbook_record_store')``)."""
        raw = self._raw_vars
        if name not in raw:
            if default is ...:
                raise OpsbookError(
                    f"environment {self.name!r} does not define {name!r}; "
                    f"add it to {self.path}/group_vars/all/. Nothing was changed."
                )
            return default
        try:
            return _plain(self._render(raw[name], raw))
        except Exception as e:  # noqa: BLE001 - any template error: a lookup's missing file, a bad expression
            said = " ".join(str(e).split())[:400]
            raise OpsbookError(f"{self.name}'s inventory: {name} cannot be read ({said}). Nothing was changed. Fix it "
                               f"in {self.path}/group_vars/ (a lookup's path is relative to the inventory's "
                               f"directory).") from None

    @property
    def kind(self) -> str:
        return self.var("opsbook_env_kind")

    def secret_names(self) -> list[str]:
        return sorted(k for k in self._raw_vars if k.startswith("vault_"))

    def secret_values(self) -> dict[str, str]:
        """Every secret value this environment knows (vault_* variables). Unreadable ones are skipped."""
        out: dict[str, str] = {}
        for name in self.secret_names():
            try:
                value = self.var(name)
            except Exception:  # noqa: BLE001, S112 - a secret that cannot be resolved yet has no value to hide
                continue
            if value not in (None, ""):
                out[name] = str(value)
        return out

    # -- hosts ----------------------------------------------------------------------
    def hosts(self, pattern: str = "all") -> list[Host]:
        out = []
        for h in self._inventory.get_hosts(pattern):
            hv = h.get_vars()
            out.append(
                Host(
                    name=h.name,
                    address=str(hv.get("ansible_host", h.name)),
                    groups=tuple(sorted(g.name for g in h.get_groups() if g.name != "all")),
                    vars=dict(hv),
                )
            )
        return out

    def host(self, name: str) -> Host:
        for h in self.hosts():
            if h.name == name:
                return h
        raise OpsbookError(f"host {name!r} is not in the {self.name} inventory ({self.path}/).")

    def host_var(self, host: str, name: str, default: Any = ...) -> Any:
        hostobj = self._inventory.get_host(host)
        if hostobj is None:
            raise OpsbookError(f"host {host!r} is not in the {self.name} inventory ({self.path}/).")
        # The `all` group's variables as the implicit localhost sees them, less what Ansible gives that
        # implicit host alone (ansible_connection: local), which no inventory host inherits.
        variables = {k: v for k, v in self._raw_vars.items() if k != "ansible_connection"}
        variables.update(self._varman.get_vars(host=hostobj, include_hostvars=False))
        variables["inventory_dir"] = str(self.path)
        variables["opsbook_env_name"] = self.name
        if name not in variables:
            if default is ...:
                raise OpsbookError(f"{name!r} is not defined for host {host} in {self.path}/")
            return default
        return _plain(self._render(variables[name], variables))


def _plain(value: Any) -> Any:
    """Turn Ansible's tagged/lazy containers and scalars into plain Python values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    for plain in (bool, str, int, float):   # bool before int: True is an int too
        if isinstance(value, plain):
            return plain(value)
    return value


@functools.cache
def _init_plugins(init_plugin_loader) -> None:
    # Lookups (e.g. ansible.builtin.file for lab secrets) need Ansible's plugin loader; the AWS inventories'
    # opsbook_aws_ec2 plugin is found whichever ansible.cfg this process read (or none).
    from ansible.plugins.loader import inventory_loader

    init_plugin_loader()
    inventory_loader.add_directory(str(INVENTORY_PLUGINS))


@functools.cache
def load(name: str) -> Env:
    return Env(name)
