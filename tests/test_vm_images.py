"""The image library with real VMs: `vibatch image test` on two different images, policy in the
prologue, removing an image under a running job, and a job on an image installed by sync."""
import json
import os
import subprocess

import pytest

from conftest import IMAGE_BUILD, vibatch_cmd
from imagehelp import entry_for, new_key, signed_doc, write_doc
from vmhelp import epilogue, exec_run, leftovers, prologue, variant

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DISK_BUILD = os.environ.get("VIBATCH_DISK_IMAGE_BUILD", "/var/lib/vibatch/build/diskguest")


def cli(env, *args, config=None, timeout=300):
    return subprocess.run(vibatch_cmd("--config", config or env.config_path, *args),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def diskguest(vm_env):
    """A second, different image: BIOS + SYSLINUX boot from its own MBR disk, compressed kernel,
    gzip initramfs, root on a partition, and no useradd (the job user goes into /etc/passwd)."""
    if not os.path.exists(os.path.join(DISK_BUILD, "disk.qcow2")):
        subprocess.run([os.path.join(REPO, "images/testguest/build.sh"), DISK_BUILD], check=True,
                       env={**os.environ, "LAYOUT": "disk", "NO_SHADOW": "1",
                            "HOSTNAME_TAG": "vbdisk"}, timeout=900)
    with open(os.path.join(DISK_BUILD, "KVER")) as f:
        kver = f.read().strip()
    r = cli(vm_env, "image", "add", os.path.join(DISK_BUILD, "disk.qcow2"), "--name", "diskguest",
            "--os", "vbdisk", "--os-version", kver, "--disk-boot")
    assert r.returncode == 0, r.stderr
    yield "diskguest"
    cli(vm_env, "image", "remove", "diskguest", "--force")


def _checks(stdout):
    return [line for line in stdout.splitlines() if line.startswith(("PASS", "FAIL"))]


def test_image_test_passes_on_the_test_image(vm_env):
    r = cli(vm_env, "image", "test", "testguest", "--user", "vbt-alice")
    checks = _checks(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(checks) == 9 and all(c.startswith("PASS") for c in checks)
    assert "guest: vbt-alice 23401/23401" in r.stdout
    assert "SIGTERM -> trap ran: yes, exit 42" in r.stdout


def test_image_test_passes_on_a_disk_boot_image_without_useradd(vm_env, diskguest):
    r = cli(vm_env, "image", "test", diskguest, "--user", "vbt-bob", "--cores", "2",
            "--memory", "384M")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(vbdisk" in r.stdout and "disk boot" in r.stdout
    assert "guest: vbt-bob 23402/23402" in r.stdout and "2 CPU(s)" in r.stdout
    assert all(c.startswith("PASS") for c in _checks(r.stdout))


def test_image_test_fails_and_cleans_up_on_a_broken_image(vm_env):
    cfg = variant(vm_env, "imgtest-fast", {"vm": {"boot_timeout_s": 8}})
    r = cli(vm_env, "image", "test", "silent", "--user", "vbt-alice", config=cfg)
    assert r.returncode == 35, r.stdout + r.stderr
    checks = _checks(r.stdout)
    assert checks[0].startswith("FAIL  agent answers within the boot timeout")
    assert checks[-1].startswith("PASS  nothing left behind")
    assert "failed 1 of 2 checks" in r.stderr
    assert not [d for d in os.listdir(vm_env.cfg.state_dir) if d.startswith("imagetest-")]


def test_job_names_an_os_alias_and_gets_its_image(vm_env, tracker, diskguest):
    cfg = variant(vm_env, "aliases", {"images": {"aliases": {"el-disk": diskguest}}})
    job = tracker.job_id()
    r = prologue(vm_env, job, config=cfg, args=("--image", "el-disk"))
    assert r.returncode == 0, r.stderr
    rc, out, _ = exec_run(vm_env, job, "cat", "/proc/cmdline")
    assert rc == 0 and "root=/dev/vda2" in out                 # the disk-boot image's own bootloader
    assert epilogue(vm_env, job, config=cfg).returncode == 0
    rec = [json.loads(line) for line in open(vm_env.cfg.accounting_file)][-1]
    assert rec["job_id"] == job and rec["image"] == diskguest


def test_forbidden_image_fails_the_job_only(vm_env, tracker):
    cfg = variant(vm_env, "allow", {"images": {"allow_groups": {"vbt-alice": ["silent"]}}})
    job = tracker.job_id()
    r = prologue(vm_env, job, config=cfg, args=("--image", "testguest"))
    assert r.returncode == 11 and "not allowed for your groups or account; you may ask for: " \
        "silent" in r.stderr
    assert leftovers(vm_env, job) == []


def test_remove_under_a_running_job_never_breaks_it(vm_env, tracker):
    r = cli(vm_env, "image", "add", os.path.join(IMAGE_BUILD, "disk.qcow2"), "--name", "victim",
            "--os", "vbguest", "--os-version", "t", "--kernel", os.path.join(IMAGE_BUILD, "vmlinux"),
            "--initrd", os.path.join(IMAGE_BUILD, "initrd.cpio"),
            "--cmdline", open(os.path.join(IMAGE_BUILD, "cmdline")).read().strip())
    assert r.returncode == 0, r.stderr
    version = json.loads(cli(vm_env, "image", "show", "victim", "--json").stdout)["dir"]
    job = tracker.job_id()
    assert prologue(vm_env, job, args=("--image", "victim")).returncode == 0
    r = cli(vm_env, "image", "remove", "victim")
    assert r.returncode == 33 and job in r.stderr
    r = cli(vm_env, "image", "remove", "victim", "--force")
    assert r.returncode == 0 and f"stay until job(s) {job} end" in r.stdout
    assert cli(vm_env, "image", "show", "victim").returncode == 11   # no new job gets it
    rc, out, _ = exec_run(vm_env, job, "sh", "-c", "md5sum /bin/busybox /usr/sbin/qemu-ga | wc -l")
    assert rc == 0 and out.strip() == "2"        # the VM reads its disk fine
    assert os.path.isdir(version)
    assert epilogue(vm_env, job).returncode == 0
    assert not os.path.exists(version)                                # gone once the job ended


def test_job_on_an_image_installed_by_sync(vm_env, tracker, tmp_path):
    key_path, public = new_key(str(tmp_path))
    cfg = variant(vm_env, "sync", {"images": {"trusted_keys": [public]}})
    pub = tmp_path / "pub"
    pub.mkdir()
    os.chmod(tmp_path, 0o755)
    files = {"disk": "disk.qcow2", "kernel": "vmlinux", "initrd": "initrd.cpio"}
    for name in files.values():
        os.symlink(os.path.join(IMAGE_BUILD, name), pub / name)
    e = entry_for("endorsed", os.path.join(IMAGE_BUILD, "disk.qcow2"), "disk.qcow2")
    e.update(boot="kernel", cmdline=open(os.path.join(IMAGE_BUILD, "cmdline")).read().strip())
    for what in ("kernel", "initrd"):
        ref = entry_for("x", os.path.join(IMAGE_BUILD, files[what]), files[what])
        e[what] = {k: ref[k] for k in ("url", "size", "sha512")}
    write_doc(str(pub / "catalog.json"), signed_doc(key_path, [e], serial=1))
    r = cli(vm_env, "image", "sync", str(pub / "catalog.json"), config=cfg)
    assert r.returncode == 0, r.stderr
    job = tracker.job_id()
    assert prologue(vm_env, job, config=cfg, args=("--image", "endorsed")).returncode == 0
    assert exec_run(vm_env, job, "true")[0] == 0
    assert epilogue(vm_env, job, config=cfg).returncode == 0
    # delisted: the name goes; with no job running, so do the files
    write_doc(str(pub / "catalog.json"), signed_doc(key_path, [], serial=2))
    r = cli(vm_env, "image", "sync", str(pub / "catalog.json"), config=cfg)
    assert r.returncode == 0 and "expired   endorsed" in r.stdout
    assert cli(vm_env, "image", "show", "endorsed", config=cfg).returncode == 11
