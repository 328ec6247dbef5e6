"""network.py without a VM: the job's choice of mode within policy, the guest's address, and
the iptables ruleset (checked by iptables-restore itself, without loading it)."""
import os
import subprocess

import pytest

from vibatch import config
from vibatch.errors import JobError
from vibatch.vm import network


def cfg(**network_keys):
    return config.parse({"vm": {"network": "none"}, "host": {"cpus": [0, 1, 2, 3]},
                         "network": {"allow": ["10.231.7.0/24", "192.0.2.53:53/udp"],
                                     **network_keys}}, "t")


def test_a_job_gets_the_default_or_what_its_groups_may_ask_for():
    c = cfg(groups={"nat": ["grid"], "user": ["*never*"]})
    assert network.choose(c, None, ["users"]) == "none"
    assert network.choose(c, "none", ["users"]) == "none"
    assert network.choose(c, "nat", ["users", "grid"]) == "nat"
    with pytest.raises(JobError, match="network mode 'nat' is not allowed for your groups; "
                                       "you may ask for: none$"):
        network.choose(c, "nat", ["users"])
    with pytest.raises(JobError, match="unknown network mode 'wifi'"):
        network.choose(c, "wifi", ["grid"])
    user_default = config.parse({"vm": {"network": "user"}}, "t")
    assert network.choose(user_default, "none", []) == "none"    # asking for less is fine


def test_each_running_job_has_its_own_address():
    c = cfg(nat_subnet="10.214.3.0/24", dns="192.0.2.53")
    a, b = network.guest_net(c, "nat", (0,)), network.guest_net(c, "nat", (2, 3))
    assert (a.address, a.gateway, a.dns) == ("10.214.3.10/24", "10.214.3.1", "192.0.2.53")
    assert b.address == "10.214.3.12/24" and a.mac != b.mac
    assert network.guest_net(c, "user", (1,)).address == "10.0.2.15/24"
    assert network.guest_net(c, "none", (1,)) is None
    assert network.guest_net(c, "bridge", (1,)) is None       # the site's DHCP
    assert a.arg() == "n:52:54:00:76:62:0a=10.214.3.10/24,10.214.3.1,192.0.2.53"


def test_allow_entries_and_bad_config_name_the_key():
    assert config.parse_allow("10.0.0.0/8").match() == ["-d", "10.0.0.0/8"]
    assert config.parse_allow("192.0.2.1:443").match() == ["-d", "192.0.2.1/32", "-p", "tcp",
                                                           "--dport", "443"]
    assert config.parse_allow("192.0.2.1:53/udp").proto == "udp"
    for bad in ("10.0.0.0/40", "host:80", "10.0.0.1:70000", "10.0.0.1:80/sctp", "::1"):
        with pytest.raises(config.ConfigError, match="network.allow"):
            cfg(allow=[bad])
    with pytest.raises(config.ConfigError, match="network.nat_bridge"):
        cfg(nat_bridge="a-very-long-bridge-name")
    with pytest.raises(config.ConfigError, match="network.bridge: the bridge mode needs"):
        config.parse({"vm": {"network": "bridge"}}, "t")


@pytest.mark.skipif(os.geteuid() != 0, reason="iptables-restore --test needs root")
def test_the_ruleset_is_what_iptables_accepts_and_ends_in_drop():
    c = cfg(nat_bridge="vbtest0")
    text = network.ruleset(c, 64055)
    r = subprocess.run([network.IPTABLES_RESTORE, "--test", "--noflush"], input=text,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    fwd = [line for line in text.splitlines() if line.startswith("-A VIBATCH-FWD")]
    out = [line for line in text.splitlines() if line.startswith("-A VIBATCH-OUT")]
    # other VMs are dropped before any allow entry; nothing local leaves QEMU; both end in DROP
    assert fwd.index("-A VIBATCH-FWD -i vbtest0 -d 10.213.0.0/24 -j DROP") < \
        fwd.index("-A VIBATCH-FWD -i vbtest0 -d 10.231.7.0/24 -j ACCEPT")
    assert out.index("-A VIBATCH-OUT -o lo -j DROP") < out.index(
        "-A VIBATCH-OUT -d 10.231.7.0/24 -j ACCEPT")
    assert fwd[-1] == "-A VIBATCH-FWD -j DROP" and out[-1] == "-A VIBATCH-OUT -j DROP"
    assert "-A VIBATCH-IN -j DROP" in text
