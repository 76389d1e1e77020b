"""Where things are in this checkout. Named once; everything else imports them from here."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "app"                        # the reference service opsbook builds and deploys
APP_MIGRATIONS = APP / "migrations"       # the migrations this checkout's service ships
INVENTORIES = ROOT / "inventories"        # one directory per environment
PLAYBOOKS = ROOT / "playbooks"
INVENTORY_PLUGINS = ROOT / "plugins" / "inventory"   # opsbook_aws_ec2 (ansible.cfg names it too)
RUNBOOKS = ROOT / "runbooks"
HOST_CHECKS = ROOT / "tests" / "infra"    # testinfra suites, also run against real environments
DIST = ROOT / "dist"                      # built artifacts
