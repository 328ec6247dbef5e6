#!/usr/bin/env python3
"""Store a compressed initramfs uncompressed, so the guest kernel spends no time unpacking it.

Usage: decompress.py INITRD OUT
The compressed formats are those of ../testguest/extract-vmlinux.py (xz, lz4, zstd, gzip),
recognised by their magic at the start of the file. An initramfs that is already a plain cpio
archive is copied as it is; one with an uncompressed early part (CPU microcode) before the
compressed main part is refused, naming the file, as this recipe installs no microcode.
"""
import importlib.util
import os
import shutil
import subprocess
import sys

_spec = importlib.util.spec_from_file_location(
    "extract_vmlinux", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "testguest",
                                    "extract-vmlinux.py"))
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
CPIO_MAGIC = b"070701"


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.strip().splitlines()[2])
    src, dst = sys.argv[1], sys.argv[2]
    with open(src, "rb") as f:
        head = f.read(8)
    if head.startswith(CPIO_MAGIC):
        raise SystemExit(f"decompress.py: {src} starts with an uncompressed cpio (early "
                         "microcode?); this recipe expects one compressed archive")
    for magic, cmd in _mod.DECOMPRESSORS:
        if head.startswith(magic):
            with open(src, "rb") as fin, open(dst, "wb") as fout:
                subprocess.run([*cmd], stdin=fin, stdout=fout, check=True)
            with open(dst, "rb") as f:
                if not f.read(6) == CPIO_MAGIC:
                    raise SystemExit(f"decompress.py: {src} did not decompress to a cpio archive")
            return
    raise SystemExit(f"decompress.py: {src}: unknown compression (magic {head[:4].hex()})")


if __name__ == "__main__":
    main()
