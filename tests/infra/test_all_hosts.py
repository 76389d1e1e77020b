"""Every host: the host firewall (roles/common) is on and rejects what it does not list.

What each group serves, and to whom, is checked from other hosts by the lab test
tests/integration/test_lab_release.py::test_the_firewall_refuses_hosts_that_do_not_need_a_port."""

testinfra_hosts = ["ansible://all"]


def test_the_firewall_is_enabled_and_rejects_by_default(host):
    svc = host.service("nftables")
    assert svc.is_enabled
    assert svc.is_running   # a oneshot that stays active once its rules are loaded
    rules = host.run("nft list chain inet opsbook input")
    assert rules.rc == 0, rules.stderr
    assert "policy drop" in rules.stdout
    assert "reject" in rules.stdout
    assert "tcp dport 22 ip saddr" in rules.stdout   # SSH only from listed sources
