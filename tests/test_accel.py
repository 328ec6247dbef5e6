"""The acceleration choice: explicit settings win; an inconclusive probe is not cached."""
import os

from vibatch.vm import accel


def test_explicit_setting_needs_no_probe(tmp_path):
    assert accel.choose("tcg", str(tmp_path), "/nonexistent/qemu", lambda: (None, None)) == "tcg"
    assert accel.choose("kvm", str(tmp_path), "/nonexistent/qemu", lambda: (None, None)) == "kvm"
    assert os.listdir(tmp_path) == []


def test_no_kernel_to_probe_with_is_not_cached(tmp_path):
    # a library of disk-boot images only: TCG for now, and probe again once a kernel is there
    assert accel.choose("auto", str(tmp_path), "/usr/bin/qemu-system-x86_64",
                         lambda: (None, None)) == "tcg"
    assert not os.path.exists(tmp_path / "accel.json")
