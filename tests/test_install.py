"""How etc/setup-node.sh installs the hooks: every file of hooks/ has its mode in hooks/modes,
and each system's docs/batch/<system>.md states the same modes (issue 11: slurm.md said 0500
while setup-node installed 0755)."""
import os
import re
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = {"slurm": "slurm", "gridengine": "gridengine", "torque": "torque",
        "htcondor": "htcondor", "libvirt": None}


def modes() -> dict:
    out = {}
    with open(os.path.join(REPO, "hooks", "modes")) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                path, mode = line.split()
                out[path] = mode
    return out


def test_every_hook_has_a_mode_and_root_hooks_are_roots_only():
    listed = modes()
    shipped = {f"{d}/{f}" for d in os.listdir(os.path.join(REPO, "hooks"))
               if os.path.isdir(os.path.join(REPO, "hooks", d))
               for f in os.listdir(os.path.join(REPO, "hooks", d))}
    assert set(listed) == shipped
    assert set(listed.values()) <= {"0500", "0555", "0644"}
    for root_hook in ("slurm/prolog", "slurm/epilog", "gridengine/prolog", "gridengine/epilog",
                      "torque/prologue", "torque/epilogue", "htcondor/vm-helper",
                      "libvirt/virtiofsd"):
        assert listed[root_hook] == "0500", root_hook


def test_the_docs_state_the_modes_setup_node_installs():
    for path, mode in modes().items():
        system, name = path.split("/")
        if DOCS[system] is None:
            continue
        with open(os.path.join(REPO, "docs", "batch", f"{DOCS[system]}.md")) as f:
            text = f.read()
        assert f"`{name}` {mode}" in text, (path, mode)
    with open(os.path.join(REPO, "etc", "setup-node.sh")) as f:
        script = f.read()
    assert '"$REPO/hooks/modes"' in script and not re.search(r"install -o root -g root -m 0755 \"\$f\"",
                                                              script)


def test_setup_node_reads_modes_as_written():
    """The shell fragment setup-node uses to look a mode up, run on the real file."""
    for path, mode in list(modes().items())[:3]:
        got = subprocess.run(["awk", "-v", f"f={path}", "$1 == f { print $2 }",
                              os.path.join(REPO, "hooks", "modes")],
                             capture_output=True, text=True, check=True).stdout.strip()
        assert got == mode
