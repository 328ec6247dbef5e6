"""The suspend watcher (core/pause.py) and Grid Engine's spool readers (batch/gridengine.py),
without daemons: real processes stopped and continued, a recording stand-in for the domain, and
spool directories made here. The real route is tested on real Grid Engine
(test_batch_gridengine.py: qmod -sj/-usj, qacct)."""
import dataclasses
import errno
import os
import signal
import subprocess
import sys
import threading
import time

import libvirt
import pytest

from vibatch.batch import gridengine, kit
from vibatch.core import pause
from vibatch.errors import NodeError


class FakeDomain:
    """What pause.follow uses of a libvirt domain; records suspend and resume."""

    def __init__(self):
        self.running, self.calls = True, []

    def state(self):
        return [libvirt.VIR_DOMAIN_RUNNING if self.running else libvirt.VIR_DOMAIN_PAUSED, 0]

    def suspend(self):
        self.running = False
        self.calls.append("suspend")

    def resume(self):
        self.running = True
        self.calls.append("resume")

    def isActive(self):
        return 1


def wait_for(check, timeout=10.0):
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_process_state_reads_the_letter_and_refuses_another_users_process():
    child = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); "
                              "time.sleep(30)"], stdout=subprocess.PIPE)
    try:
        # once it runs its own code (a new interpreter can be in D while it loads modules)
        assert child.stdout.readline() == b"ready\n"
        assert pause.process_state(child.pid, os.getuid()) in ("S", "R")
        os.kill(child.pid, signal.SIGSTOP)
        wait_for(lambda: pause.process_state(child.pid, os.getuid()) == "T")
        # the same pid seen as another user's (a reused pid): not the job's, never followed
        assert pause.process_state(child.pid, os.getuid() + 1) is None
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert pause.process_state(child.pid, os.getuid()) is None


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to start a process as another user")
def test_a_non_dumpable_process_is_still_its_users():
    """A process that made itself non-dumpable (prctl PR_SET_DUMPABLE 0; any process may) has
    /proc files that are root's. Read by their owner, the watcher never took it for the job's
    (a job could so keep its VM from being paused); its effective uid says whose it is."""
    code = ("import ctypes, os, sys, time; os.setgroups([]); os.setgid(65534); os.setuid(65534); "
            "assert ctypes.CDLL(None).prctl(4, 0, 0, 0, 0) == 0; print('ready', flush=True); "
            "time.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        assert os.stat(f"/proc/{child.pid}/stat").st_uid == 0     # its /proc files say root's
        assert pause.process_state(child.pid, NOBODY) in ("S", "R")
        assert pause.process_state(child.pid, 0) is None
    finally:
        child.kill()
        child.wait()


def test_the_watcher_mirrors_the_jobs_stop_and_continue_and_ends_with_the_job():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dom, resumed, result = FakeDomain(), [], {}
    t = threading.Thread(target=lambda: result.update(why=pause.follow(
        dom, lambda: child.pid, os.getuid(), 60, resumed.append)))
    t.start()
    try:
        os.kill(child.pid, signal.SIGSTOP)
        wait_for(lambda: dom.calls == ["suspend"])
        os.kill(child.pid, signal.SIGCONT)
        wait_for(lambda: dom.calls == ["suspend", "resume"])
        assert resumed == [dom]          # the clock is set after each resume
    finally:
        child.kill()
        child.wait()
        t.join(10)
    assert result["why"] == "the job's process ended"
    assert dom.calls == ["suspend", "resume"]


def test_a_vm_the_batch_system_stopped_itself_is_left_alone_and_gets_its_clock_after():
    """Grid Engine's addgrpid signal stops a QEMU that carries the job's group: the watcher then
    makes no call to the domain (a monitor call to a stopped QEMU would hang) and only sets the
    clock once QEMU runs again."""
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    qemu = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dom, resumed, result = FakeDomain(), [], {}
    t = threading.Thread(target=lambda: result.update(why=pause.follow(
        dom, lambda: job.pid, os.getuid(), 60, resumed.append, [qemu.pid])))
    t.start()
    try:
        for p in (job, qemu):
            os.kill(p.pid, signal.SIGSTOP)
        wait_for(lambda: pause.process_state(job.pid, None) == "T")
        time.sleep(3 * pause.POLL_S)     # measuring: the watcher had time to act, and did not
        assert dom.calls == []
        os.kill(job.pid, signal.SIGCONT)
        time.sleep(3 * pause.POLL_S)
        assert resumed == []             # QEMU still stopped: not yet
        os.kill(qemu.pid, signal.SIGCONT)
        wait_for(lambda: resumed == [dom])
    finally:
        for p in (job, qemu):
            p.kill()
            p.wait()
        t.join(10)
    assert dom.calls == [] and result["why"] == "the job's process ended"


NOBODY = 65534
BECOME_NOBODY = ("import os, sys, time; time.sleep({delay}); os.setgroups([]); os.setgid(65534); "
                 "os.setuid(65534); os.execv(sys.executable, [sys.executable, '-c', "
                 "'import time; time.sleep(30)'])")


KERNELS = ["pidfd", "ENOSYS", "EPERM"]


def no_pidfd(monkeypatch, kernel):
    """A kernel without pidfd_open (before Linux 5.3): ENOSYS; a seccomp filter that refuses
    it: EPERM. "pidfd": this kernel's own."""
    def refuse(pid, flags=0):
        code = getattr(errno, kernel)
        raise OSError(code, os.strerror(code))
    if kernel != "pidfd":
        monkeypatch.setattr(os, "pidfd_open", refuse)


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_held_process_is_alive_until_it_ends_and_is_not_its_pids_next_owner(kernel, monkeypatch):
    """HeldProcess holds by a pidfd, or without pidfd_open by the start time: alive while it
    runs and while stopped, not once it has ended (a zombie, then reaped), and a process that
    has the pid with another start time (a reused pid) is not it. The start time is the
    process's own (psutil reads the same field as boot time + ticks)."""
    import psutil
    no_pidfd(monkeypatch, kernel)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    with pause.HeldProcess(child.pid) as held:
        assert (held.fd is None) == (kernel != "pidfd")
        started = psutil.boot_time() + int(held.start) / os.sysconf("SC_CLK_TCK")
        assert abs(started - psutil.Process(child.pid).create_time()) < 0.05, held.start
        assert held.alive()
        os.kill(child.pid, signal.SIGSTOP)
        wait_for(lambda: pause.process_state(child.pid, None) == "T")
        assert held.alive()
        if kernel != "pidfd":
            true_start = held.start
            held.start = str(int(true_start) - 1)   # the pid's owner started at another tick
            assert not held.alive()
            held.start = true_start
        os.kill(child.pid, signal.SIGKILL)
        wait_for(lambda: not held.alive())           # a zombie has ended
        child.wait()
        assert not held.alive()
    assert held.fd is None
    with pytest.raises(ProcessLookupError):
        pause.HeldProcess(child.pid)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.skipif(os.getuid() != 0, reason="needs root to start a process that becomes another user")
def test_a_job_named_while_it_is_still_root_is_followed_once_it_is_the_users(kernel, monkeypatch):
    """Grid Engine's shepherd writes job_pid right after fork(), before the child has become
    the job's user and exec'd the job: for that while the pid's /proc is root's. dd0c110's
    watcher took that for the job's process having ended and left; CI's real qmod -sj of a
    job whose QEMU is outside its group (vmem too small) then never paused the domain. The
    same without pidfd_open (e08f09d needed it: there the watcher raised ENOSYS)."""
    no_pidfd(monkeypatch, kernel)
    child = subprocess.Popen([sys.executable, "-c", BECOME_NOBODY.format(delay=1)])
    dom, resumed, result = FakeDomain(), [], {}
    t = threading.Thread(target=lambda: result.update(why=pause.follow(
        dom, lambda: child.pid, NOBODY, 60, resumed.append)))
    t.start()
    try:
        wait_for(lambda: pause.process_state(child.pid, NOBODY) is not None)
        assert t.is_alive(), result
        os.kill(child.pid, signal.SIGSTOP)
        wait_for(lambda: dom.calls == ["suspend"])
        os.kill(child.pid, signal.SIGCONT)
        wait_for(lambda: dom.calls == ["suspend", "resume"])
    finally:
        child.kill()
        child.wait()
        t.join(10)
    assert result["why"] == "the job's process ended" and resumed == [dom]


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_job_that_never_becomes_the_users_is_not_followed(kernel, monkeypatch):
    """A pid that stays another user's (root's here: a pid reused before the watcher saw the
    job) is never followed: its stop does not pause the domain, and the watcher gives up
    ``owner_s`` after the pid was named, however late that was; one that ends first ends the
    watcher."""
    no_pidfd(monkeypatch, kernel)
    other = os.getuid() + 1
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dom, named = FakeDomain(), time.monotonic() + 1.0
    try:
        os.kill(child.pid, signal.SIGSTOP)
        why = pause.follow(dom, lambda: child.pid if time.monotonic() > named else None, other,
                           30, lambda d: None, start_s=1.5, owner_s=1)
        assert time.monotonic() > named + 1    # its own second, though start_s was past
    finally:
        child.kill()
        child.wait()
    assert why == "the job's process never became the job user's" and dom.calls == []
    brief = subprocess.Popen([sys.executable, "-c", "pass"])
    pid = brief.pid
    threading.Timer(0.5, brief.wait).start()
    assert pause.follow(dom, lambda: pid, other, 30, lambda d: None) == "the job's process ended"


def test_a_watcher_ends_with_its_domain_though_the_process_it_follows_lives_on(monkeypatch):
    """A process that outlives the job (Torque: a session leader with the job's PBS_JOBID that
    the user started) kept the watcher until max_s (30 days); it now ends with the domain."""
    monkeypatch.setattr(pause, "DOMAIN_CHECK_S", 0.2)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dom, result = FakeDomain(), {}
    t = threading.Thread(target=lambda: result.update(why=pause.follow(
        dom, lambda: child.pid, os.getuid(), 60, lambda d: None)))
    t.start()
    try:
        time.sleep(3 * pause.POLL_S)     # measuring: it follows while the domain lives
        assert t.is_alive()
        dom.isActive = lambda: 0         # the epilogue destroyed the domain
        t.join(10)
        assert not t.is_alive() and result["why"] == "the domain ended"
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()
        t.join(10)


def test_the_watcher_leaves_a_domain_it_did_not_pause():
    """A domain paused by someone else (an admin) is not resumed by the job's process running."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.6)"])
    dom = FakeDomain()
    dom.running = False
    why = pause.follow(dom, lambda: child.pid, os.getuid(), 30, lambda d: None)
    child.wait()
    assert why == "the job's process ended" and dom.calls == []


CONFIG = ("add_grp_id=65400\nh_vmem=INFINITY\ns_vmem=INFINITY\njob_owner=alice\njob_id=17\n"
          "ja_task_id=0\nqueue=all.q\n")


def test_the_job_group_comes_from_this_jobs_config_only(tmp_path):
    (tmp_path / "config").write_text(CONFIG)
    conf = gridengine.read_spool_config(str(tmp_path))
    assert gridengine.job_group(conf, "17", "0", "alice") == 65400
    assert gridengine.job_group(conf, "17", "undefined", "alice") == 65400
    for job, task, owner in (("18", "0", "alice"), ("17", "2", "alice"), ("17", "0", "bob")):
        with pytest.raises(NodeError):
            gridengine.job_group(conf, job, task, owner)
    with pytest.raises(NodeError):
        gridengine.job_group({**conf, "add_grp_id": "0"}, "17", "0", "alice")


def test_a_config_that_is_a_link_is_not_read(tmp_path):
    (tmp_path / "real").write_text(CONFIG)
    (tmp_path / "config").symlink_to(tmp_path / "real")
    assert gridengine.read_spool_config(str(tmp_path)) == {}


def test_early_registration_writes_the_shepherds_file_owned_as_the_spool(tmp_path):
    spool = tmp_path / "17.1"
    spool.mkdir(mode=0o755)
    gridengine.register_early(str(spool), 65400)
    st = os.stat(spool / "addgrpid")
    assert (spool / "addgrpid").read_text() == "65400\n"
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (os.stat(spool).st_uid,
                                                          os.stat(spool).st_gid, 0o644)
    assert sorted(os.listdir(spool)) == ["addgrpid"]
    os.chmod(spool, 0o777)             # not execd's: refused, nothing written
    os.unlink(spool / "addgrpid")
    with pytest.raises(NodeError):
        gridengine.register_early(str(spool), 65400)
    assert os.listdir(spool) == []


def test_outside_a_shepherd_there_is_no_watcher(tmp_path):
    assert gridengine.shepherd_spool() is None        # pytest's parent is no sge_shepherd
    assert gridengine.watcher(None, "17") is None


def test_grid_engine_memory_values_and_the_jobs_vmem_limit():
    """Values as sge_parse_num_val reads them; INFINITY and values past any memory are no
    limit; anything else is an error, never no limit."""
    values = ("400M", "2G", "1.5G", "419430400", "1000m", "1e9", "0x40000000", "010G", "2T",
              ".5G", "TRUE", "INFINITY", "infinity", "9" * 400, "0x" + "f" * 400)
    assert [gridengine.ge_memory_mb(v) for v in values] == \
        [400, 2048, 1536, 400, 953, 953, 1024, 8192, 2 << 20, 512, 0, None, None, None, 4095]
    for bad in ("", "4X", "-1M", "1:00:00", "09", "0x", "1_000", "1 G", "-inf"):
        with pytest.raises(ValueError):
            gridengine.ge_memory_mb(bad)
    conf = {"h_vmem": "1G", "s_vmem": "INFINITY"}
    assert gridengine.vmem_limit_mb(conf, 2) == 2048
    assert gridengine.vmem_limit_mb({**conf, "s_vmem": "800M"}, 1) == 800
    assert gridengine.vmem_limit_mb({"h_vmem": "INFINITY"}, 4) is None
    assert gridengine.vmem_limit_mb({}, 1) is None
    with pytest.raises(ValueError, match="s_vmem '1:0:0'"):
        gridengine.vmem_limit_mb({**conf, "s_vmem": "1:0:0"}, 1)


def fit_config(tmp_path):
    from vibatch import config
    return config.parse({"state_dir": str(tmp_path / "state"), "library_dir": str(tmp_path / "lib"),
                         "run_dir": str(tmp_path / "run")}, "fit.yaml")


def test_a_vm_is_made_to_fit_in_the_jobs_vmem_limit(tmp_path):
    """execd SIGKILLs a job whose processes hold more than its vmem limit, QEMU among them once
    it carries the job's group: the guest gets what is left of the limit after QEMU's overhead
    and the host reserve; a limit too small for any VM leaves the guest its request and QEMU
    without the group."""
    from vibatch.core.request import JobRequest, JobUser
    cfg = fit_config(tmp_path)
    over = cfg.vm.memory_overhead_mb + kit.HOST_RESERVE_MB
    req = JobRequest("17", JobUser("alice", 1000, 1000, "/"), 2, 2048, None, "/")
    here = {"host_slots": "2"}
    assert gridengine.fit_vmem(cfg, req, {**here, "h_vmem": "INFINITY"}) == (req, True)
    fitted, counted = gridengine.fit_vmem(cfg, req, {**here, "h_vmem": "1G"})
    assert counted and fitted.memory_mb == 2048 - over and fitted.cores == 2
    assert fitted.memory_mb + cfg.vm.memory_overhead_mb <= 2048 - kit.HOST_RESERVE_MB
    roomy = dataclasses.replace(req, memory_mb=512)
    assert gridengine.fit_vmem(cfg, roomy, {**here, "h_vmem": "4G"}) == (roomy, True)
    tiny = {**here, "h_vmem": f"{(cfg.jobs.min_memory_mb + over) // 2 - 1}M"}
    assert gridengine.fit_vmem(cfg, req, tiny) == (req, False)


def test_a_parallel_job_is_fitted_to_the_slots_of_this_host(tmp_path):
    """execd sums h_vmem times the slots granted on THIS host (force_job_rlimit, over the
    job's granted queues of its own host; the config's host_slots), not times the job's total.
    A PE job of 8 slots, 4 of them here, h_vmem=1G, may hold 4096 MiB here: a guest fitted to 8
    slots (and to 2b93cd0's reading) would be SIGKILLed once it filled 4 GiB. Found in review."""
    from vibatch.core.request import JobRequest, JobUser
    cfg = fit_config(tmp_path)
    req = JobRequest("17", JobUser("alice", 1000, 1000, "/"), 8, 8192, None, "/")
    conf = {"h_vmem": "1G", "s_vmem": "INFINITY", "pe_slots": "8", "host_slots": "4"}
    fitted, counted = gridengine.fit_vmem(cfg, req, conf)
    assert counted
    assert fitted.memory_mb + cfg.vm.memory_overhead_mb == 4096 - kit.HOST_RESERVE_MB
    hostfile = tmp_path / "pe_hostfile"      # one queue here: host_slots holds
    hostfile.write_text("node1 4 all.q@node1 UNDEFINED\nnode2 4 all.q@node2 UNDEFINED\n")
    assert gridengine.limit_slots({**conf, "host": "node1", "queue": "all.q",
                                   "pe_hostfile": str(hostfile)}) == 4
    # and its VM has this host's 4 cores, not the job's 8
    assert gridengine.this_host(req, conf).cores == 4
    assert gridengine.this_host(req, {"host_slots": "8"}) == req
    assert gridengine.this_host(req, {}) == req


def test_a_vmem_limit_that_cannot_be_read_keeps_qemu_out_of_the_job(tmp_path):
    """A limit vibatch cannot read, or a config without host_slots, must not be taken for no
    limit (QEMU would carry the group in an unfitted VM, and execd would kill the job): the
    VM keeps its request and QEMU stays out of the job's usage, logged with the value at
    fault. 2b93cd0 read 1e9, hex and 1T as no limit, and raised on a 400-digit value."""
    from vibatch.core.request import JobRequest, JobUser
    cfg = fit_config(tmp_path)
    req = JobRequest("17", JobUser("alice", 1000, 1000, "/"), 1, 2048, None, "/")
    assert gridengine.fit_vmem(cfg, req, {"host_slots": "1", "h_vmem": "1e9"})[1]
    assert gridengine.fit_vmem(cfg, req, {"host_slots": "1", "h_vmem": "0x40000000"})[1]
    assert gridengine.fit_vmem(cfg, req, {"host_slots": "1", "h_vmem": "9" * 400}) == (req, True)
    for conf in ({"host_slots": "1", "h_vmem": "1:0:0"}, {"h_vmem": "1G"},
                 {"host_slots": "x", "h_vmem": "1G"}):
        assert gridengine.fit_vmem(cfg, req, conf) == (req, False), conf


# Review 13 (839145a): sge_parse_num_val (SoGE 8.1.9 source/libs/uti/sge_parse_num_par.c),
# compiled from that source and run on this machine, reads these values as below; qconf and
# qsub validate with the same function, so each can be a queue's h_vmem or a default in the
# shepherd's config, which force_job_rlimit (execd_ck_to_do.c) parses with it again.
GE_READS_32BIT = [
    # hex/octal: 'u_long32 t = strtol(str, &dptr, 0)' keeps 32 bits before the multiplier
    ("0x100000000", 0),             # 4 GiB in hex: execd reads 0
    ("040000000000", 0),            # the same in octal
    ("077777777777", 4095),         # 8 GiB - 1: execd reads 4 GiB - 1
    ("0xFFFFFFFFFFFFFFFF", 4095),   # strtol saturates, then 32 bits: a limit, not none
    ("0x100000000G", 0),
]
GE_READS_STRTOD = [
    # not starting with '0' (or holding a '.'): strtod, which takes a sign, hex floats, inf, nan
    ("+4G", 4096),
    ("0x1.8p31", 3072),             # has a '.': strtod reads the hex float, 3 GiB
    ("inf", None),                  # strtod: HUGE_VAL; h_vmem += inf: never exceeded
    ("nan", None),                  # every comparison with NaN is false: never exceeded
]


def test_hex_and_octal_limits_are_read_with_grid_engines_32_bits():
    """Review 13: Grid Engine keeps 32 bits of a hex or octal value (u_long32 is unsigned int
    on LP64, basis_types.h). 839145a read it exactly: 0xFFFFFFFFFFFFFFFF, which execd enforces
    as 4 GiB - 1 per slot, as no limit (QEMU then carried the job's group in an unfitted VM),
    and 077777777777 as 8 GiB - 1 (a VM fitted to twice execd's limit)."""
    assert [gridengine.ge_memory_mb(v) for v, _ in GE_READS_32BIT] == \
        [mb for _, mb in GE_READS_32BIT]


def test_a_vm_fitted_to_an_octal_limit_fits_in_what_execd_enforces(tmp_path):
    """Review 13: -l h_vmem=077777777777 passes qsub (and vibatch's parse_memory_mb, as a
    decimal): execd holds the job to 4095 MiB on one slot; 839145a fitted the VM to 8191."""
    from vibatch.core.request import JobRequest, JobUser
    cfg = fit_config(tmp_path)
    req = JobRequest("17", JobUser("alice", 1000, 1000, "/"), 1, 16384, None, "/")
    fitted, counted = gridengine.fit_vmem(cfg, req, {"host_slots": "1", "h_vmem": "077777777777"})
    assert not counted or \
        fitted.memory_mb + cfg.vm.memory_overhead_mb + kit.HOST_RESERVE_MB <= 4095


def test_every_spelling_grid_engine_accepts_is_read_as_it_reads_it():
    """Review 13: 839145a says values are read as sge_parse_num_val does; its strtod branch
    also takes a sign, a hex float, inf and nan (qconf accepts them as a queue's h_vmem). There
    each raised ValueError (the VM then stayed out of the job's usage, though execd enforces
    3 GiB for 0x1.8p31)."""
    got = []
    for value, _ in GE_READS_STRTOD:
        try:
            got.append(gridengine.ge_memory_mb(value))
        except ValueError:
            got.append("ValueError")
    assert got == [mb for _, mb in GE_READS_STRTOD]


def test_a_job_over_two_queues_of_this_host_is_not_fitted_to_the_master_queue_alone(tmp_path):
    """Review 13: force_job_rlimit sums, over the job's granted queue instances on this host,
    each instance's h_vmem times its slots; the shepherd's config holds the master queue's
    h_vmem only (exec_job.c, WRITE_COMPLEX_AND_CONSUMABLE_ATTR(h_vmem) of master_q), and
    host_slots counts the slots of every queue here. Without an h_vmem request (which
    reduce_queue_limit writes into every granted queue alike) the queues keep their own
    limits: all.q h_vmem=4G with 1 slot and small.q h_vmem=1G with 3 slots give execd's limit
    4 + 3 = 7 GiB, and vibatch's 4G * 4 = 16 GiB: a VM of 8 GiB is counted and SIGKILLed.
    The pe_hostfile (its path is in the config) shows the second queue."""
    from vibatch.core.request import JobRequest, JobUser
    cfg = fit_config(tmp_path)
    hostfile = tmp_path / "pe_hostfile"
    hostfile.write_text("node1 1 all.q@node1 UNDEFINED\nnode1 3 small.q@node1 UNDEFINED\n")
    conf = {"h_vmem": "4G", "s_vmem": "INFINITY", "pe_slots": "4", "host_slots": "4",
            "queue": "all.q", "host": "node1", "pe_hostfile": str(hostfile)}
    req = JobRequest("17", JobUser("alice", 1000, 1000, "/"), 4, 8192, None, "/")
    fitted, counted = gridengine.fit_vmem(cfg, req, conf)
    assert not counted or \
        fitted.memory_mb + cfg.vm.memory_overhead_mb + kit.HOST_RESERVE_MB <= 7168


def test_the_job_pid_file_is_read_bounded(tmp_path):
    assert gridengine.read_job_pid(str(tmp_path)) is None
    (tmp_path / "job_pid").write_text("4242\n")
    assert gridengine.read_job_pid(str(tmp_path)) == 4242
    (tmp_path / "job_pid").write_text("1\n")
    assert gridengine.read_job_pid(str(tmp_path)) is None


def test_torques_job_starter_is_the_session_leader_with_the_jobs_id():
    """pbs_mom starts $job_starter as the leader of the job's session, with PBS_JOBID (seen on
    6.1.3.h5); the watcher follows that process, and no process without both."""
    from vibatch.batch import torque
    code = "import time; time.sleep(30)"
    leader = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                              env={"PBS_JOBID": "41.srv"})
    member = subprocess.Popen([sys.executable, "-c", code], env={"PBS_JOBID": "42.srv"})
    try:
        wait_for(lambda: torque.job_starter_pid("41.srv", os.getuid()) == leader.pid)
        assert torque.job_starter_pid("42.srv", os.getuid()) is None      # not a session leader
        assert torque.job_starter_pid("41.srv", os.getuid() + 1) is None  # not the job user's
        assert torque.job_starter_pid("41", os.getuid()) is None
    finally:
        for p in (leader, member):
            p.kill()
            p.wait()
