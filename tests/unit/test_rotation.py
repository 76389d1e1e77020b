"""Which rotation an environment gets is its inventory's choice (opsbook_lb_kind)."""

import pytest

from opsbook.core.errors import OpsbookError
from opsbook.core.inventory import Env, load
from opsbook.core.paths import INVENTORIES
from opsbook.engines import rotation


def test_the_lab_drains_through_haproxy_inside_the_switch_playbook():
    rot = rotation.rotation_for(load("lab"))
    assert isinstance(rot, rotation.HaproxyRotation)
    # Nothing around the playbook: switch.yml drains and re-enables on the lb hosts itself.
    assert rot.drain(["app1"]) is None
    assert rot.enable(["app1"]) is None


@pytest.mark.parametrize("name", ["staging", "prod"])
def test_aws_environments_name_an_alb(name):
    # Read as YAML: loading the inventory would run the aws_ec2 plugin, which may only ever talk to
    # a moto server (tests/integration/test_aws_inventory.py does that).
    import yaml

    aws_vars = yaml.safe_load((INVENTORIES / name / "group_vars" / "all" / "aws.yml").read_text())
    assert aws_vars["opsbook_lb_kind"] == "alb"


def test_an_unknown_load_balancer_kind_is_refused(tmp_path):
    import shutil

    inv = tmp_path / "odd"
    shutil.copytree(INVENTORIES / "lab", inv)
    (inv / "group_vars" / "all" / "zz.yml").write_text("opsbook_lb_kind: nginx\n")
    with pytest.raises(OpsbookError, match=r"opsbook_lb_kind for 'odd' is 'nginx'; it must be haproxy or alb"):
        rotation.rotation_for(Env("odd", path=inv))
