"""The one hook runner (vibatch.batch.main) and the BatchSystem interface, driven through
FakeBatchSystem on a recording core (tests/fakes.py); the real core on fake ports once; and
the rules the adapters keep (no lifecycle, one exit-code table each, printed in the docs)."""
import ast
import os
import signal
import subprocess
import sys

import pytest
import yaml

from fakes import FakeBatchSystem, FakeCore, fake_node
from test_core import remains, site  # noqa: F401 - site: the core's fixture (fake ports)
from vibatch import batch, config
from vibatch.batch.base import Call, exit_table_markdown
from vibatch.batch.core import Core
from vibatch.batch.kit import read_refusal, requestable_names
from vibatch.errors import Fault, NodeError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(REPO, "vibatch")


@pytest.fixture
def hook_site(tmp_path):
    path = tmp_path / "vibatch.yaml"
    path.write_text(yaml.safe_dump({"state_dir": f"{tmp_path}/state", "run_dir": f"{tmp_path}/run",
                                    "library_dir": f"{tmp_path}/lib"}))
    work = tmp_path / "work"
    work.mkdir()
    return str(path), str(work)


def run(system, argv, config_path, fail=None, log=None):
    """vibatch.batch.main as a shim calls it, without emptying the test's own environment."""
    log = [] if log is None else log
    code = batch.main(system, ["--config", config_path, *argv],
                      enter_root=lambda: log.append(("hygiene",)),
                      make_core=lambda cfg: FakeCore(cfg, log, fail))
    return code, log


def test_each_outcome_of_a_prologue_gets_its_code_from_the_systems_table(hook_site, capfd):
    path, work = hook_site
    fake = FakeBatchSystem()
    code, log = run(fake, ["prologue", "j1", "nobody", work], path)
    assert code == 0
    assert log == [("hygiene",), ("core",), ("prologue", "j1", work), ("reap asks", "fake", {}),
                   ("closed",)]
    code, _ = run(fake, ["prologue", "j1", "nobody", "/etc"], path)
    assert code == fake.EXIT["prologue"][Fault.JOB] == 10
    assert "vibatch: fake prologue failed (job fault): working directory /etc" in \
        capfd.readouterr().err
    code, _ = run(fake, ["prologue", "j1", "nobody", work], path, fail=NodeError("no slot"))
    assert code == fake.EXIT["prologue"][Fault.NODE] == 20
    assert "vibatch: fake prologue failed (node fault): no slot" in capfd.readouterr().err
    code, _ = run(fake, ["prologue", "j1", "nobody", work], path, fail=KeyError("bug"))
    assert code == 20    # a bug is the node's fault, never the user's
    assert "failed (node fault): unexpected KeyError" in capfd.readouterr().err


def test_a_bad_command_line_is_the_nodes_fault_before_any_hygiene_or_core(hook_site, capfd):
    path, _ = hook_site
    code, log = run(FakeBatchSystem(), ["prologue"], path)
    assert code == 20 and log == []
    assert "vibatch: fake prologue: no job id" in capfd.readouterr().err
    code, log = run(FakeBatchSystem(), ["nosuchhook"], path)
    assert code == 2 and log == []
    assert "usage: python -I -m vibatch.batch.fake" in capfd.readouterr().err


def test_the_epilogue_passes_the_exit_code_and_closes_its_core(hook_site):
    path, _ = hook_site
    code, log = run(FakeBatchSystem(), ["epilogue", "j1", "7"], path)
    assert code == 0 and log == [("hygiene",), ("core",), ("epilogue", "j1", 7), ("closed",)]


def test_the_deadline_stops_a_hung_prologue_as_a_node_fault(hook_site, capfd):
    path, work = hook_site
    code, log = run(FakeBatchSystem(deadline_s=1), ["prologue", "j1", "nobody", work], path,
                    fail=signal.pause)    # blocks until the hook's own alarm
    assert code == 20 and log[-1] == ("closed",)
    assert "did not finish within 1 s" in capfd.readouterr().err


def test_a_refused_job_fails_in_its_starter_with_the_reason(hook_site, capfd, monkeypatch):
    """Slurm's and Torque's way: the prologue exits 0, the starter prints why and exits 125;
    the epilogue removes the reason. The config is loaded once per hook call."""
    path, work = hook_site
    loads = []
    real_load = config.load
    monkeypatch.setattr(config, "load", lambda p=None: loads.append(p) or real_load(p))
    fake = FakeBatchSystem(keeps_refusals=True)
    code, _ = run(fake, ["prologue", "j1", "nobody", "/etc"], path)
    assert code == 0 and len(loads) == 1
    cfg = real_load(path)
    assert "working directory /etc cannot be shared" in read_refusal(cfg, "j1")
    monkeypatch.setenv("FAKE_JOB_ID", "j1")
    assert batch.main(fake, ["--config", path, "starter", "true"]) == 125
    assert "vibatch: this job cannot run: working directory /etc" in capfd.readouterr().err
    run(fake, ["epilogue", "j1"], path)
    assert read_refusal(cfg, "j1") is None


def test_a_starter_that_cannot_start_the_job_exits_with_the_tables_code(hook_site, capfd,
                                                                       monkeypatch):
    path, _ = hook_site
    monkeypatch.delenv("FAKE_JOB_ID", raising=False)
    fake = FakeBatchSystem()
    assert batch.main(fake, ["--config", path, "starter", "true"]) == \
        fake.EXIT["starter"][Fault.JOB] == 125
    assert "vibatch: fake starter: invalid job id: it is empty" in capfd.readouterr().err


def test_the_deadline_is_below_the_batch_systems_alarm():
    for name, alarm, expected in (("slurm", 300, 280), ("torque", 300, 280),
                                  ("gridengine", 600, 600), ("slurm", 10, 5)):
        assert batch.system(name).deadline_s(Call("prolog", [], alarm, "c")) == expected


@pytest.mark.skipif(os.geteuid() != 0, reason="the prologue chowns the overlay")
def test_the_fake_system_runs_the_real_core_on_fake_ports(site, tmp_path):
    """main -> Core -> lifecycle, on the fake hypervisor and agents: the VM is up after the
    prologue, and the epilogue leaves nothing."""
    cfg, hv, work = site
    assert requestable_names(cfg) == {"mini"}     # what a node feature may name: the library's
    fake = FakeBatchSystem()
    ports = {"enter_root": lambda: None, "make_core": lambda c: Core(c, fake_node(c, hv))}
    config_path = str(tmp_path / "vibatch.yaml")
    assert batch.main(fake, ["--config", config_path, "prologue", "j1", "nobody", work],
                      **ports) == 0
    assert "vibatch-j1" in hv.domains()
    assert batch.main(fake, ["--config", config_path, "epilogue", "j1", "0"], **ports) == 0
    assert remains(cfg, hv) == []


# --- the rules the adapters keep -----------------------------------------------------------
def _imports(path: str) -> set[str]:
    tree = ast.parse(open(path).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            out.add(base)
            out.update(f"{base}.{a.name}" if node.module else f"{base}{a.name}"
                       for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def _modules_imported(path: str) -> set[str]:
    """The absolute names of the vibatch modules (and names in them) ``path`` imports."""
    rel = os.path.relpath(path, REPO)[:-3].replace("/", ".")
    package = rel.rsplit(".", 1)[0]
    out = set()
    for name in _imports(path):
        if name.startswith("."):
            level = len(name) - len(name.lstrip("."))
            base = package.split(".")[:len(package.split(".")) - level + 1]
            name = ".".join(base + [name.lstrip(".")]) if name.lstrip(".") else ".".join(base)
        out.add(name)
    return out


def _py(directory: str) -> list[str]:
    return [os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(PKG, directory))
            for f in fs if f.endswith(".py")]


def test_the_layers_hold():
    """Adapters never import the lifecycle (nor the hook's Core: they get it as an argument);
    nothing below the commands imports an adapter; the commands import adapters only through
    the batch package's registry (docs/architecture.md, "Where code goes")."""
    adapters = [f"vibatch.batch.{s}" for s in batch.SYSTEMS]
    for name in batch.SYSTEMS:
        imported = _modules_imported(os.path.join(PKG, "batch", f"{name}.py"))
        assert not {i for i in imported if i.startswith(("vibatch.core.lifecycle",
                                                          "vibatch.batch.core"))}, name
    for path in _py("core") + _py("vm") + _py("images"):
        imported = _modules_imported(path)
        assert not {i for i in imported if i.startswith("vibatch.batch")}, path
        assert not {i for i in imported if i.startswith("vibatch.commands")}, path
    for path in _py("vm") + _py("images"):
        assert not {i for i in _modules_imported(path) if i.startswith("vibatch.core")}, path
    for path in _py("commands"):
        assert not {i for i in _modules_imported(path) for a in adapters
                    if i == a or i.startswith(a + ".")}, path


def test_adapters_import_no_libvirt_before_the_hooks_hygiene():
    """The root hooks empty their environment before libvirt is loaded (its client reads
    LIBVIRT_* variables); so importing an adapter must not load it."""
    for name in batch.SYSTEMS:
        code = (f"import sys; sys.path.insert(0, {REPO!r}); import vibatch.batch.{name}; "
                "print('libvirt' in sys.modules, 'vibatch.core.lifecycle' in sys.modules)")
        r = subprocess.run([sys.executable, "-I", "-B", "-c", code], capture_output=True, text=True,
                           timeout=60, env={"PATH": os.environ["PATH"]})
        assert r.stdout.split() == ["False", "False"], (name, r.stdout, r.stderr)


def test_only_make_request_builds_a_job_request():
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py") and f != "request.py":
                tree = ast.parse(open(os.path.join(root, f)).read())
                calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
                         and getattr(n.func, "id", getattr(n.func, "attr", "")) == "JobRequest"]
                assert not calls, f


@pytest.mark.parametrize("name", batch.SYSTEMS)
def test_each_system_has_one_exit_table_and_its_doc_prints_it(name):
    system = batch.system(name)
    assert system.EXIT is sys.modules[f"vibatch.batch.{name}"].EXIT
    for row in system.EXIT.values():
        assert set(row) == {None, Fault.JOB, Fault.NODE}
    with open(os.path.join(REPO, "docs", "batch", f"{name}.md")) as f:
        doc = f.read()
    assert exit_table_markdown(system) in doc, exit_table_markdown(system)


def test_the_slurm_hooks_load_their_config_once_per_call(hook_site, monkeypatch, capfd):
    """Was up to three loads (the Prolog, its refusal note, the Epilog's); one now, through
    Call.cfg. A refused job: the Prolog exits 0 with the reason left for the forwarder."""
    from vibatch.batch import slurm
    path, work = hook_site
    loads = []
    real_load = config.load
    monkeypatch.setattr(config, "load", lambda p=None: loads.append(p) or real_load(p))
    show = ("JobId=7 JobName=n\n   RunTime=00:00:01 TimeLimit=UNLIMITED TimeMin=N/A\n"
            "   Nodes=vm CPU_IDs=0 Mem=512 GRES=\n")
    monkeypatch.setattr(slurm, "scontrol_show", lambda job_id, env: show)
    for k, v in {"SLURM_JOB_ID": "7", "SLURM_JOB_USER": "nobody", "SLURMD_NODENAME": "vm",
                 "SLURM_JOB_WORK_DIR": "/etc"}.items():
        monkeypatch.setenv(k, v)
    code, log = run(slurm.SYSTEM, ["prolog"], path)
    assert code == 0 and loads == [path] and ("prologue", "7", "/etc") not in log
    assert "working directory /etc" in read_refusal(real_load(path), "7")
    loads.clear()
    monkeypatch.setenv("SLURM_JOB_WORK_DIR", work)
    code, log = run(slurm.SYSTEM, ["prolog"], path)
    assert code == 0 and loads == [path] and ("prologue", "7", work) in log
    assert read_refusal(real_load(path), "7") is None     # a requeued run is not refused
    loads.clear()
    monkeypatch.setenv("SLURM_JOB_EXIT_CODE2", "0:15")
    code, log = run(slurm.SYSTEM, ["epilog"], path)
    assert code == 0 and loads == [path] and ("epilogue", "7", 143, 15) in log   # 0:15
    assert read_refusal(real_load(path), "7") is None


def test_the_prologue_names_its_batch_system_for_reap(hook_site, monkeypatch):
    """The record keeps whom ``vibatch reap`` asks whether the job still exists, and the few
    variables the asking needs, taken from the prologue's own environment."""
    path, work = hook_site
    monkeypatch.setenv("FAKE_CONF", "/etc/fake.conf")
    _, log = run(FakeBatchSystem(), ["prologue", "j1", "nobody", work], path)
    assert ("reap asks", "fake", {"FAKE_CONF": "/etc/fake.conf"}) in log
    from vibatch.batch import slurm
    assert slurm.SYSTEM.asking_env({"SLURM_CONF": "/s.conf", "SLURMD_NODENAME": "n1",
                                    "SLURM_JOB_ID": "5"}) == {"SLURM_CONF": "/s.conf",
                                                              "SLURMD_NODENAME": "n1"}
    assert batch.job_gone("nosuchsystem", "1", {}) is None


def test_grid_engine_on_the_shared_runner(hook_site, monkeypatch, capfd):
    """The prolog's request from the qmaster's record (qstat -xml), its faults as SGE reads
    them (100: the job in error; never the queue), the epilog's exit status, the task's VM id."""
    import xml.etree.ElementTree as ET
    from vibatch.batch import gridengine
    path, work = hook_site
    record = ET.fromstring(f"<element><JB_job_number>17</JB_job_number><JB_owner>nobody"
                           f"</JB_owner><JB_cwd>{work}</JB_cwd></element>")
    monkeypatch.setattr(gridengine, "qstat_job", lambda job_id: record)
    code, log = run(gridengine.SYSTEM, ["prolog", "17", "3", "nobody", "all.q"], path)
    assert code == 0 and ("prologue", "17.3", work) in log
    record.find("JB_cwd").text = "/usr/lib"
    code, log = run(gridengine.SYSTEM, ["prolog", "17", "3", "nobody", "all.q"], path)
    assert code == 100 and not [e for e in log if e[0] == "prologue"]
    assert "gridengine prolog failed (job fault): working directory /usr/lib" in \
        capfd.readouterr().err
    monkeypatch.setenv("SGE_JOBEXIT_STAT", "7")
    code, log = run(gridengine.SYSTEM, ["epilog", "17", "3", "nobody", "all.q"], path)
    assert code == 0 and ("epilogue", "17.3", 7) in log


def test_the_alarm_comes_from_the_shim_then_the_config_then_the_system(tmp_path):
    """Slurm's Prolog= takes no arguments: batch.hook_alarm_s sets the hooks' alarm (issue 11)."""
    path = tmp_path / "vibatch.yaml"
    path.write_text("batch: {hook_alarm_s: 120}\n")
    slurm_ = batch.system("slurm")
    assert slurm_.deadline_s(Call("prolog", [], 0, str(path))) == 100        # 120 - 20
    assert slurm_.deadline_s(Call("prolog", [], 60, str(path))) == 40        # --alarm wins
    assert slurm_.deadline_s(Call("prolog", [], 0, str(tmp_path / "none"))) == 280  # default
