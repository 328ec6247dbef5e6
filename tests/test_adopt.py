"""core/adopt.py without daemons: which processes are the VM's (libvirt's cgroup of the domain,
in a cgroup tree made here), and what domain_running hands to the batch system's adopter."""
import os
import types

import libvirt

from fakes import libvirt_error
from vibatch import config
from vibatch.core import adopt
from vibatch.core.jobdir import JobPaths


def _cgroup(root, rel, pids):
    d = os.path.join(root, rel)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "cgroup.procs"), "w") as f:
        f.write("".join(f"{p}\n" for p in pids))


class _Dom:
    def __init__(self, dom_id):
        self.dom_id = dom_id

    def ID(self):
        return self.dom_id


def test_the_vms_processes_are_those_in_libvirts_cgroup_of_that_domain(tmp_path):
    root = str(tmp_path)
    _cgroup(root, "pids/machine/qemu-7-vibatch-42.libvirt-qemu", [101, 102])   # launchers
    _cgroup(root, "pids/machine/qemu-7-vibatch-42.libvirt-qemu/emulator", [103])  # QEMU
    _cgroup(root, "pids/machine/qemu-7-vibatch-42.libvirt-qemu/vcpu0", [103])
    _cgroup(root, "pids/machine/qemu-77-vibatch-43.libvirt-qemu", [200])  # another domain
    assert adopt.vm_pids(_Dom(7), root) == [101, 102, 103]
    assert adopt.vm_pids(_Dom(77), root) == [200]
    assert adopt.vm_pids(_Dom(8), root) == []


def _node(tmp_path, adopter, dom):
    cfg = config.parse({"state_dir": str(tmp_path / "state"), "run_dir": str(tmp_path / "run")},
                       "test")
    conn = types.SimpleNamespace(lookupByName=lambda name: dom)
    return types.SimpleNamespace(cfg=cfg, conn=conn, adopter=adopter)


def test_domain_running_hands_the_pids_to_the_adopter_and_notes_it(tmp_path, monkeypatch):
    got = []
    node = _node(tmp_path, lambda system, job, env: got.append((system, job, env)) or
                 (lambda pids: got.append(pids)), _Dom(7))
    os.makedirs(JobPaths.of(node.cfg, "42").state)
    monkeypatch.setattr(adopt, "vm_pids", lambda dom: [101, 103])
    monkeypatch.setattr(adopt, "detach", lambda work, timeout: work())   # no fork here
    state = types.SimpleNamespace(batch="slurm", job_id="42", batch_env={"SLURM_JOB_ID": "42"})
    adopt.domain_running(node, state)
    assert got == [("slurm", "42", {"SLURM_JOB_ID": "42"}), [101, 103]]
    assert os.path.exists(os.path.join(JobPaths.of(node.cfg, "42").state, adopt.ADOPTED_FILE))


def test_domain_running_never_fails_the_job(tmp_path, monkeypatch):
    """No adopter (the system needs none), no batch system, no domain, no processes: nothing
    is handed over and nothing raises."""
    calls, logged = [], []
    monkeypatch.setattr(adopt, "detach", lambda work, timeout: calls.append(work))
    monkeypatch.setattr(adopt, "log_error", lambda what, e: logged.append(f"{what}: {e}"))
    state = types.SimpleNamespace(batch="slurm", job_id="42", batch_env={})
    adopt.domain_running(_node(tmp_path, lambda *a: None, _Dom(7)), state)
    adopt.domain_running(_node(tmp_path, lambda *a: calls.append, _Dom(7)),
                         types.SimpleNamespace(batch="", job_id="42", batch_env={}))
    gone = _node(tmp_path, lambda *a: calls.append, None)

    def no_domain(name):
        raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, f"Domain not found: {name}")
    gone.conn.lookupByName = no_domain
    adopt.domain_running(gone, state)
    monkeypatch.setattr(adopt, "vm_pids", lambda dom: [])
    adopt.domain_running(_node(tmp_path, lambda *a: calls.append, _Dom(7)), state)
    assert calls == []
    assert logged == ["job 42: handing its VM to slurm: domain vibatch-42 is not running",
                      "job 42: handing its VM to slurm: no processes found in libvirt's cgroup "
                      "of vibatch-42"], logged
