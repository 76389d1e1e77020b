"""The host firewall's rules (roles/common/templates/etc/nftables.conf.j2), rendered from inventory-shaped
input: a rule whose `from` list is empty admits nobody and is left out (an empty nft set does not even
parse); a listed source is admitted on its port only; `any` opens the port."""

from __future__ import annotations

import jinja2

from opsbook.core.paths import ROOT

TEMPLATE = ROOT / "roles" / "common" / "templates" / "etc" / "nftables.conf.j2"


def render(allow: list[dict]) -> list[str]:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)   # a firewall file, not HTML
    text = env.from_string(TEMPLATE.read_text()).render(
        common_firewall_admin_sources=["10.89.7.1/32"], common_firewall_allow=allow)
    return [line.strip() for line in text.splitlines() if "dport" in line]


def test_an_empty_source_list_admits_nobody_and_leaves_no_rule():
    rules = render([
        {"port": 22, "from": [], "why": "ssh: pgBackRest between the database host and its repository host"},
        {"port": 5432, "from": ["10.89.7.21", "10.89.7.21", "10.89.7.22"], "why": "postgres: the app hosts"},
        {"port": 80, "from": "any", "why": "http"},
    ])
    assert rules == [
        'tcp dport 22 ip saddr { 10.89.7.1/32 } accept comment "ssh: the controller"',
        'tcp dport 5432 ip saddr { 10.89.7.21, 10.89.7.22 } accept comment "postgres: the app hosts"',
        'tcp dport 80 accept comment "http"',
    ]


def test_a_listed_peer_gets_ssh_beside_the_controller():
    rules = render([{"port": 22, "from": ["10.89.7.12"], "why": "ssh: pgBackRest"}])
    assert rules[-1] == 'tcp dport 22 ip saddr { 10.89.7.12 } accept comment "ssh: pgBackRest"'
    assert len(rules) == 2
