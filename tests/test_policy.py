"""Which image a job gets: exact name, OS alias, queue default, site default, then the checks
(block list, quarantine, expired endorsement, allow-lists), each refusal listing what the user may
ask for. Real library (small qcow2 files), no VMs."""
import time

import pytest

from imagehelp import make_disk
from vibatch import config
from vibatch.errors import ImageNotAllowed, UnknownImage
from vibatch.images.library import Library
from vibatch.images.policy import offer, resolve


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    base = tmp_path_factory.mktemp("policy")
    (base / "state").mkdir()
    lib = Library(str(base / "lib"), str(base / "state"))
    for name in ("alma9-2026.11", "deb12-2026.11", "el7-legacy"):
        lib.add(make_disk(str(base / f"{name}.qcow2"), name), name=name, os_name=name[:4],
                os_version="1", disk_boot=True)
    return lib


def cfg(**images):
    base = {"default": "debian12", "aliases": {"el9": "alma9-2026.11", "debian12": "deb12-2026.11",
                                               "el7": "el7-legacy"},
            "queue_defaults": {"legacy": "el7"}}
    base.update(images)
    return config.parse({"images": base}, "test.yaml")


def test_order_exact_name_alias_queue_default_site_default(lib):
    c = cfg()
    r = resolve(c, lib, "alma9-2026.11")
    assert (r.image.name, r.how) == ("alma9-2026.11", "image")
    r = resolve(c, lib, "el9")
    assert (r.image.name, r.how) == ("alma9-2026.11", "alias")
    r = resolve(c, lib, None, queue="legacy")
    assert (r.image.name, r.how) == ("el7-legacy", "queue default")
    r = resolve(c, lib, "", queue="batch")
    assert (r.image.name, r.how) == ("deb12-2026.11", "site default")
    # a job that names an OS gets it, whatever its queue's default
    assert resolve(c, lib, "el9", queue="legacy").image.name == "alma9-2026.11"


def test_an_image_name_wins_over_an_alias_of_the_same_name(lib):
    c = cfg(aliases={"el7-legacy": "alma9-2026.11"})
    assert resolve(c, lib, "el7-legacy").image.name == "el7-legacy"


def test_unknown_request_lists_what_the_user_may_ask_for(lib):
    with pytest.raises(UnknownImage, match=r"unknown image or OS 'el8'; you may ask for: "
                                           r"debian12, el7, el9, alma9-2026.11, deb12-2026.11, "
                                           r"el7-legacy") as e:
        resolve(cfg(), lib, "el8")
    assert e.value.exit_code == 11 and e.value.fault == "job"
    with pytest.raises(UnknownImage, match="invalid image or OS name"):
        resolve(cfg(), lib, "../../etc/passwd")


def test_no_request_and_no_default(lib):
    with pytest.raises(UnknownImage, match="names no image or OS and the site sets no default"):
        resolve(cfg(default=""), lib, None)


def test_alias_to_a_missing_image_is_explained(lib):
    with pytest.raises(UnknownImage, match="alias 'el10' leads to image 'alma10', which is not "
                                           "installed"):
        resolve(cfg(aliases={"el10": "alma10"}), lib, "el10")


def test_blocked_by_name_or_digest(lib):
    digest = lib.get("el7-legacy").digest
    for blocked in (["el7-legacy"], [digest]):
        c = cfg(blocked=blocked)
        with pytest.raises(ImageNotAllowed, match="blocked by the site") as e:
            resolve(c, lib, "el7")
        assert "el7" not in str(e.value).split("ask for:")[1]
        assert e.value.exit_code == 11


def test_allow_lists_by_group_and_account(lib):
    c = cfg(allow_groups={"cms": ["el9"]}, allow_accounts={"legacy-proj": ["el7-legacy"]},
            accounts_enforced=True)
    assert resolve(c, lib, "alma9-2026.11", groups=["cms"]).image.name == "alma9-2026.11"
    with pytest.raises(ImageNotAllowed, match=r"not allowed for your groups or account; you may "
                                              r"ask for: el9, alma9-2026.11$"):
        resolve(c, lib, "debian12", groups=["users", "cms"])
    # lists add up: a cms member charging legacy-proj may use both
    assert resolve(c, lib, "el7", groups=["cms"], account="legacy-proj").image.name == "el7-legacy"
    # users under no list are not restricted
    assert resolve(c, lib, "debian12", groups=["users"]).image.name == "deb12-2026.11"
    # defaults are checked too
    with pytest.raises(ImageNotAllowed):
        resolve(c, lib, None, groups=["cms"])
    assert offer(c, lib, ["cms"]) == ["el9", "alma9-2026.11"]


def test_quarantined_and_expired_images_are_not_offered(lib):
    img = lib.get("deb12-2026.11")
    lib.quarantine(img, "sha512 mismatch")
    try:
        with pytest.raises(ImageNotAllowed, match=r"quarantined on this node \(sha512 mismatch\)"):
            resolve(cfg(), lib, "debian12")
        assert "debian12" not in offer(cfg(), lib)
    finally:
        lib.verify(img)   # the file is intact: verify lifts the quarantine
    img = lib.get("el7-legacy")
    lib.update_manifest(img, provenance={"catalog_url": "x", "serial": 1, "endorser": "e",
                                         "key_id": "k", "issued_at": 0, "expires_at": time.time() - 5,
                                         "synced_at": 0})
    try:
        with pytest.raises(ImageNotAllowed, match="endorsement expired"):
            resolve(cfg(), lib, "el7")
    finally:
        lib.update_manifest(img, provenance=None)
    assert resolve(cfg(), lib, "el7").image.name == "el7-legacy"


def test_config_rejects_chained_aliases_and_bad_entries():
    with pytest.raises(Exception, match="points at another alias"):
        cfg(aliases={"a": "b", "b": "img"})
    with pytest.raises(Exception, match="images.blocked"):
        cfg(blocked=["sha512:xyz"])
    with pytest.raises(Exception, match="images.allow_groups"):
        cfg(allow_groups={"cms": "el9"})


def test_an_account_allow_list_needs_the_admin_to_say_accounts_are_enforced(lib):
    """The account is the user's choice (sbatch -A, qsub -A): a list keyed by it is refused
    unless the config says the batch system enforces accounts, and ignored when it is off."""
    with pytest.raises(config.ConfigError, match="images.allow_accounts: a job's account is the "
                                                 "user's choice"):
        cfg(allow_accounts={"legacy-proj": ["el7-legacy"]})
    c = cfg(allow_groups={"cms": ["el9"]}, accounts_enforced=False)
    with pytest.raises(ImageNotAllowed):
        resolve(c, lib, "el7", groups=["cms"], account="legacy-proj")
