"""`vibatch image sync` and `vibatch catalog …` through the real CLI, against a real HTTP server
(and file://): installs, provenance, expiry, rollback, resume, proxies, and every tamper case
failing closed with nothing half-installed."""
import json
import os
import stat
import subprocess

import pytest

from imagehelp import (Server, Site, entry_for, make_disk, new_key, signed_doc, write_doc)
from vibatch.images import catalog
from vibatch.core import lifecycle
from vibatch.images.library import Library, sha512_file


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def site(tmp_path):
    key_path, public = new_key(str(tmp_path))
    s = Site(str(tmp_path / "node"), key_path, public)
    os.makedirs(s.base)
    s.cfg = s.write_config()
    return s


@pytest.fixture
def disks(tmp_path):
    d = tmp_path / "disks"
    d.mkdir()
    return {n: make_disk(str(d / f"{n}.qcow2"), n) for n in ("a1", "a2", "b1", "evil")}


def publish(server, site, entries, serial=1, path="/cat.json", **kw):
    doc = signed_doc(site.key_path, entries, serial=serial, **kw)
    server.put(path, catalog.dumps(doc))
    return server.url(path)


def serve_disk(server, name, disk):
    server.put_file(f"/{name}/disk.qcow2", disk)
    return entry_for(name, disk, f"{name}/disk.qcow2")   # relative to the catalog


def lib(site):
    return Library(site.cfg.library_dir, site.cfg.state_dir)


def show(site, name):
    r = site.cli("image", "show", name, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def nothing_staged(site):
    staging = os.path.join(site.cfg.library_dir, ".staging")
    left = []
    for root, _dirs, files in os.walk(staging):
        left += [os.path.join(root, f) for f in files]
    return left == []


def test_sync_installs_verified_images_with_provenance(server, site, disks):
    url = publish(server, site, [serve_disk(server, "alma", disks["a1"])], serial=3)
    r = site.cli("image", "sync", url)
    assert r.returncode == 0, r.stderr
    assert "serial 3" in r.stdout and "1 installed" in r.stdout
    d = show(site, "alma")
    assert d["files"]["disk"]["sha512"] == sha512_file(disks["a1"])
    assert sha512_file(d["files"]["disk"]["path"]) == sha512_file(disks["a1"])
    st = os.stat(d["files"]["disk"]["path"])
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o444
    p = d["provenance"]
    assert p["serial"] == 3 and p["catalog_url"] == url and p["endorser"].startswith("Test")
    assert p["key_id"] == catalog.key_id(site.public) and d["usable"]
    assert d["last_verified"] is not None and nothing_staged(site)
    listing = site.cli("image", "list").stdout
    assert "alma" in listing and "#3 to" in listing


def test_same_serial_again_downloads_nothing(server, site, disks):
    url = publish(server, site, [serve_disk(server, "alma", disks["a1"])])
    assert site.cli("image", "sync", url).returncode == 0
    gets = server.files["/alma/disk.qcow2"].gets
    r = site.cli("image", "sync", url)
    assert r.returncode == 0 and "1 unchanged" in r.stdout
    assert server.files["/alma/disk.qcow2"].gets == gets


def test_new_serial_installs_new_version_and_old_goes_when_unused(server, site, disks):
    url = publish(server, site, [serve_disk(server, "alma", disks["a1"])], serial=1)
    assert site.cli("image", "sync", url).returncode == 0
    old = show(site, "alma")["dir"]
    server.put_file("/alma/disk.qcow2", disks["a2"])
    publish(server, site, [entry_for("alma", disks["a2"], "alma/disk.qcow2")], serial=2)
    assert site.cli("image", "sync", url).returncode == 0
    d = show(site, "alma")
    assert d["dir"] != old and d["provenance"]["serial"] == 2 and not os.path.exists(old)


def test_delisted_image_expires_once_its_jobs_end(server, site, disks):
    url = publish(server, site, [serve_disk(server, "alma", disks["a1"]),
                                 serve_disk(server, "deb", disks["b1"])], serial=1)
    assert site.cli("image", "sync", url).returncode == 0
    deb_dir = show(site, "deb")["dir"]
    # a job runs on deb (its state records the version it uses)
    job_dir = os.path.join(site.cfg.state_dir, "jobs", "42")
    os.makedirs(job_dir)
    with open(os.path.join(job_dir, "state.json"), "w") as f:
        json.dump({"job_id": "42", "image_dir": deb_dir}, f)
    publish(server, site, [entry_for("alma", disks["a1"], "alma/disk.qcow2")], serial=2)
    r = site.cli("image", "sync", url)
    assert r.returncode == 0 and "expired   deb" in r.stdout
    assert site.cli("image", "show", "deb").returncode == 11       # no new job gets it
    assert os.path.exists(os.path.join(deb_dir, "disk.qcow2"))     # the running job keeps it
    os.unlink(os.path.join(job_dir, "state.json"))
    os.rmdir(job_dir)
    lifecycle.library_gc(lifecycle.Node(site.cfg))                 # what every epilogue does
    assert not os.path.exists(deb_dir)


def test_modified_catalog_fails_closed(server, site, disks):
    doc = signed_doc(site.key_path, [serve_disk(server, "alma", disks["a1"])])
    doc["signed"]["images"][0]["url"] = "evil/disk.qcow2"
    server.put("/cat.json", catalog.dumps(doc))
    r = site.cli("image", "sync", server.url("/cat.json"))
    assert r.returncode == 32 and "does not match the catalog's content" in r.stderr
    assert lib(site).names() == [] and ("/alma/disk.qcow2", None) not in server.log


def test_unknown_key_fails_closed(server, site, disks, tmp_path):
    other, other_public = new_key(str(tmp_path), "rogue.key")
    doc = signed_doc(other, [serve_disk(server, "alma", disks["a1"])])
    server.put("/cat.json", catalog.dumps(doc))
    r = site.cli("image", "sync", server.url("/cat.json"))
    assert r.returncode == 32 and f"unknown key(s) {catalog.key_id(other_public)}" in r.stderr
    assert lib(site).names() == []


def test_expired_catalog_fails_closed(server, site, disks):
    url = publish(server, site, [serve_disk(server, "alma", disks["a1"])], valid_s=-1)
    r = site.cli("image", "sync", url)
    assert r.returncode == 32 and "expired at" in r.stderr and lib(site).names() == []


def test_rollback_and_reused_serial_fail_closed(server, site, disks):
    e = serve_disk(server, "alma", disks["a1"])
    old = catalog.dumps(signed_doc(site.key_path, [e], serial=4))
    url = publish(server, site, [e], serial=5)
    assert site.cli("image", "sync", url).returncode == 0
    server.put("/cat.json", old)                                  # an attacker replays serial 4
    r = site.cli("image", "sync", url)
    assert r.returncode == 32 and "serial 4 is older than serial 5" in r.stderr
    publish(server, site, [e, serve_disk(server, "deb", disks["b1"])], serial=5)
    r = site.cli("image", "sync", url)
    assert r.returncode == 32 and "accepted before with different content" in r.stderr
    assert lib(site).names() == ["alma"]


def test_swapped_image_fails_closed(server, site, disks):
    e = entry_for("alma", disks["a1"], "alma/disk.qcow2")
    with open(disks["a1"], "rb") as f:
        good = f.read()
    server.put("/alma/disk.qcow2", good[:-1] + bytes([good[-1] ^ 1]))   # same size, one bit
    r = site.cli("image", "sync", publish(server, site, [e]))
    assert r.returncode == 31 and "does not match the catalog's sha512" in r.stderr
    assert lib(site).names() == [] and nothing_staged(site)


def test_truncated_image_fails_closed(server, site, disks):
    e = entry_for("alma", disks["a1"], "alma/disk.qcow2")
    with open(disks["a1"], "rb") as f:
        server.put("/alma/disk.qcow2", f.read()[:1000])
    r = site.cli("image", "sync", publish(server, site, [e]))
    assert r.returncode == 31 and "truncated: 1000 of" in r.stderr
    assert lib(site).names() == [] and nothing_staged(site)


def test_interrupted_download_resumes_with_a_range_request(server, site, disks):
    e = serve_disk(server, "alma", disks["a1"])
    server.files["/alma/disk.qcow2"].cut_after = 100_000
    url = publish(server, site, [e])
    r = site.cli("image", "sync", url)
    assert r.returncode == 34 and "kept for the next sync" in r.stderr
    assert lib(site).names() == []
    r = site.cli("image", "sync", url)
    assert r.returncode == 0, r.stderr
    ranges = [rng for path, rng in server.log if path == "/alma/disk.qcow2"]
    assert ranges[0] is None and ranges[-1] == "bytes=100000-"
    assert show(site, "alma")["files"]["disk"]["sha512"] == e["sha512"] and nothing_staged(site)


def test_content_changing_between_parts_fails_closed(server, site, disks):
    e = serve_disk(server, "alma", disks["a1"])
    served = server.files["/alma/disk.qcow2"]
    served.cut_after = 100_000
    with open(disks["evil"], "rb") as f:
        evil = f.read()
    served.then = evil + b"\0" * (e["size"] - len(evil))   # same size, other bytes
    url = publish(server, site, [e])
    assert site.cli("image", "sync", url).returncode == 34
    r = site.cli("image", "sync", url)
    assert r.returncode == 31 and "does not match the catalog's sha512" in r.stderr
    assert lib(site).names() == [] and nothing_staged(site)       # the mixed file is gone


def test_what_is_installed_is_what_was_verified(server, site, disks):
    e = serve_disk(server, "alma", disks["a1"])
    with open(disks["evil"], "rb") as f:
        server.files["/alma/disk.qcow2"].then = f.read()          # the URL changes afterwards
    assert site.cli("image", "sync", publish(server, site, [e])).returncode == 0
    assert server.files["/alma/disk.qcow2"].gets == 1             # never fetched twice
    d = show(site, "alma")
    assert sha512_file(d["files"]["disk"]["path"]) == e["sha512"]


def test_unsafe_image_in_a_signed_catalog_is_refused(server, site, disks, tmp_path):
    child = str(tmp_path / "child.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/shadow",
                    "-u", child, "1M"], check=True)
    server.put_file("/bad/disk.qcow2", child)
    r = site.cli("image", "sync", publish(server, site, [entry_for("bad", child, "bad/disk.qcow2")]))
    assert r.returncode == 31 and "has a backing file" in r.stderr
    assert lib(site).names() == [] and nothing_staged(site)


def test_sync_goes_through_the_proxy_from_the_environment(server, site, disks):
    e = serve_disk(server, "alma", disks["a1"])
    publish(server, site, [e])
    url = "http://images.example.invalid/cat.json"                # only the proxy can reach it
    r = site.cli("image", "sync", url, env={"http_proxy": server.url("")})
    assert r.returncode == 0, r.stderr
    assert server.proxied == [url, "http://images.example.invalid/alma/disk.qcow2"]


def test_sync_over_file_urls(site, disks, tmp_path):
    pub = tmp_path / "pub"
    (pub / "alma").mkdir(parents=True)
    os.link(disks["a1"], pub / "alma" / "disk.qcow2")
    write_doc(str(pub / "cat.json"),
              signed_doc(site.key_path, [entry_for("alma", disks["a1"], "alma/disk.qcow2")]))
    r = site.cli("image", "sync", f"file://{pub}/cat.json")
    assert r.returncode == 0, r.stderr
    assert show(site, "alma")["provenance"]["catalog_url"] == f"file://{pub}/cat.json"


def test_blocked_and_foreign_arch_entries_are_skipped(server, site, disks):
    site.cfg = site.write_config(blocked=["sha512:" + sha512_file(disks["b1"])])
    url = publish(server, site, [serve_disk(server, "alma", disks["a1"]),
                                 serve_disk(server, "deb", disks["b1"]),
                                 {**serve_disk(server, "arm", disks["a2"]), "arch": "aarch64"}])
    r = site.cli("image", "sync", url)
    assert r.returncode == 0, r.stderr
    assert "deb (blocked" in r.stdout and "arm (arch aarch64" in r.stdout
    assert lib(site).names() == ["alma"]
    assert ("/deb/disk.qcow2", None) not in server.log


def test_a_catalog_never_overwrites_a_hand_added_image(server, site, disks):
    lib(site).add(disks["b1"], name="alma", os_name="x", os_version="1", disk_boot=True)
    before = show(site, "alma")["dir"]
    r = site.cli("image", "sync", publish(server, site, [serve_disk(server, "alma", disks["a1"])]))
    assert r.returncode == 32 and "added by hand" in r.stderr
    assert show(site, "alma")["dir"] == before


def test_endorser_keygen_sign_show(site, disks, tmp_path):
    pub = tmp_path / "pub"
    pub.mkdir()
    r = site.cli("catalog", "keygen", "--out", str(tmp_path / "k2"))
    assert r.returncode == 0 and stat.S_IMODE(os.stat(tmp_path / "k2").st_mode) == 0o600
    public = r.stdout.split("- ")[-1].strip()
    assert public.startswith("ed25519:")
    assert site.cli("catalog", "keygen", "--out", str(tmp_path / "k2")).returncode == 32
    draft = tmp_path / "draft.yaml"
    draft.write_text(f"endorser: Site endorsers <e@example.org>\nimages:\n"
                     f"  - name: alma\n    os: alma\n    os_version: '9.5'\n"
                     f"    disk: {{file: {disks['a1']}, url: alma/disk.qcow2}}\n    boot: disk\n")
    out = str(pub / "cat.json")
    args = ("catalog", "sign", str(draft), "--key", site.key_path, "--out", out)
    assert site.cli(*args).returncode == 0
    assert site.cli(*args).returncode == 0                         # serial 2 by default
    signed = json.loads(open(out).read())["signed"]
    assert signed["serial"] == 2 and signed["images"][0]["sha512"] == sha512_file(disks["a1"])
    assert signed["images"][0]["format"] == "qcow2"
    r = site.cli(*args, "--serial", "2")
    assert r.returncode == 32 and "not above the serial 2" in r.stderr
    r = site.cli("catalog", "show", out)
    assert r.returncode == 0 and "serial 2" in r.stdout and "alma" in r.stdout
