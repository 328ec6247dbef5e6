"""The library's add-time safety checks and the cached digest check (real qemu-img, small files)."""
import os
import subprocess

import pytest

from vibatch import library
from vibatch.errors import ImageIntegrityError, JobError, UnknownImage
from vibatch.library import Library


def qemu_img(*args):
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture
def lib(tmp_path):
    (tmp_path / "state").mkdir()
    return Library(str(tmp_path / "lib"), str(tmp_path / "state"))


@pytest.fixture
def disk(tmp_path):
    path = str(tmp_path / "in.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    return path


def test_add_records_manifest_and_installs_read_only(lib, disk, tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"kernel")
    img = lib.add(disk, name="alma9-2026.11", os_name="alma", os_version="9",
                  kernel=str(kernel), cmdline="root=/dev/vda")
    assert img.disk_format == "qcow2" and img.virtual_size == 64 * 2**20
    assert img.digest == "sha256:" + library.sha256_file(disk)
    st = os.stat(img.disk.path)
    assert st.st_mode & 0o777 == 0o444 and st.st_uid == 0
    assert lib.names() == ["alma9-2026.11"] and lib.get("alma9-2026.11") == img
    assert img.kernel.sha256 == library.sha256_file(str(kernel)) and img.initrd is None


def test_unknown_image_lists_what_exists(lib, disk):
    lib.add(disk, name="a", os_name="x", os_version="1")
    with pytest.raises(UnknownImage, match=r"unknown image 'b' \(available: a\)"):
        lib.get("b")
    with pytest.raises(UnknownImage, match="invalid image name"):
        lib.get("../etc")


def test_rejects_backing_file(lib, disk, tmp_path):
    child = str(tmp_path / "child.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", disk, child)
    with pytest.raises(JobError, match="has a backing file"):
        lib.add(child, name="c", os_name="x", os_version="1")
    assert lib.names() == []


def test_rejects_unknown_format_and_size(lib, tmp_path, disk):
    vmdk = str(tmp_path / "d.vmdk")
    qemu_img("create", "-q", "-f", "vmdk", vmdk, "16M")
    with pytest.raises(JobError, match="format 'vmdk' is not accepted"):
        lib.add(vmdk, name="v", os_name="x", os_version="1")
    with pytest.raises(JobError, match="exceeds the limit"):
        lib.add(disk, name="big", os_name="x", os_version="1", max_virtual_size=2**20)
    assert lib.names() == [] and not os.path.exists(lib.dir)  # nothing half-added


def test_rejects_external_data_file(lib, tmp_path):
    path, data = str(tmp_path / "ext.qcow2"), str(tmp_path / "ext.raw")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data}", path, "16M")
    with pytest.raises(JobError, match="external data file"):
        lib.add(path, name="e", os_name="x", os_version="1")


def test_verification_is_cached_by_file_identity(lib, disk, mocker):
    img = lib.add(disk, name="a", os_name="x", os_version="1")
    spy = mocker.spy(library, "sha256_file")
    assert lib.ensure_verified(img) is True          # first check hashes
    assert lib.ensure_verified(img) is False         # then the cached identity is trusted
    assert spy.call_count == 1
    os.utime(img.disk.path)                          # any change to the file's identity ...
    assert lib.ensure_verified(img) is True          # ... forces a rehash
    assert spy.call_count == 2


def test_tampered_image_is_refused(lib, disk):
    img = lib.add(disk, name="a", os_name="x", os_version="1")
    lib.ensure_verified(img)
    os.chmod(img.disk.path, 0o644)
    with open(img.disk.path, "r+b") as f:
        f.seek(100)
        f.write(b"X")
    os.chmod(img.disk.path, 0o444)
    with pytest.raises(ImageIntegrityError, match="does not match its recorded sha256"):
        lib.ensure_verified(img)


def test_writable_library_file_is_refused(lib, disk):
    img = lib.add(disk, name="a", os_name="x", os_version="1")
    os.chmod(img.disk.path, 0o666)
    with pytest.raises(ImageIntegrityError, match="writable by group or others"):
        lib.ensure_verified(img)
