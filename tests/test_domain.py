"""Domain XML against golden files (regenerate with: pytest --update-golden tests/test_domain.py)."""
import os
import xml.etree.ElementTree as ET

import pytest

from vibatch.vm.domain import DomainSpec, Share, build, read_metadata, render

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")

BASE = dict(name="vibatch-42", vcpu_pins=(1,), memory_mb=512,
            disk_overlay="/var/lib/vibatch/jobs/42/overlay.qcow2",
            disk_base="/var/lib/vibatch/images/testguest/disk.qcow2", disk_base_format="qcow2",
            console_log="/var/lib/vibatch/jobs/42/console.log",
            user_agent_socket="/run/vibatch/jobs/42/agent.sock",
            shares=(Share("/var/lib/vibatch/jobs/42/shares/vbjob.json", "vbjob"),
                    Share("/var/lib/vibatch/jobs/42/shares/vbio.json", "vbio")),
            metadata=(("job_id", "42"), ("user", "alice"), ("image_digest", "sha256:abc")))
CASES = {
    "tcg-kernel-1cpu": DomainSpec(accel="tcg", kernel="/lib/vmlinux", initrd="/lib/initrd",
                                  cmdline="console=ttyS0 root=/dev/vda", **BASE),
    "kvm-disk-2cpu-net": DomainSpec(accel="kvm", network="user",
                                    **{**BASE, "vcpu_pins": (2, 3), "memory_mb": 2048}),
    "tcg-disk-4cpu-noshare": DomainSpec(accel="tcg", **{**BASE, "vcpu_pins": (0, 1, 2, 3),
                                                        "shares": ()}),
    # a site share (a third virtiofs), a scratch disk, and a NIC on vibatch's NAT bridge
    "tcg-kernel-site-scratch": DomainSpec(
        accel="tcg", kernel="/lib/vmlinux", scratch_disk="/var/lib/vibatch/jobs/42/scratch.img",
        network="nat", network_bridge="vbnat0", mac="52:54:00:76:62:0b",
        **{**BASE, "shares": BASE["shares"] + (
            Share("/var/lib/vibatch/jobs/42/shares/vbsite0.json", "vbsite0"),)}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case, request):
    xml = render(CASES[case])
    path = os.path.join(GOLDEN, case + ".xml")
    if request.config.getoption("--update-golden"):
        with open(path, "w") as f:
            f.write(xml)
    with open(path) as f:
        assert xml == f.read(), f"{case}: XML differs from {path} (--update-golden to accept)"


def test_every_spec_field_changes_the_xml():
    """Each DomainSpec field reaches the XML: a field no golden case exercises would fail here."""
    import dataclasses
    spec = CASES["tcg-kernel-site-scratch"]
    changes = {"scratch_disk": None, "scratch_serial": "other","name": "other", "accel": "kvm", "vcpu_pins": (5,), "memory_mb": 1024,
               "disk_overlay": "/x", "disk_base": "/y", "disk_base_format": "raw",
               "console_log": "/c", "user_agent_socket": "/s", "shares": (),
               "kernel": None, "initrd": None, "cmdline": "quiet", "machine": "pc",
               "emulator": "/e", "virtiofsd": "/v", "tcg_tb_cache_mb": 32, "network": "user", "network_bridge": "br9",
               "mac": "52:54:00:00:00:01",
               "metadata": (("job_id", "43"),), "template": True, "cpu_weight": 10,
               "process_ids": (64055, 65400)}
    assert set(changes) == {f.name for f in dataclasses.fields(DomainSpec)}
    for field, value in changes.items():
        spec = dataclasses.replace(CASES["tcg-kernel-site-scratch"], initrd="/lib/initrd")
        assert render(dataclasses.replace(spec, **{field: value})) != render(spec), field


def test_a_job_group_runs_qemu_with_it_and_still_relabels_nothing():
    """Grid Engine's add_grp_id (request.process_gid): QEMU runs as its own uid with that gid
    (libvirt adds it to the uid's groups), and libvirt still chowns no file (relabel='no')."""
    import dataclasses
    root = build(dataclasses.replace(CASES["kvm-disk-2cpu-net"], process_ids=(64055, 65400)))
    label = root.find("seclabel")
    assert (label.get("type"), label.get("model"), label.get("relabel")) == ("static", "dac", "no")
    assert label.findtext("label") == "+64055:+65400"
    assert len(root.findall("seclabel")) == 1


def test_pinning_and_safety_properties():
    root = build(CASES["kvm-disk-2cpu-net"])
    pins = {p.get("vcpu"): p.get("cpuset") for p in root.iter("vcpupin")}
    assert pins == {"0": "2", "1": "3"}
    assert root.find("cputune/emulatorpin").get("cpuset") == "2,3"
    assert root.get("type") == "kvm"
    seclabel = root.find("seclabel")                 # the library's files are never chowned
    assert (seclabel.get("type"), seclabel.get("model")) == ("none", "dac")
    assert root.find("memtune") is None               # the cap is set live, see hypervisor.py
    names = [c.find("target").get("name") for c in root.iter("channel")]
    assert names == ["org.qemu.guest_agent.0", "org.vibatch.user.0"]


def test_metadata_round_trip():
    xml = render(CASES["tcg-kernel-1cpu"])
    assert read_metadata(xml) == {"job_id": "42", "user": "alice", "image_digest": "sha256:abc"}
    assert read_metadata("<domain><name>x</name></domain>") == {}
    ET.fromstring(xml)  # well-formed
