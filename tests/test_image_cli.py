"""`vibatch image add/list/show/verify/remove/resolve` through the real CLI (no VMs)."""
import json
import os
import pwd

import pytest

from imagehelp import Site, make_disk, new_key


@pytest.fixture
def site(tmp_path):
    key_path, public = new_key(str(tmp_path))
    s = Site(str(tmp_path / "node"), key_path, public)
    os.makedirs(s.base)
    s.cfg = s.write_config(aliases={"el9": "alma"}, default="el9")
    return s


@pytest.fixture
def disk(tmp_path):
    return make_disk(str(tmp_path / "d.qcow2"), "alma")


def add(site, disk, name="alma", *extra):
    return site.cli("image", "add", disk, "--name", name, "--os", "alma", "--os-version", "9.5",
                    "--disk-boot", *extra)


def test_add_list_show(site, disk):
    r = add(site, disk)
    assert r.returncode == 0 and "added alma: alma 9.5 (disk boot, qcow2), sha512:" in r.stdout
    lines = site.cli("image", "list").stdout.splitlines()
    assert lines[0].split() == ["NAME", "OS", "VERSION", "SIZE", "DIGEST", "ENDORSED", "IN",
                                "USE", "VERIFIED"]
    row = lines[1].split()
    assert row[:3] == ["alma", "alma", "9.5"] and row[5] == "local" and row[6] == "0"
    text = site.cli("image", "show", "alma").stdout
    assert "aliases:       el9" in text and "nobody (added locally" in text
    assert "usable:        yes" in text
    d = json.loads(site.cli("image", "list", "--json").stdout)[0]
    assert d["boot"] == "disk" and d["format"] == "qcow2" and d["aliases"] == ["el9"]


def test_add_errors_name_the_problem_and_leave_nothing(site, disk, tmp_path):
    r = site.cli("image", "add", str(tmp_path / "nope.qcow2"), "--name", "x", "--os", "a",
                 "--os-version", "1", "--disk-boot")
    assert r.returncode == 31 and "nope.qcow2: no such file" in r.stderr
    r = site.cli("image", "add", disk, "--name", "x", "--os", "a", "--os-version", "1")
    assert r.returncode == 31 and "--disk-boot" in r.stderr
    r = add(site, disk, "../x")
    assert r.returncode == 11 and "invalid image name" in r.stderr
    big = site.write_config(max_virtual_size_gb=1)
    huge = make_disk(str(tmp_path / "huge.qcow2"), "h", size="2G")
    r = add(site, huge, "huge")
    assert r.returncode == 31 and "exceeds the limit" in r.stderr and big
    assert site.cli("image", "list", "--json").stdout.strip() == "[]"
    lib = site.cfg.library_dir
    assert os.listdir(os.path.join(lib, ".staging")) == []


def test_verify_quarantines_and_list_shows_it(site, disk):
    add(site, disk)
    r = site.cli("image", "verify", "--all")
    assert r.returncode == 0 and "ok   alma:" in r.stdout and "MiB/s" in r.stdout
    path = json.loads(site.cli("image", "show", "alma", "--json").stdout)["files"]["disk"]["path"]
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(4096)
        f.write(b"tampered")
    os.chmod(path, 0o444)
    r = site.cli("image", "verify", "alma")
    assert r.returncode == 23 and "FAIL alma: image 'alma': disk.qcow2 does not match" in r.stdout
    assert "QUARANTINED" in site.cli("image", "list").stdout
    # a job asking for it now fails as the job's fault, naming the reason
    r = site.cli("image", "resolve", "el9", "--user", "nobody")
    assert r.returncode == 11 and "quarantined on this node" in r.stderr


def test_verify_due_only_rehashes_stale_versions(site, disk):
    add(site, disk)
    r = site.cli("image", "verify", "--due")
    assert r.returncode == 0 and r.stdout == ""                  # just hashed by add
    site.write_config(verify_interval_h=0)
    r = site.cli("image", "verify", "--due")
    assert r.returncode == 0 and "ok   alma" in r.stdout
    r = site.cli("image", "verify")
    assert r.returncode == 31 and "name one image, or use --all or --due" in r.stderr


def test_resolve_follows_the_policy(site, disk):
    add(site, disk)
    me = pwd.getpwuid(os.getuid()).pw_name
    r = site.cli("image", "resolve", "--user", me)
    assert r.returncode == 0 and r.stdout.startswith("alma (site default;")
    r = site.cli("image", "resolve", "el9", "--user", me)
    assert r.stdout.startswith("alma (alias;")
    r = site.cli("image", "resolve", "el8", "--user", me)
    assert r.returncode == 11 and "you may ask for: el9, alma" in r.stderr


def test_remove_deletes_an_unused_image(site, disk):
    add(site, disk)
    r = site.cli("image", "remove", "alma")
    assert r.returncode == 0 and "1 version(s) deleted" in r.stdout
    assert site.cli("image", "show", "alma").returncode == 11
    assert os.listdir(os.path.join(site.cfg.library_dir, ".store")) == []


def test_the_offer_file_follows_the_library_and_doctor_sees_a_stale_one(site, disk, tmp_path):
    """batch.offer_file (what Slurm's job_submit.lua reads) is rewritten by image add and
    remove; one that fell behind is reported by doctor."""
    import yaml
    from vibatch import config
    from vibatch.commands import doctor
    from vibatch.images import offerfile
    offer = tmp_path / "etc" / "offer"
    with open(site.config_path) as f:
        data = yaml.safe_load(f)
    data["batch"] = {"offer_file": str(offer)}
    with open(site.config_path, "w") as f:
        yaml.safe_dump(data, f)
    r = add(site, disk)
    assert r.returncode == 0 and f"rewrote the offer file {offer}" in r.stdout, r.stderr
    assert offer.read_text() == "el9\nalma\n"
    assert add(site, make_disk(str(tmp_path / "r.qcow2"), "rocky"), "rocky").returncode == 0
    assert offer.read_text() == "el9\nalma\nrocky\n"
    assert site.cli("image", "remove", "rocky").returncode == 0
    assert offer.read_text() == "el9\nalma\n"
    cfg = config.load(site.config_path)
    assert offerfile.stale(cfg, str(offer)) is None
    offer.write_text("el9\nrocky\n")       # an old copy, as a cron-less site had it
    assert offerfile.stale(cfg, str(offer)) == f"{offer} lacks alma; still offers rocky"
    [check] = list(doctor._offer(cfg, str(tmp_path / "slurm.conf")))
    assert check.level == doctor.WARN and "lacks alma" in check.detail
