"""The job VM's network and the node's policy, with real guests.

The outside world is a network namespace the test makes, joined to the host by a veth pair
(10.231.7.1 on the host, 10.231.7.2 inside), with an HTTP server inside. The node's own service
is an HTTP server on the host, listening on every address. The policy allows the whole outside
subnet, which holds the host's own veth address too: the guest must reach the outside server
and nothing of the node's, and no other job's VM. Each refusal is shown to be the policy's by
first lifting the one rule (or bridge port flag) that makes it, seeing the attack work, then
putting the policy back and seeing it fail. No address outside these namespaces or loopback is
used.
"""
import contextlib
import http.server
import os
import re
import socket
import subprocess
import threading

import pytest

from conftest import vibatch_cmd
from vmhelp import (epilogue, exec_popen, exec_run, guest_root, leftovers, prologue, variant,
                    wait_until)

pytestmark = pytest.mark.vm

NS = f"vbt-out-{os.getpid() % 100000}"
HOST_IF, NS_IF = f"vbto{os.getpid() % 10000}h", f"vbto{os.getpid() % 10000}n"
HOST_IP, OUT_IP = "10.231.7.1", "10.231.7.2"
BRIDGE, SUBNET = f"vbtnat{os.getpid() % 1000}", "10.214.77.0/24"
OUT_PORT, NODE_PORT, VM_PORT, NODE6_PORT = 8080, 8081, 9000, 8083


def _ip(*argv):
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def outside(vm_env):
    """The outside world (a netns with an HTTP server) and a node service on the host."""
    _ip("netns", "add", NS)
    server = node_srv = node6 = None
    try:
        _ip("link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF)
        _ip("link", "set", NS_IF, "netns", NS)
        _ip("addr", "add", f"{HOST_IP}/24", "dev", HOST_IF)
        _ip("link", "set", HOST_IF, "up")
        _ip("-n", NS, "addr", "add", f"{OUT_IP}/24", "dev", NS_IF)
        _ip("-n", NS, "link", "set", NS_IF, "up")
        _ip("-n", NS, "link", "set", "lo", "up")
        _ip("-n", NS, "route", "add", "default", "via", HOST_IP)
        root = os.path.join(vm_env.base, "outside-www")
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, "hello"), "w") as f:
            f.write("hello from outside\n")
        server = subprocess.Popen(["ip", "netns", "exec", NS, "python3", "-m", "http.server",
                                   str(OUT_PORT), "--bind", OUT_IP, "--directory", root],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_until(lambda: _connects(OUT_IP, OUT_PORT), 20), "outside server"
        node_srv = http.server.ThreadingHTTPServer(("0.0.0.0", NODE_PORT), _NodeService)
        node6 = _Server6(("::1", NODE6_PORT), _NodeService)    # a node service on IPv6 only
        for srv in (node_srv, node6):
            threading.Thread(target=srv.serve_forever, daemon=True).start()
        yield
    finally:
        for srv in (node_srv, node6):
            if srv:
                srv.shutdown()
                srv.server_close()
        if server:
            server.kill()
            server.wait(10)
        subprocess.run(["ip", "link", "del", HOST_IF], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", NS], capture_output=True, check=False)


class _Server6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


class _NodeService(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        body = b"node secret\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _connects(host, port):
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


def _policy_cfg(vm_env, mode):
    return variant(vm_env, f"net-{mode}", {
        "vm": {"network": mode},
        "network": {"allow": [f"{OUT_IP.rsplit('.', 1)[0]}.0/24"], "nat_bridge": BRIDGE,
                    "nat_subnet": SUBNET}})


@pytest.fixture
def policy(vm_env, outside):
    """Yields a config maker; afterwards takes vibatch's chains and test bridge away."""
    made = []

    def make(mode):
        made.append(_policy_cfg(vm_env, mode))
        return made[-1]
    yield make
    from vibatch import config
    from vibatch.core.lifecycle import qemu_ids
    from vibatch.vm import network
    for path in made[-1:]:
        cfg = config.load(path)
        network.remove(cfg, qemu_ids(cfg)[0])


GET = ('r=$(printf "GET /%s HTTP/1.0\\r\\n\\r\\n" "$3" | nc -w 2 "$1" "$2" 2>&1); '
       'case "$r" in *"200 OK"*) echo "reached $1:$2: $(printf "%s" "$r" | tail -n 1)" ;; '
       '*) echo "refused $1:$2" ;; esac')


def _get(vm_env, job, host, port, path=""):
    rc, out, err = exec_run(vm_env, job, "sh", "-c", GET, "get", host, str(port), path,
                            timeout=60)
    assert rc == 0, err
    return out.strip()


def _only_the_rule_stops_it(vm_env, job, tool, rule, host, port):
    """The node's service on host:port is refused; with ``rule`` (one jump into vibatch's
    chains) deleted the same request gets its answer; with the rule back, refused again."""
    def ipt(*argv):
        return subprocess.run([tool, "-w", "5", *argv], capture_output=True, text=True, timeout=30)
    assert _get(vm_env, job, host, port) == f"refused {host}:{port}"
    assert ipt("-D", *rule).returncode == 0
    try:
        assert _get(vm_env, job, host, port) == f"reached {host}:{port}: node secret"
    finally:
        ipt("-I", rule[0], "1", *rule[1:])
    assert _get(vm_env, job, host, port) == f"refused {host}:{port}"


def test_nat_reaches_the_outside_but_not_the_node_nor_another_vm(vm_env, tracker, policy):
    cfg_path = policy("nat")
    a, b = tracker.job_id(), tracker.job_id()
    for job in (a, b):
        r = prologue(vm_env, job, config=cfg_path)
        assert r.returncode == 0, r.stderr
    assert _get(vm_env, a, OUT_IP, OUT_PORT, "hello") == \
        f"reached {OUT_IP}:{OUT_PORT}: hello from outside"

    # the node's service, on the host's own address inside the allowed subnet, and on the
    # bridge's: refused. Lift the INPUT jump and the same request gets the node's answer.
    gateway = SUBNET.replace(".0/24", ".1")
    assert _get(vm_env, a, gateway, NODE_PORT) == f"refused {gateway}:{NODE_PORT}"
    _only_the_rule_stops_it(vm_env, a, "iptables", ["INPUT", "-i", BRIDGE, "-j", "VIBATCH-IN"],
                            HOST_IP, NODE_PORT)

    # another job's VM: B listens, A cannot connect. With B's bridge port not isolated (the
    # flag vibatch's domain sets) A's request reaches B's listener, on the same L2 segment.
    b_ip = _guest_ip(vm_env, b)
    listener = exec_popen(vm_env, b, "sh", "-c",
                          f'while :; do printf "HTTP/1.0 200 OK\\r\\n\\r\\nfrom B\\n" | '
                          f'nc -l -p {VM_PORT} >/dev/null; done')
    try:
        assert _get(vm_env, a, b_ip, VM_PORT) == f"refused {b_ip}:{VM_PORT}"
        taps = _taps()
        assert len(taps) == 2, taps
        # two layers: the bridge ports are isolated (no frame from one VM's tap to another's),
        # and where bridged frames pass iptables (br_netfilter) the FORWARD chain drops routed
        # and bridged traffic to the bridge's subnet. Lift them one at a time.
        nf = "/proc/sys/net/bridge/bridge-nf-call-iptables"
        nf_was = open(nf).read().strip() if os.path.exists(nf) else None
        try:
            for tap in taps:
                subprocess.run(["bridge", "link", "set", "dev", tap, "isolated", "off"], check=True)
            if nf_was == "1":
                assert _get(vm_env, a, b_ip, VM_PORT) == f"refused {b_ip}:{VM_PORT}"
                with open(nf, "w") as f:
                    f.write("0\n")
            assert _get(vm_env, a, b_ip, VM_PORT) == f"reached {b_ip}:{VM_PORT}: from B"
        finally:
            if nf_was is not None:
                with open(nf, "w") as f:
                    f.write(nf_was + "\n")
            for tap in taps:
                subprocess.run(["bridge", "link", "set", "dev", tap, "isolated", "on"], check=True)
        assert _get(vm_env, a, b_ip, VM_PORT) == f"refused {b_ip}:{VM_PORT}"
    finally:
        listener.kill()
        listener.wait(30)
    for job in (a, b):
        assert epilogue(vm_env, job, config=cfg_path).returncode == 0
        assert leftovers(vm_env, job) == []


def test_user_mode_reaches_the_outside_but_no_port_of_the_node(vm_env, tracker, policy):
    cfg_path = policy("user")
    job = tracker.job_id()
    r = prologue(vm_env, job, config=cfg_path)
    assert r.returncode == 0, r.stderr
    assert _get(vm_env, job, OUT_IP, OUT_PORT, "hello") == \
        f"reached {OUT_IP}:{OUT_PORT}: hello from outside"
    # slirp's 10.0.2.2 is the host's loopback, and the host's veth address is in the allowed
    # subnet: QEMU's user may send nothing through lo. Without the OUTPUT jump, both answer.
    from vibatch import config
    from vibatch.core.lifecycle import qemu_ids
    uid = str(qemu_ids(config.load(cfg_path))[0])
    assert _get(vm_env, job, HOST_IP, NODE_PORT) == f"refused {HOST_IP}:{NODE_PORT}"
    owner = ["-m", "owner", "--uid-owner", uid]
    _only_the_rule_stops_it(vm_env, job, "iptables", ["OUTPUT", *owner, "-j", "VIBATCH-OUT"],
                            "10.0.2.2", NODE_PORT)
    # IPv6: slirp serves fec0::/64 and maps fec0::2 to the host's ::1. vibatch gives the guest
    # no IPv6 address; guest root (the threat) gives itself one
    rc, out, err = guest_root(vm_env, job, "d=$(ls /sys/class/net | grep -v '^lo$'); "
                              "echo 0 > /proc/sys/net/ipv6/conf/$d/disable_ipv6; "
                              "echo 0 > /proc/sys/net/ipv6/conf/$d/accept_dad; "
                              "ip -6 addr add fec0::15/64 dev $d && "
                              "ip -6 route replace default via fec0::2 dev $d && ip -6 addr show dev $d")
    assert rc == 0 and "fec0::15" in out, out + err
    _only_the_rule_stops_it(vm_env, job, "ip6tables", ["OUTPUT", *owner, "-j", "VIBATCH-6"],
                            "fec0::2", NODE6_PORT)
    assert epilogue(vm_env, job, config=cfg_path).returncode == 0
    assert leftovers(vm_env, job) == []


def test_none_has_no_interface_and_a_mode_outside_policy_is_the_jobs_fault(vm_env, tracker,
                                                                            policy):
    cfg_path = policy("nat")
    job = tracker.job_id()
    r = prologue(vm_env, job, config=cfg_path, args=("--network", "none"))
    assert r.returncode == 0, r.stderr
    rc, out, err = exec_run(vm_env, job, "ls", "/sys/class/net")
    assert (rc, out.split()) == (0, ["lo"]), err
    assert epilogue(vm_env, job, config=cfg_path).returncode == 0
    none_cfg = _policy_cfg(vm_env, "none")
    refused = tracker.job_id()
    r = prologue(vm_env, refused, config=none_cfg, args=("--network", "nat"))
    assert r.returncode == 10, r.stderr
    assert "network mode 'nat' is not allowed for your groups; you may ask for: none" in r.stderr
    assert leftovers(vm_env, refused) == []


def _guest_ip(vm_env, job):
    rc, out, err = exec_run(vm_env, job, "sh", "-c",
                            "ip -4 -o addr show | grep -v ' lo ' | sed 's/.* inet \\([0-9.]*\\).*/\\1/'")
    assert rc == 0 and out.strip(), err
    return out.strip()


def _taps():
    """The tap devices on the test's bridge."""
    return sorted(os.listdir(f"/sys/class/net/{BRIDGE}/brif"))



def test_image_test_checks_the_network_mode_in_force(vm_env, policy):
    """`vibatch image test` under a nat policy: the guest has the address and route vibatch
    configured (and under none, no interface: test_vm_images)."""
    cfg_path = policy("nat")
    r = subprocess.run(vibatch_cmd("--config", cfg_path, "image", "test", "testguest",
                                   "--user", "vbt-alice"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    line = [x for x in r.stdout.splitlines() if "network matches policy" in x]
    assert line and line[0].startswith("PASS  network matches policy (nat): "), r.stdout
    prefix = SUBNET.rsplit(".", 1)[0].replace(".", r"\.")
    assert re.search(rf": \S+: {prefix}\.1\d/24 via {prefix}\.1$", line[0]), line
