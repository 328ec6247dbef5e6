"""The image library with real VMs: `vibatch image test` on two different images, policy in the
prologue, removing an image under a running job, and a job on an image installed by sync."""
import json
import os
import re
import subprocess

import pytest

from conftest import IMAGE_BUILD, vibatch_cmd
from imagehelp import entry_for, new_key, signed_doc, write_doc
from vmhelp import epilogue, exec_run, leftovers, prologue, variant, wait_until

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
    assert len(checks) == 11 and all(c.startswith("PASS") for c in checks)
    assert "PASS  Machine/Job Features give the job's allocation: $JOBFEATURES: job_id " in \
        r.stdout
    assert "guest: vbt-alice 23401/23401" in r.stdout
    assert "SIGTERM -> trap ran: yes, exit 42" in r.stdout
    assert "PASS  the job user cannot become root in the image: no sudo -n" in r.stdout


def test_image_test_passes_on_a_disk_boot_image_without_useradd(vm_env, diskguest):
    r = cli(vm_env, "image", "test", diskguest, "--user", "vbt-bob", "--cores", "2",
            "--memory", "384M")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(vbdisk" in r.stdout and "disk boot" in r.stdout
    assert "guest: vbt-bob 23402/23402" in r.stdout and "2 CPU(s)" in r.stdout
    assert all(c.startswith("PASS") for c in _checks(r.stdout))


def _scratch_dirs():
    return {d for d in os.listdir("/var/tmp") if d.startswith("vibatch-imagetest-")}


def test_image_test_fails_and_cleans_up_on_a_broken_image(vm_env):
    cfg = variant(vm_env, "imgtest-fast", {"vm": {"boot_timeout_s": 8}})
    before = _scratch_dirs()
    r = cli(vm_env, "image", "test", "silent", "--user", "vbt-alice", config=cfg)
    assert r.returncode == 35, r.stdout + r.stderr
    checks = _checks(r.stdout)
    assert checks[0].startswith("FAIL  agent answers within the boot timeout")
    assert checks[-1].startswith("PASS  nothing left behind")
    assert "failed 1 of 2 checks" in r.stderr
    assert _scratch_dirs() <= before


@pytest.fixture(scope="module")
def rootable(vm_env):
    """The test image, changed the way a careless image would be: root's password is empty,
    su is a setuid-root busybox, and /opt/rootsh/sh is a setuid-root shell (edited offline with
    debugfs on a copy; the test image itself stays as built)."""
    from vibatch.images.library import Library
    work = os.path.join(vm_env.base, "rootable")
    os.makedirs(work)
    raw = os.path.join(work, "disk.raw")
    subprocess.run(["qemu-img", "convert", "-q", "-O", "raw", os.path.join(IMAGE_BUILD, "disk.qcow2"),
                    raw], check=True)
    bb, passwd = os.path.join(work, "busybox"), os.path.join(work, "passwd")
    subprocess.run(["debugfs", "-R", f"dump /bin/busybox {bb}", raw], check=True, capture_output=True)
    subprocess.run(["debugfs", "-R", f"dump /etc/passwd {passwd}", raw], check=True,
                   capture_output=True)
    with open(passwd) as f:
        lines = [(":".join([p[0], ""] + p[2:]) if p[0] == "root" else ":".join(p))
                 for p in (line.rstrip("\n").split(":") for line in f)]
    with open(passwd, "w") as f:
        f.write("\n".join(lines) + "\n")
    cmds = ["rm /etc/passwd", f"write {passwd} /etc/passwd", "sif /etc/passwd mode 0100644",
            "rm /bin/su", f"write {bb} /bin/su", "sif /bin/su mode 0104755",
            "mkdir /opt/rootsh", f"write {bb} /opt/rootsh/sh", "sif /opt/rootsh/sh mode 0104755"]
    for path in ("/etc/passwd", "/bin/su", "/opt/rootsh/sh"):
        cmds += [f"sif {path} uid 0", f"sif {path} gid 0"]
    script = os.path.join(work, "cmds")
    with open(script, "w") as f:
        f.write("\n".join(cmds) + "\n")
    subprocess.run(["debugfs", "-w", "-f", script, raw], check=True, capture_output=True)
    disk = os.path.join(work, "disk.qcow2")
    subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", raw, disk], check=True)
    os.unlink(raw)
    with open(os.path.join(IMAGE_BUILD, "cmdline")) as f:
        cmdline = f.read().strip()
    Library(vm_env.cfg.library_dir, vm_env.cfg.state_dir).add(
        disk, name="rootable", os_name="vbguest", os_version="rootable",
        kernel=os.path.join(IMAGE_BUILD, "vmlinux"), initrd=os.path.join(IMAGE_BUILD, "initrd.cpio"),
        cmdline=cmdline)
    yield "rootable"
    cli(vm_env, "image", "remove", "rootable", "--force")


def test_image_test_warns_when_the_job_user_can_become_root(vm_env, rootable):
    r = cli(vm_env, "image", "test", rootable, "--user", "vbt-alice")
    assert r.returncode == 0, r.stdout + r.stderr        # a warning, not a failure
    warn = [line for line in r.stdout.splitlines() if line.startswith("WARN")]
    assert len(warn) == 1 and "cannot become root" in warn[0], r.stdout
    assert "setuid-root shell /opt/rootsh/sh" in warn[0]
    assert "root has an empty password in /etc/passwd" in warn[0]
    assert all(c.startswith("PASS") for c in _checks(r.stdout))


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


def _templates(env, config):
    r = cli(env, "template", "list", "--json", config=config)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def warm_restores(env) -> int:
    """The node's metrics: how many prologues restored a template (so far, this session)."""
    from vibatch.core.metrics import textfile_path
    if not os.path.exists(textfile_path(env.cfg)):
        return 0
    with open(textfile_path(env.cfg)) as f:
        m = re.search(r'^vibatch_prologue_phase_seconds_count\{phase="restore",start="warm"\} '
                      r'(\d+)$', f.read(), re.M)
    return int(m.group(1)) if m else 0


def test_image_add_builds_its_templates_in_the_background_and_remove_drops_them(vm_env, tracker):
    """templates.shapes names the image: `image add` returns at once and a background
    `template sync` makes it ready, the next job of that shape starts warm; `image remove`
    drops the template the same way."""
    config = variant(vm_env, "shapes", {"templates": {"shapes": [
        {"cores": 1, "memory_mb": 512, "images": ["warmguest"]}]}})
    with open(os.path.join(IMAGE_BUILD, "cmdline")) as f:
        cmdline = f.read().strip()
    assert _templates(vm_env, config) == []
    r = cli(vm_env, "image", "add", os.path.join(IMAGE_BUILD, "disk.qcow2"), "--name", "warmguest",
            "--os", "vbguest", "--os-version", "test", "--kernel",
            os.path.join(IMAGE_BUILD, "vmlinux"), "--initrd", os.path.join(IMAGE_BUILD, "initrd.cpio"),
            "--cmdline", cmdline, config=config)
    try:
        assert r.returncode == 0 and "template sync` runs in the background" in r.stdout, r.stderr
        assert wait_until(lambda: [(t["image"], t["cores"], t["memory_mb"], t["state"])
                                   for t in _templates(vm_env, config)]
                          == [("warmguest", 1, 512, "ready")], 180), _templates(vm_env, config)
        job = tracker.job_id()
        restores = warm_restores(vm_env)
        r = prologue(vm_env, job, config=config,
                     args=("--image", "warmguest", "--cores", "1", "--memory", "512M"))
        assert r.returncode == 0, r.stderr
        assert exec_run(vm_env, job, "true")[0] == 0
        assert epilogue(vm_env, job, config=config).returncode == 0
        with open(vm_env.cfg.accounting_file) as f:
            rec = [json.loads(line) for line in f if f'"job_id": "{job}"' in line]
        assert [(x["start"], x["template"]) for x in rec] == \
            [("warm", _templates(vm_env, config)[0]["id"])]
        assert warm_restores(vm_env) == restores + 1   # the node's metrics count it as warm
        assert leftovers(vm_env, job) == []
    finally:
        r = cli(vm_env, "image", "remove", "warmguest", "--force", config=config)
    assert r.returncode == 0 and "template sync` runs in the background" in r.stdout, r.stderr
    assert wait_until(lambda: _templates(vm_env, config) == [], 60), _templates(vm_env, config)
