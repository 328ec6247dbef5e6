"""The job VM's network, and the node's policy for it.

``vm.network`` is the site's default mode; a job may ask for another one only where
``network.groups`` lets its user's groups (``none`` is always allowed: it asks for less):

- ``none``: no network device at all.
- ``user``: QEMU's user-mode network (slirp). The guest's connections are QEMU's own sockets on
  the host, made as QEMU's user.
- ``nat``: a tap on vibatch's bridge (``network.nat_bridge``), an address of
  ``network.nat_subnet`` behind the host, masqueraded.
- ``bridge``: a tap on the site's bridge (``network.bridge``); the site routes and filters.

For ``user`` and ``nat`` the node enforces the policy, in iptables chains of vibatch's own
(rebuilt as a whole, atomically, by ``iptables-restore --noflush``):

- nothing on the node itself: for ``nat`` every packet from the bridge to a local address
  (INPUT, whatever the address: the bridge's, another interface's, loopback) is dropped; for
  ``user`` QEMU's user may send nothing through ``lo``, which is where every local destination
  is routed;
- no other job's VM: the bridge's ports are isolated (``<port isolated='yes'/>``: no frame from
  one VM's tap reaches another's) and routed traffic to the bridge's subnet is dropped;
- elsewhere only ``network.allow`` (``CIDR``, ``CIDR:PORT``, ``CIDR:PORT/udp``); everything
  else is dropped, and nothing may come in that is not a reply;
- no IPv6 at all: the bridge has IPv6 off (no link-local address for a guest to reach the
  node by), and ip6tables drops whatever comes from the bridge or leaves as QEMU's user
  (slirp would otherwise map its fec0::2 to the host's ``::1``).

The guest's address is static, set by the guest setup through the agent (an image needs no
DHCP client): host part 10 + the job's first CPU, which no other running job has.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from .. import proc
from ..config import NETWORK_MODES, parse_allow
from ..errors import JobError, NodeError
from ..util import hold, root_lock

MODES = NETWORK_MODES
IP = "/usr/sbin/ip"
IPTABLES = "/usr/sbin/iptables"
IPTABLES_RESTORE = "/usr/sbin/iptables-restore"
IP6TABLES = "/usr/sbin/ip6tables"
IP6TABLES_RESTORE = "/usr/sbin/ip6tables-restore"
TIMEOUT_S = 30.0
CHAIN_IN, CHAIN_FWD, CHAIN_OUT, CHAIN_NAT = "VIBATCH-IN", "VIBATCH-FWD", "VIBATCH-OUT", "VIBATCH-NAT"
CHAIN_6 = "VIBATCH-6"       # IPv6: guests are given none, and may send none
USER_NET = ipaddress.ip_interface("10.0.2.15/24")      # slirp's fixed guest address
USER_GATEWAY, USER_DNS = "10.0.2.2", "10.0.2.3"
@dataclass(frozen=True)
class GuestNet:
    """What the guest setup configures: the NIC (by MAC), its address, gateway and resolver."""

    mac: str
    address: str        # CIDR notation
    gateway: str
    dns: str            # "" keeps the image's resolver

    def arg(self) -> str:
        return f"n:{self.mac}={self.address},{self.gateway},{self.dns}"


def choose(cfg, asked: Optional[str], groups: Sequence[str]) -> str:
    """The job's mode: the site's default, or what it asked for if the policy lets it."""
    if not asked or asked == cfg.vm.network:
        return cfg.vm.network
    if asked not in MODES:
        raise JobError(f"unknown network mode {asked!r}: choose one of {', '.join(MODES)}")
    def may(mode: str) -> bool:
        return mode in ("none", cfg.vm.network) or bool(set(groups) &
                                                        set(cfg.network.groups.get(mode, ())))
    if may(asked):
        return asked
    raise JobError(f"network mode {asked!r} is not allowed for your groups; you may ask for: "
                   + ", ".join(m for m in MODES if may(m)))


def guest_net(cfg, mode: str, cpus: Sequence[int]) -> Optional[GuestNet]:
    """The guest's static configuration in ``mode`` for a job on ``cpus`` (None: no NIC to
    configure here: ``none``, or ``bridge``, where the site's DHCP does it)."""
    k = min(cpus)
    mac = f"52:54:00:76:62:{(10 + k) & 0xff:02x}"
    if mode == "user":
        return GuestNet(mac, str(USER_NET), USER_GATEWAY, cfg.network.dns or USER_DNS)
    if mode == "nat":
        net = ipaddress.ip_network(cfg.network.nat_subnet)
        return GuestNet(mac, f"{net[10 + k]}/{net.prefixlen}", str(net[1]), cfg.network.dns)
    return None


# --- the node's side (root) ------------------------------------------------------------------
def ruleset(cfg, qemu_uid: int) -> str:
    """The text ``iptables-restore --noflush`` loads: vibatch's chains, whole."""
    br, subnet = cfg.network.nat_bridge, str(ipaddress.ip_network(cfg.network.nat_subnet))
    allow = [parse_allow(a) for a in cfg.network.allow]
    lines = ["*filter", f":{CHAIN_IN} - [0:0]", f":{CHAIN_FWD} - [0:0]", f":{CHAIN_OUT} - [0:0]",
             f"-A {CHAIN_IN} -j DROP",
             f"-A {CHAIN_FWD} -o {br} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
             f"-A {CHAIN_FWD} -i {br} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
             f"-A {CHAIN_FWD} -i {br} -d {subnet} -j DROP"]
    lines += [f"-A {CHAIN_FWD} -i {br} {' '.join(a.match())} -j ACCEPT" for a in allow]
    lines += [f"-A {CHAIN_FWD} -j DROP",
              f"-A {CHAIN_OUT} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
              f"-A {CHAIN_OUT} -o lo -j DROP", f"-A {CHAIN_OUT} -d {subnet} -j DROP"]
    lines += [f"-A {CHAIN_OUT} {' '.join(a.match())} -j ACCEPT" for a in allow]
    lines += [f"-A {CHAIN_OUT} -j DROP", "COMMIT",
              "*nat", f":{CHAIN_NAT} - [0:0]",
              f"-A {CHAIN_NAT} -s {subnet} ! -d {subnet} -j MASQUERADE", "COMMIT", ""]
    return "\n".join(lines)


RULESET6 = f"*filter\n:{CHAIN_6} - [0:0]\n-A {CHAIN_6} -j DROP\nCOMMIT\n"


def _jumps(cfg, qemu_uid: int) -> list[tuple[str, str, list[str]]]:
    """(tool, table, rule) of each jump into vibatch's chains, first in its built-in chain."""
    br, owner = cfg.network.nat_bridge, ["-m", "owner", "--uid-owner", str(qemu_uid)]
    return [(IPTABLES, "filter", ["INPUT", "-i", br, "-j", CHAIN_IN]),
            (IPTABLES, "filter", ["FORWARD", "-i", br, "-j", CHAIN_FWD]),
            (IPTABLES, "filter", ["FORWARD", "-o", br, "-j", CHAIN_FWD]),
            (IPTABLES, "filter", ["OUTPUT", *owner, "-j", CHAIN_OUT]),
            (IPTABLES, "nat", ["POSTROUTING", "-j", CHAIN_NAT]),
            (IP6TABLES, "filter", ["INPUT", "-i", br, "-j", CHAIN_6]),
            (IP6TABLES, "filter", ["FORWARD", "-i", br, "-j", CHAIN_6]),
            (IP6TABLES, "filter", ["OUTPUT", *owner, "-j", CHAIN_6])]


def _ipt(tool: str, *argv: str, check: bool = True) -> proc.Result:
    return proc.run([tool, "-w", "5", *argv], timeout=TIMEOUT_S, check=check)


def ensure(cfg, mode: str, qemu_uid: int) -> None:
    """Make the node ready for a job in ``mode`` and its policy in force, or raise NodeError.
    Idempotent; the policy is reloaded whole each time (a few ms), so what is in force is
    always what the config says."""
    if mode not in ("user", "nat"):
        if mode == "bridge" and not os.path.isdir(f"/sys/class/net/{cfg.network.bridge}/bridge"):
            raise NodeError(f"network.bridge: {cfg.network.bridge} is not a bridge on this node")
        return
    with hold(root_lock(os.path.join(cfg.run_dir, "network.lock"), cfg.lock_timeout_s)):
        if mode == "nat":
            _bridge(cfg)
        try:
            proc.run([IPTABLES_RESTORE, "-w", "5", "--noflush"], timeout=TIMEOUT_S,
                     input_text=ruleset(cfg, qemu_uid))
            proc.run([IP6TABLES_RESTORE, "-w", "5", "--noflush"], timeout=TIMEOUT_S,
                     input_text=RULESET6)
            for tool, table, rule in _jumps(cfg, qemu_uid):
                if _ipt(tool, "-t", table, "-C", *rule, check=False).returncode != 0:
                    _ipt(tool, "-t", table, "-I", *rule[:1], "1", *rule[1:])
        except NodeError as e:
            raise NodeError(f"cannot put the network policy in force: {e}") from None


def _bridge(cfg) -> None:
    br = cfg.network.nat_bridge
    net = ipaddress.ip_network(cfg.network.nat_subnet)
    if not os.path.isdir(f"/sys/class/net/{br}"):
        proc.run([IP, "link", "add", "name", br, "type", "bridge"], timeout=TIMEOUT_S)
    if not os.path.isdir(f"/sys/class/net/{br}/bridge"):
        raise NodeError(f"network.nat_bridge: {br} exists and is not a bridge")
    have = proc.run([IP, "-o", "-4", "addr", "show", "dev", br], timeout=TIMEOUT_S).stdout
    if f" {net[1]}/{net.prefixlen} " not in have:
        proc.run([IP, "addr", "add", f"{net[1]}/{net.prefixlen}", "dev", br], timeout=TIMEOUT_S)
    _sysctl(f"/proc/sys/net/ipv6/conf/{br}/disable_ipv6", "1")    # before it is up
    proc.run([IP, "link", "set", br, "up"], timeout=TIMEOUT_S)
    _sysctl("/proc/sys/net/ipv4/ip_forward", "1")


def _sysctl(path: str, value: str) -> None:
    with open(path, "r+") as f:
        if f.read().strip() != value:
            f.seek(0)
            f.write(value + "\n")


def remove(cfg, qemu_uid: int) -> None:
    """Take vibatch's chains, jumps and bridge away (``vibatch network remove``)."""
    for tool, table, rule in _jumps(cfg, qemu_uid):
        while _ipt(tool, "-t", table, "-C", *rule, check=False).returncode == 0:
            _ipt(tool, "-t", table, "-D", *rule)
    for tool, table, chain in ((IPTABLES, "filter", CHAIN_IN), (IPTABLES, "filter", CHAIN_FWD),
                               (IPTABLES, "filter", CHAIN_OUT), (IPTABLES, "nat", CHAIN_NAT),
                               (IP6TABLES, "filter", CHAIN_6)):
        _ipt(tool, "-t", table, "-F", chain, check=False)
        _ipt(tool, "-t", table, "-X", chain, check=False)
    if os.path.isdir(f"/sys/class/net/{cfg.network.nat_bridge}/bridge"):
        proc.run([IP, "link", "del", cfg.network.nat_bridge], timeout=TIMEOUT_S, check=False)
