"""The site's read-only shares and the job's scratch disk, in a real guest.

A local tree stands in for CVMFS: guests see it at the same path, read-only whatever guest root
does (the tree belongs to the job user, who could write it on the host, so it is the share and
not the file permissions that stops the writes), and a repository bind-mounted on the host after
the VM started (as autofs mounts a CVMFS repository on first access) is visible at once. The
scratch disk has the size granted, is the job user's at $TMPDIR, and is gone after the
epilogue. (autofs itself cannot be tried here: this host's kernel has no autofs.)
"""
import json
import os
import pwd
import shutil
import subprocess

import pytest

from vmhelp import epilogue, exec_run, guest_root, leftovers, prologue, variant

pytestmark = pytest.mark.vm

USER = "vbt-alice"


@pytest.fixture
def standin(vm_env):
    """<base>/site/cvmfs (the job user's, writable by them) with one repository, an empty
    mount point for a late one, and that late repository's content elsewhere."""
    top = os.path.join(vm_env.base, "site")
    cvmfs = os.path.join(top, "cvmfs")
    os.makedirs(os.path.join(cvmfs, "sw.example.org", "bin"))
    os.makedirs(os.path.join(cvmfs, "late.example.org"))
    os.makedirs(os.path.join(top, "late-content"))
    with open(os.path.join(cvmfs, "sw.example.org", "README"), "w") as f:
        f.write("experiment software\n")
    with open(os.path.join(top, "late-content", "VERSION"), "w") as f:
        f.write("mounted after the VM started\n")
    pw = pwd.getpwnam(USER)
    uid, gid = pw.pw_uid, pw.pw_gid
    for root, dirs, files in os.walk(top):
        for name in [root] + [os.path.join(root, n) for n in dirs + files]:
            os.chown(name, uid, gid)
    os.chmod(top, 0o755)
    yield cvmfs
    subprocess.run(["umount", "-l", os.path.join(cvmfs, "late.example.org")], check=False,
                   capture_output=True)
    shutil.rmtree(top, ignore_errors=True)


def _snapshot(top):
    out = {}
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            out[os.path.relpath(path, top)] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns)
    return out


WRITES = r"""
for t in "echo x >> $d/sw.example.org/README" "touch $d/planted" "mkdir $d/dir" \
         "rm $d/sw.example.org/README" "mv $d/sw.example.org $d/moved" \
         "chmod 777 $d/sw.example.org" "ln -s / $d/link"; do
  if sh -c "$t" 2>/tmp/err; then echo "WROTE: $t"; else echo "refused: $t: $(cat /tmp/err)"; fi
done
"""
GUEST_ROOT_WRITES = r"""
d=$1
mount -o remount,rw "$d" && echo "remounted rw"
grep " $d " /proc/mounts
""" + WRITES


def test_site_shares_are_read_only_and_see_late_mounts_and_scratch_is_the_jobs(
        vm_env, tracker, standin):
    cfg_path = variant(vm_env, "site", {"shares": [{"path": standin}],
                                        "scratch": {"mount": "/scratch"}})
    job = tracker.job_id()
    workdir = vm_env.workdir(job)
    r = prologue(vm_env, job, workdir=workdir, config=cfg_path, args=("--scratch", "640M"))
    assert r.returncode == 0, r.stderr
    before = _snapshot(standin)

    # the job user reads the site's tree at the same path
    rc, out, err = exec_run(vm_env, job, "cat", f"{standin}/sw.example.org/README")
    assert (rc, out) == (0, "experiment software\n"), err

    # guest root lifts the guest's own read-only mount (that works: the guest is theirs), and
    # every write is still refused by the host: Read-only file system
    rc, out, err = guest_root(vm_env, job, GUEST_ROOT_WRITES, standin)
    assert rc == 0, err
    assert "remounted rw" in out and f" {standin} virtiofs rw" in out, out
    assert "WROTE" not in out, out
    refused = [line for line in out.splitlines() if line.startswith("refused:")]
    # creating as guest uid 0 fails first on the id (virtiofsd cannot become an id outside the
    # job user's namespace: EINVAL); every change to what exists is EROFS
    assert len(refused) == 7 and all(line.endswith(("Read-only file system", "Invalid argument"))
                                     for line in refused), out
    assert sum(line.endswith("Read-only file system") for line in refused) == 4, out
    # the job user, who owns the tree on the host, in the share guest root made read-write:
    # creating is refused too, with EROFS
    rc, out, err = exec_run(vm_env, job, "sh", "-c", 'd=$1; err=$(mktemp)\n' +
                            WRITES.replace("/tmp/err", "$err"), "writes", standin)
    refused = [line for line in out.splitlines() if line.startswith("refused:")]
    assert len(refused) == 7 and all(line.endswith("Read-only file system")
                                     for line in refused), out + err
    assert _snapshot(standin) == before
    # the same job user writes through the working directory (a read-write share served the
    # same way): it is the site share's read-only filter that refused above
    rc, out, err = exec_run(vm_env, job, "sh", "-c", 'echo from-the-job > "$1/rw-probe"', "w",
                            workdir)
    probe = os.path.join(workdir, "rw-probe")
    assert rc == 0 and os.path.exists(probe), err
    assert os.stat(probe).st_uid == vm_env.users[USER]
    os.unlink(probe)

    # a repository mounted on the host after the VM started is there in the guest
    late = os.path.join(standin, "late.example.org")
    subprocess.run(["mount", "--bind", os.path.join(os.path.dirname(standin), "late-content"),
                    late], check=True)
    rc, out, err = exec_run(vm_env, job, "cat", f"{late}/VERSION")
    assert (rc, out) == (0, "mounted after the VM started\n"), err

    # the scratch disk: the size granted, the job user's, at $TMPDIR, and usable
    rc, out, err = exec_run(vm_env, job, "sh", "-c",
                            'echo "$TMPDIR"; stat -c "%u %a" "$TMPDIR"; '
                            'df -k "$TMPDIR" | tail -n 1; '
                            'dd if=/dev/zero of="$TMPDIR/fill" bs=1M count=64 2>/dev/null && '
                            'ls -ln "$TMPDIR/fill"; cat "$JOBFEATURES/scratch_limit_bytes"')
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "/scratch" and lines[1] == f"{vm_env.users[USER]} 700", out
    size_kb = int(lines[2].split()[1])
    assert 600 * 1024 <= size_kb <= 640 * 1024, out         # 640 MiB less ext4's metadata
    assert f" {vm_env.users[USER]} " in lines[3] and " 67108864 " in lines[3], out
    assert lines[4] == str(640 << 20), out
    from vibatch.core.jobdir import JobPaths
    scratch = JobPaths.of(vm_env.cfg, job).scratch
    assert os.path.getsize(scratch) == 640 << 20

    assert epilogue(vm_env, job, config=cfg_path).returncode == 0
    assert not os.path.lexists(scratch) and leftovers(vm_env, job) == []
    with open(vm_env.cfg.accounting_file) as f:
        rec = [r for r in map(json.loads, f) if r["job_id"] == job][-1]
    assert rec["site_shares"] == [standin] and rec["scratch_bytes"] == 640 << 20
    assert rec["network"] == "none"


def test_a_missing_site_share_is_a_node_fault_naming_it(vm_env, tracker):
    missing = os.path.join(vm_env.base, "no-such-cvmfs")
    cfg_path = variant(vm_env, "site-missing", {"shares": [{"path": missing}]})
    job = tracker.job_id()
    r = prologue(vm_env, job, config=cfg_path)
    assert r.returncode == 20, r.stderr
    assert f"site share {missing} does not exist" in r.stderr
    assert leftovers(vm_env, job) == []
