"""Catalog signing and verification: Ed25519 over canonical JSON, strict format, validity period."""
import base64
import copy
import json
import time

import pytest

from imagehelp import new_key, signed_doc
from vibatch.images import catalog
from vibatch.errors import CatalogRejected

SHA = "ab" * 64


def entry(name="img-1", **kw):
    e = {"name": name, "os": "alma", "os_version": "9", "arch": "x86_64", "format": "qcow2",
         "url": f"{name}/disk.qcow2", "size": 10, "sha512": SHA, "boot": "disk", "cmdline": ""}
    e.update(kw)
    return e


@pytest.fixture
def key(tmp_path):
    return new_key(str(tmp_path))


def parse(doc, public, now=None):
    return catalog.parse(catalog.dumps(doc), [public], "cat.json", now)


def test_signed_catalog_round_trips(key):
    path, public = key
    doc = signed_doc(path, [entry(), entry("img-2", boot="kernel", cmdline="root=/dev/vda",
                                          kernel={"url": "k", "size": 1, "sha512": SHA})], serial=7)
    cat = parse(doc, public)
    assert cat.serial == 7 and cat.key_id == catalog.key_id(public)
    assert [e.name for e in cat.entries] == ["img-1", "img-2"]
    assert cat.entries[1].kernel == catalog.FileRef("k", 1, SHA) and cat.entries[1].initrd is None
    # the digest identifies the signed content, whatever the file's whitespace
    again = catalog.parse(json.dumps(doc).encode(), [public], "x")
    assert again.digest == cat.digest


@pytest.mark.parametrize("change", [
    lambda s: s["images"][0].update(sha512="cd" * 64),     # a swapped image digest
    lambda s: s["images"][0].update(url="http://evil.example/x"),
    lambda s: s.update(serial=s["serial"] + 100),
    lambda s: s.update(expires_at="2099-01-01T00:00:00Z"),
    lambda s: s["images"].append(entry("extra")),
])
def test_any_modification_breaks_the_signature(key, change):
    path, public = key
    doc = signed_doc(path, [entry()])
    bad = copy.deepcopy(doc)
    change(bad["signed"])
    with pytest.raises(CatalogRejected, match="does not match the catalog's content"):
        parse(bad, public)


def test_unknown_key_is_refused_and_named(key, tmp_path):
    path, public = key
    other_path, other_public = new_key(str(tmp_path), "other.key")
    doc = signed_doc(other_path, [entry()])
    with pytest.raises(CatalogRejected, match=f"unknown key.*{catalog.key_id(other_public)}.*"
                                              f"trusts {catalog.key_id(public)}"):
        parse(doc, public)


def test_no_trusted_keys_trusts_nothing(key):
    path, _ = key
    with pytest.raises(CatalogRejected, match="no trusted keys configured"):
        catalog.parse(catalog.dumps(signed_doc(path, [])), [], "cat.json")


def test_a_second_trusted_signature_is_enough(key, tmp_path):
    path, public = key
    other_path, _ = new_key(str(tmp_path), "other.key")
    doc = signed_doc(other_path, [entry()])          # signed by a key this node does not know
    sig = catalog.load_private_key(path).sign(catalog.canonical(doc["signed"]))
    doc["signatures"].append({"key_id": catalog.key_id(public),
                              "signature": base64.b64encode(sig).decode()})
    assert parse(doc, public).key_id == catalog.key_id(public)


def test_expired_and_future_catalogs(key):
    path, public = key
    with pytest.raises(CatalogRejected, match="expired at"):
        parse(signed_doc(path, [entry()], valid_s=-60), public)
    with pytest.raises(CatalogRejected, match="issued in the future"):
        parse(signed_doc(path, [entry()], issued_offset=3600), public)
    # a node's view of time decides: the same catalog is fine a day earlier
    doc = signed_doc(path, [entry()], valid_s=60)
    assert parse(doc, public, now=time.time()).serial == 1
    with pytest.raises(CatalogRejected, match="expired"):
        parse(doc, public, now=time.time() + 120)


@pytest.mark.parametrize("bad,match", [
    (entry(name="../x"), r"images\[0\].name"),
    (entry(sha512="xyz"), r"images\[0\].sha512"),
    (entry(size=-1), r"images\[0\].size"),
    (entry(format="vmdk"), r"images\[0\].format"),
    (entry(boot="pxe"), r"images\[0\].boot"),
    (entry(boot="kernel"), r"images\[0\].kernel"),
    (entry(os=""), r"images\[0\].os"),
    ({**entry(), "surprise": 1}, r"images\[0\]: keys must be"),
])
def test_malformed_entries_are_named(key, bad, match):
    path, _ = key
    with pytest.raises(CatalogRejected, match=match):
        signed_doc(path, [bad])   # the signer refuses it already


def test_duplicate_names_refused(key):
    path, _ = key
    with pytest.raises(CatalogRejected, match="listed twice"):
        signed_doc(path, [entry(), entry()])


def test_not_a_catalog(key):
    _, public = key
    for data, match in ((b"{", "not valid JSON"), (b"[]", "expected the keys"),
                        (b'{"signed": {}, "signatures": [{}]}', "malformed signature")):
        with pytest.raises(CatalogRejected, match=match):
            catalog.parse(data, [public], "cat.json")


def test_key_strings_are_what_the_config_accepts(key):
    from vibatch import config
    _, public = key
    cfg = config.parse({"images": {"trusted_keys": [public]}}, "x")
    assert cfg.images.trusted_keys == (public,)
    with pytest.raises(Exception, match="images.trusted_keys"):
        config.parse({"images": {"trusted_keys": ["ed25519:AAAA"]}}, "x")
