"""infra/te_slim_wheel.py on a synthetic ELF library laid out as nvcc lays out its fatbins
(the real 179 MB wheel was slimmed to 29 MB with it and ran FP8 training on an H200)."""

from __future__ import annotations

import base64
import hashlib
import struct
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infra"))
import te_slim_wheel as slim  # noqa: E402

ENTRY_HEADER = 64


def fatbin(entries: list[tuple[int, int, bytes]]) -> bytes:
    body = b""
    for kind, arch, payload in entries:
        head = slim._ENTRY.pack(kind, 0x101, ENTRY_HEADER, len(payload), 0, 0, 0, 0, arch, 0, 0, 0x11)
        body += head.ljust(ENTRY_HEADER, b"\0") + payload
    return slim._FATBIN_HEADER.pack(slim.FATBIN_MAGIC, 1, 16, len(body)) + body


def elf_with(sections: dict[str, bytes]) -> bytes:
    names = b"\0" + b"".join(n.encode() + b"\0" for n in [".shstrtab", *sections])
    blobs = [(".shstrtab", names), *sections.items()]
    out, headers = bytearray(64), [bytes(64)]            # ELF header, null section
    for name, data in blobs:
        while len(out) % 8:
            out += b"\0"
        offset = len(out)
        out += data
        name_off = names.index(name.encode() + b"\0")
        headers.append(struct.pack("<IIQQQQIIQQ", name_off, 1, 0, 0, offset, len(data), 0, 0, 8, 0))
    while len(out) % 8:
        out += b"\0"
    shoff = len(out)
    out += b"".join(headers)
    out[:16] = b"\x7fELF\x02\x01\x01".ljust(16, b"\0")
    struct.pack_into("<Q", out, 0x28, shoff)
    struct.pack_into("<HHH", out, 0x3A, 64, len(headers), 1)
    return bytes(out)


SM80, SM90, PTX90 = b"A" * 40, b"B" * 24, b"C" * 16


def library() -> bytes:
    first = fatbin([(2, 80, SM80), (2, 90, SM90), (1, 90, PTX90)])
    second = fatbin([(2, 100, b"D" * 32), (2, 90, SM90)])
    return elf_with({".text": b"\x90" * 100, ".nv_fatbin": first + bytes(8) + second})


def test_prune_zeroes_the_other_architectures_only():
    lib = bytearray(library())
    before = bytes(lib)
    stats = slim.prune(lib, {90})
    assert len(lib) == len(before)
    assert lib.count(SM90) == 2 and PTX90 in lib
    assert SM80 not in lib and b"D" * 32 not in lib
    assert b"\x90" * 100 in lib                              # code outside the section untouched
    assert stats[("cubin", 80, "dropped")] == 40 and stats[("cubin", 100, "dropped")] == 32
    assert stats[("cubin", 90, "kept")] == 48 and stats[("ptx", 90, "kept")] == 16
    # headers stay: the pruned library still parses to the same entries
    assert slim.fatbin_entries(lib) == slim.fatbin_entries(before)


def test_an_architecture_the_library_lacks_is_refused():
    with pytest.raises(slim.FatbinError, match=r"no entry for arch \[70\].*\[80, 90, 100\]"):
        slim.prune(bytearray(library()), {70})


def test_a_corrupt_section_is_named_with_its_offset():
    lib = bytearray(library())
    start, _ = slim.section(lib, ".nv_fatbin")
    lib[start:start + 4] = b"\x01\x02\x03\x04"
    with pytest.raises(slim.FatbinError, match=f"bad fatbin magic 0x4030201 at offset {start}"):
        slim.fatbin_entries(lib)


def test_slim_wheel_rewrites_the_library_and_its_record(tmp_path):
    lib, so = library(), "pkg/wheel_lib/libthing.so"
    src = tmp_path / "thing-1.0-py3-none-any.whl"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr(so, lib)
        z.writestr("pkg/__init__.py", "x = 1\n")
        z.writestr("thing-1.0.dist-info/RECORD",
                   f"{so},sha256=old,{len(lib)}\npkg/__init__.py,sha256=keep,6\nthing-1.0.dist-info/RECORD,,\n")
    dst, stats = slim.slim_wheel(src, tmp_path / "out", {90})
    assert dst.name == src.name and stats[("cubin", 80, "dropped")] == 40
    with zipfile.ZipFile(dst) as z:
        new = z.read(so)
        record = z.read("thing-1.0.dist-info/RECORD").decode().splitlines()
        assert z.read("pkg/__init__.py") == b"x = 1\n"
    assert SM80 not in new and SM90 in new and len(new) == len(lib)
    digest = base64.urlsafe_b64encode(hashlib.sha256(new).digest()).rstrip(b"=").decode()
    assert record[0] == f"{so},sha256={digest},{len(new)}"
    assert record[1:] == ["pkg/__init__.py,sha256=keep,6", "thing-1.0.dist-info/RECORD,,"]
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_a_wheel_without_cuda_kernels_is_an_error(tmp_path, capsys):
    src = tmp_path / "plain-1.0-py3-none-any.whl"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("plain/lib.so", elf_with({".text": b"\x90" * 8}))
    assert slim.main([str(src), "--arch", "90", "-o", str(tmp_path / "out")]) == 1
    assert "no shared library with CUDA kernels" in capsys.readouterr().err
