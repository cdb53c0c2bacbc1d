"""Slim a Transformer Engine core wheel down to the GPU architectures it will run on.

transformer_engine_cu13-2.11.0's libtransformer_engine.so (463 MB; a 179 MB wheel) holds its
CUDA kernels for sm_75, 80, 89, 90, 100, 103 and 120, as machine code (cubin) and PTX, in the
`.nv_fatbin` section. A Hopper machine (H100/H200) loads only the sm_90 entries. This rewrites
the wheel with every other entry's payload zeroed: offsets and headers stay as they were, so
the library needs no relinking, and the zeros cost next to nothing in the wheel's deflate.
For sm_90 alone the wheel is 29 MB (it installs at the same 463 MB). That is what lets a wheel
travel where size is capped (a device call's 64 MiB here) or a slim image take less space.

    python infra/te_slim_wheel.py transformer_engine_cu13-2.11.0-...whl --arch 90 -o out/

The slimmed library then fails, as CUDA does for any missing architecture ("no kernel image is
available"), on a GPU whose architecture was dropped. Only the wheel's RECORD entry for the
library changes (its new hash and size), so pip installs it as usual.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import struct
import sys
import zipfile
from collections import Counter
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
_FATBIN_HEADER = struct.Struct("<IHHQ")          # magic, version, header size, payload size
# An entry: kind (1 PTX, 2 cubin), ?, header size, payload size, compressed size, ?,
# minor, major, arch (e.g. 90), name offset, name length, flags.
_ENTRY = struct.Struct("<HHIQIIHHIIIQ")
KINDS = {1: "ptx", 2: "cubin"}


class FatbinError(ValueError):
    pass


class NoSection(FatbinError):
    """The ELF file has no such section (a library without CUDA kernels)."""


def section(elf: bytes | bytearray, name: str) -> tuple[int, int]:
    """(file offset, size) of an ELF64 little-endian section."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise FatbinError("not a 64-bit little-endian ELF file")
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    strtab_off = headers[shstrndx][4]
    for sh_name, _type, _flags, _addr, offset, size in headers:
        end = elf.index(b"\0", strtab_off + sh_name)
        if elf[strtab_off + sh_name:end].decode() == name:
            return offset, size
    raise NoSection(f"no {name} section")


def fatbin_entries(elf: bytes | bytearray) -> list[tuple[int, int, int, int]]:
    """Every fatbin entry of the `.nv_fatbin` section: (payload offset, payload size, kind,
    arch). The section is a run of fatbins (8-byte aligned, zero padded), each a header and
    entries."""
    start, size = section(elf, ".nv_fatbin")
    pos, end, entries = start, start + size, []
    while pos < end:
        magic, _version, header_size, fat_size = _FATBIN_HEADER.unpack_from(elf, pos)
        if magic != FATBIN_MAGIC:
            if elf[pos:pos + 8] == bytes(8):
                pos += 8
                continue
            raise FatbinError(f"bad fatbin magic {magic:#x} at offset {pos}")
        entry, fat_end = pos + header_size, pos + header_size + fat_size
        if fat_end > end:
            raise FatbinError(f"fatbin at offset {pos} runs past its section")
        while entry < fat_end:
            (kind, _, entry_header, payload, _compressed, _, _minor, _major, arch,
             *_) = _ENTRY.unpack_from(elf, entry)
            if entry_header == 0 or entry + entry_header + payload > fat_end:
                raise FatbinError(f"bad fatbin entry at offset {entry}")
            entries.append((entry + entry_header, payload, kind, arch))
            entry += entry_header + payload
        pos = fat_end
    return entries


def prune(elf: bytearray, keep_archs: set[int]) -> Counter:
    """Zero the payload of every entry whose arch is not kept; returns bytes kept/dropped by
    (kind, arch, 'kept'|'dropped')."""
    stats: Counter = Counter()
    entries = fatbin_entries(elf)
    if not any(arch in keep_archs for *_, arch in entries):
        have = sorted({arch for *_, arch in entries})
        raise FatbinError(f"no entry for arch {sorted(keep_archs)}; the library has {have}")
    for offset, size, kind, arch in entries:
        kept = arch in keep_archs
        if not kept:
            elf[offset:offset + size] = bytes(size)
        stats[(KINDS.get(kind, str(kind)), arch, "kept" if kept else "dropped")] += size
    return stats


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def slim_wheel(src: Path, out_dir: Path, keep_archs: set[int]) -> tuple[Path, Counter]:
    """Write src's slimmed copy (same file name) into out_dir; every `.so` with a
    `.nv_fatbin` section is pruned."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / src.name
    if dst.resolve() == src.resolve():
        raise FatbinError(f"{dst}: the output would overwrite the input")
    tmp = dst.with_name(dst.name + ".tmp")
    stats: Counter = Counter()
    changed: dict[str, bytes] = {}
    with zipfile.ZipFile(src) as zin:
        for info in zin.infolist():
            if info.filename.endswith(".so"):
                data = bytearray(zin.read(info))
                try:
                    stats += prune(data, keep_archs)
                except NoSection:
                    continue
                except FatbinError as err:
                    raise FatbinError(f"{src.name}:{info.filename}: {err}") from None
                changed[info.filename] = bytes(data)
        if not changed:
            raise FatbinError(f"{src.name}: no shared library with CUDA kernels in it")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
            for info in zin.infolist():
                if info.filename in changed:
                    data = changed[info.filename]
                elif info.filename.endswith(".dist-info/RECORD"):
                    data = _rewrite_record(zin.read(info).decode(), changed).encode()
                else:
                    data = zin.read(info)
                zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    tmp.replace(dst)
    return dst, stats


def _rewrite_record(record: str, changed: dict[str, bytes]) -> str:
    lines = []
    for line in record.splitlines():
        path = line.split(",", 1)[0]
        if path in changed:
            line = f"{path},{_record_hash(changed[path])},{len(changed[path])}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wheel", type=Path)
    ap.add_argument("--arch", type=int, action="append", required=True,
                    help="SM architecture to keep, e.g. 90 for H100/H200 (repeat for more)")
    ap.add_argument("-o", "--out-dir", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        dst, stats = slim_wheel(args.wheel, args.out_dir, set(args.arch))
    except (FatbinError, OSError, zipfile.BadZipFile) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    kept = sum(v for (_, _, k), v in stats.items() if k == "kept")
    dropped = sum(v for (_, _, k), v in stats.items() if k == "dropped")
    print(f"{dst}: {dst.stat().st_size / 1e6:.1f} MB (was {args.wheel.stat().st_size / 1e6:.1f} MB); "
          f"kernel code kept {kept / 1e6:.1f} MB, zeroed {dropped / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
