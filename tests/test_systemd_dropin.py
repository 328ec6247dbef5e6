"""Where systemd is PID 1, libvirtd runs under vibatch's subreaper through a drop-in for
Debian's libvirtd.service (etc/systemd/libvirtd.service.d/vibatch-subreaper.conf), which
etc/install-systemd-dropin.sh installs for etc/setup-node.sh: here in a scratch root, with a
systemctl on PATH that records what it is asked (this machine's PID 1 is not systemd)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DROPIN = os.path.join(REPO, "etc", "systemd", "libvirtd.service.d", "vibatch-subreaper.conf")
INSTALL = os.path.join(REPO, "etc", "install-systemd-dropin.sh")
DEBIAN_UNIT = next((p for p in ("/lib/systemd/system/libvirtd.service",
                                "/usr/lib/systemd/system/libvirtd.service")
                    if os.path.exists(p)), None)
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
FAKE_SYSTEMCTL = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["VBT_SYSTEMCTL_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
sys.exit(int(os.environ.get("VBT_SYSTEMCTL_STATUS", "0")))
"""


def service_lines(path):
    """The [Service] section's settings, in order, as (key, value), duplicates kept."""
    out, section = [], None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line
            elif section == "[Service]":
                key, _, value = line.partition("=")
                out.append((key, value))
    return out


def test_the_dropin_runs_debians_execstart_under_the_subreaper():
    if DEBIAN_UNIT is None:
        pytest.skip("libvirt-daemon-system is not installed: no Debian libvirtd.service here")
    debian = [v for k, v in service_lines(DEBIAN_UNIT) if k == "ExecStart"]
    assert len(debian) == 1
    ours = service_lines(DROPIN)
    starts = [v for k, v in ours if k == "ExecStart"]
    assert starts == ["", "/opt/vibatch/venv/bin/python -I -m vibatch.subreaper --service "
                          + debian[0]]      # cleared, then Debian's own command, wrapped
    assert ("NotifyAccess", "all") in ours
    assert ("Type", "notify") in service_lines(DEBIAN_UNIT)   # why NotifyAccess is needed
    # the rest of Debian's unit must hold with it: the subreaper is the main pid it signals
    assert ("KillMode", "process") in service_lines(DEBIAN_UNIT)
    assert ("ExecReload", "/bin/kill -HUP $MAINPID") in service_lines(DEBIAN_UNIT)


class Node:
    """A scratch root and a recording systemctl, and etc/install-systemd-dropin.sh run in it."""

    def __init__(self, tmp_path, systemd=True):
        self.root = tmp_path / "root"
        (self.root / "run").mkdir(parents=True)
        if systemd:
            (self.root / "run" / "systemd" / "system").mkdir(parents=True)
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        (self.bin / "systemctl").write_text(FAKE_SYSTEMCTL)
        (self.bin / "systemctl").chmod(0o755)
        self.log = tmp_path / "systemctl.log"
        self.dropin = self.root / "etc/systemd/system/libvirtd.service.d/vibatch-subreaper.conf"

    def install(self, prefix="/opt/vibatch", status=0):
        p = subprocess.run([INSTALL, str(self.root), prefix], capture_output=True, text=True,
                           timeout=60, env={"PATH": f"{self.bin}:{PATH}", "LANG": "C.UTF-8",
                                            "VBT_SYSTEMCTL_LOG": str(self.log),
                                            "VBT_SYSTEMCTL_STATUS": str(status)})
        return p

    def calls(self):
        """What systemctl was asked since the last look."""
        if not self.log.exists():
            return []
        calls = [json.loads(line) for line in self.log.read_text().splitlines()]
        self.log.unlink()
        return calls


CHANGED = [["daemon-reload"], ["try-restart", "libvirtd.service"]]


def test_install_once_reload_and_try_restart_on_change_nothing_the_second_time(tmp_path):
    node = Node(tmp_path)
    with open(DROPIN) as f:
        shipped = f.read()
    p = node.install()
    assert p.returncode == 0, p.stderr
    assert node.dropin.read_text() == shipped
    assert oct(node.dropin.stat().st_mode & 0o7777) == "0o644"
    assert node.calls() == CHANGED
    assert os.listdir(node.dropin.parent) == ["vibatch-subreaper.conf"]   # no temporary left
    before = node.dropin.stat()
    p = node.install()
    assert p.returncode == 0 and p.stdout == "", p.stdout
    assert node.calls() == []                                # unchanged: no reload, no restart
    assert (node.dropin.stat().st_ino, node.dropin.stat().st_mtime_ns) == (before.st_ino,
                                                                          before.st_mtime_ns)
    node.dropin.write_text(shipped.replace("NotifyAccess=all", "NotifyAccess=main"))
    assert node.install().returncode == 0                   # changed by hand: put back
    assert node.dropin.read_text() == shipped and node.calls() == CHANGED


def test_install_puts_the_prefix_in(tmp_path):
    node = Node(tmp_path)
    assert node.install("/opt/vbt-site/").returncode == 0
    text = node.dropin.read_text()
    assert "ExecStart=/opt/vbt-site/venv/bin/python -I -m vibatch.subreaper --service " in text
    assert "/opt/vibatch/" not in text and node.calls() == CHANGED
    assert node.install("/opt/vbt-site").returncode == 0 and node.calls() == []
    assert node.install().returncode == 0 and node.calls() == CHANGED   # prefix changed


def test_install_refuses_without_systemd_and_a_prefix_unfit_for_execstart(tmp_path):
    node = Node(tmp_path, systemd=False)
    p = node.install()
    assert p.returncode == 1 and "systemd is not the service manager" in p.stderr
    assert not (node.root / "etc").exists() and node.calls() == []
    (node.root / "run" / "systemd" / "system").mkdir(parents=True)
    for prefix in ("opt/vibatch", "/opt/vi batch", "/opt/%n", "/opt/$HOME", "/opt/a\nb"):
        p = node.install(prefix)
        assert p.returncode == 2 and "PREFIX" in p.stderr, prefix
    assert not (node.root / "etc").exists() and node.calls() == []


def test_install_keeps_a_masked_dropin_masked(tmp_path):
    node = Node(tmp_path)
    node.dropin.parent.mkdir(parents=True)
    node.dropin.symlink_to("/dev/null")
    p = node.install()
    assert p.returncode == 0 and "masked" in p.stdout
    assert os.readlink(node.dropin) == "/dev/null" and node.calls() == []


def test_install_fails_when_systemctl_does(tmp_path):
    node = Node(tmp_path)
    p = node.install(status=1)
    assert p.returncode != 0
    assert node.calls() == [["daemon-reload"]]              # stopped there (set -e)


def test_setup_node_takes_the_systemd_branch_by_run_systemd_system():
    """setup-node.sh itself cannot run here (root, apt, /opt/vibatch): where systemd is PID 1 it
    calls install-systemd-dropin.sh and starts no libvirtd of its own; elsewhere it starts it
    detached under the subreaper, as before."""
    with open(os.path.join(REPO, "etc", "setup-node.sh")) as f:
        script = f.read()
    head, _, rest = script.partition("if [ -d /run/systemd/system ]; then\n")
    assert rest, "no systemd branch"
    systemd_branch, _, rest = rest.partition("\nelse\n")
    other, _, _ = rest.partition("\nfi\n")
    code = [line.strip() for line in systemd_branch.splitlines()
            if line.strip() and not line.strip().startswith("#")]
    assert code == ['"$REPO/etc/install-systemd-dropin.sh" / "$PREFIX"']   # and nothing else
    assert "vibatch.subreaper --detach --log /var/log/vibatch/libvirtd.log libvirtd" in other
    assert "/run/systemd/system" not in head


def test_systemd_analyze_verifies_debians_unit_with_the_dropin(tmp_path):
    """systemd-analyze verify needs no systemd as PID 1 (it loads the units in a test manager).
    A prefix of the test's own whose venv/bin/python is this interpreter: the check that
    ExecStart's program exists must pass on the drop-in, not on /opt/vibatch."""
    analyze = shutil.which("systemd-analyze", path=PATH)
    if analyze is None or DEBIAN_UNIT is None:
        pytest.skip("needs systemd-analyze and Debian's libvirtd.service (systemd, "
                    "libvirt-daemon-system)")
    node = Node(tmp_path)
    prefix = tmp_path / "prefix"
    (prefix / "venv" / "bin").mkdir(parents=True)
    (prefix / "venv" / "bin" / "python").symlink_to(sys.executable)
    assert node.install(str(prefix)).returncode == 0
    units = tmp_path / "units"
    (units / "libvirtd.service.d").mkdir(parents=True)
    shutil.copy(DEBIAN_UNIT, units / "libvirtd.service")

    def verify(dropin_text):
        (units / "libvirtd.service.d" / "vibatch-subreaper.conf").write_text(dropin_text)
        return subprocess.run([analyze, "verify", "--man=no", str(units / "libvirtd.service")],
                              capture_output=True, text=True, timeout=120,
                              env={"PATH": PATH, "LANG": "C.UTF-8"})
    text = node.dropin.read_text()
    p = verify(text)
    assert p.returncode == 0 and "libvirtd.service" not in p.stdout + p.stderr, p.stderr
    # it does read the drop-in: without the line that clears Debian's ExecStart, or with a
    # program that is not there, the same unit is refused
    p = verify(text.replace("ExecStart=\n", ""))
    assert p.returncode != 0 and "more than one ExecStart" in p.stderr, p.stderr
    p = verify(text.replace(str(prefix), str(tmp_path / "absent")))
    assert p.returncode != 0 and "is not executable" in p.stderr, p.stderr
