"""A writable working copy with a hard size limit: ``run_command(..., workdir_quota_bytes=N)``.

A read-write bind of the host's folder lets a command write as much to the host's disk as its
wall time allows (one agent call wrote 300 MB in 163 ms). Here the command's /work is instead a
tmpfs of N bytes: the launcher in the sandbox (``server.launch_on_copy``) copies the host's
folder onto it from a read-only bind, runs the command, kills every process it left, and sends
the tmpfs back as a tar over a pipe that only the launcher holds, then its status. The command's
writes fail with ENOSPC past N, and it has no file of the host's disk to write (or fallocate) at
all.

The host reads the pipe into a temporary file, at most ``2 N + 1 MiB`` of it, and only a tar
followed by the launcher's status counts. The tar's content is the command's, so it is unpacked
by ``unpack`` here, not by tarfile's extraction (whose filters have had bypasses): only folders,
regular files (a hard link as a copy of its file) and links that stay inside the copy, each created under an open folder descriptor
with O_NOFOLLOW and O_EXCL (nothing is followed, nothing existing is overwritten), at most
``2 N`` bytes on the host's disk counting 4 KiB per entry, names at most MAX_DEPTH deep. The new
folder then takes the old one's place in one atomic exchange (renameat2). Anything wrong leaves
the folder as it was and says why (``CommandResult.workdir_error``).

The tmpfs's inodes (empty files and folders cost kernel memory, not quota bytes) count in the
sandbox's memory cap (``memcg``), which grows by N.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import stat
import tarfile
import tempfile

from .bwrap import Bind
from .limits import Limits

SRC, DEST = "/sandbox/workdir_in", "/work"
COPY_GRACE_SECONDS = 20.0   # the host's wall clock over the command's: the copies in and out
ENTRY_BYTES = 4096          # what a folder or an empty file costs on the host's disk, at least
MAX_DEPTH = 256             # path components of a name in the copy
STATUS_BYTES = 1 << 16     # the launcher's status line (an error naming long paths included)


class CopyRefused(ValueError):
    """The copy the sandbox sent back is not taken (over the budget, a bad name, cut short)."""


class FrameSink:
    """The host's end of the launcher's pipe: tar frames (8-byte length, bytes) into ``path``
    up to ``cap`` bytes, an empty frame, then the status line. ``feed`` is given each chunk."""

    def __init__(self, path: str, cap: int):
        self.file, self.cap = open(path, "wb"), cap
        self.head, self.left, self.total = bytearray(), 0, 0
        self.ended, self.status = False, bytearray()

    def feed(self, chunk: bytes) -> None:
        data = memoryview(chunk)
        while data:
            if self.ended:
                self.status += data[:STATUS_BYTES - len(self.status)]
                return
            if self.left == 0:
                take = data[:8 - len(self.head)]
                self.head += take
                data = data[len(take):]
                if len(self.head) == 8:
                    self.left, self.head = int.from_bytes(self.head, "big"), bytearray()
                    self.ended = self.left == 0
                continue
            take = data[:self.left]
            self.total += len(take)
            if self.total <= self.cap:
                self.file.write(take)
            self.left -= len(take)
            data = data[len(take):]

    @property
    def complete(self) -> bool:
        return self.ended and self.status.endswith(b"\n")

    def result(self) -> dict:
        """The launcher's status, once the tar arrived whole; CopyRefused otherwise."""
        self.file.close()
        if not self.complete:
            raise CopyRefused("the sandbox ended before sending the working copy back")
        if self.total > self.cap:
            raise CopyRefused(f"the working copy's tar is over {self.cap} bytes")
        head = json.loads(bytes(self.status), parse_constant=_no_constant)
        if not isinstance(head, dict):
            raise CopyRefused("no status")
        return head


def _no_constant(name: str):
    raise CopyRefused(f"{name} in the status")


class QuotaCopy:
    """One command's size-limited copy of the folder ``wd`` (see the module docstring)."""

    def __init__(self, wd: str, quota_bytes: int, limits: Limits):
        if quota_bytes <= 0:
            raise ValueError(f"workdir_quota_bytes must be positive, got {quota_bytes}")
        self.wd, self.quota = wd, int(quota_bytes)
        self.box = tempfile.mkdtemp(prefix=".cw-quota-", dir=os.path.dirname(wd))
        self.read_fd, self.write_fd = os.pipe()
        self.sink = FrameSink(os.path.join(self.box, "copy.tar"), 2 * self.quota + (1 << 20))
        # the copy's tmpfs pages are the sandbox's memory too: its cap grows by the quota
        self.grace = COPY_GRACE_SECONDS
        self.limits = limits.replace(wall_seconds=limits.wall_seconds + self.grace,
                                     sandbox_memory_bytes=limits.sandbox_memory() + self.quota)
        self.binds = [Bind(wd, SRC)]
        self.tmpfs = [(DEST, self.quota)]
        self.launcher_config = {"workdir_copy": {"src": SRC, "dest": DEST, "out_fd": self.write_fd,
                                                 "deadline_seconds": limits.wall_seconds}}

    def started(self) -> None:
        """The sandbox holds the write end now: ours goes, so the pipe ends with the launcher."""
        os.close(self.write_fd)
        self.write_fd = -1

    def take_back(self, result) -> None:
        """Put the copy the sandbox sent back in ``wd``'s place; fill ``result``'s status from
        the launcher's (exit code, timed out, room left), or say why not in ``workdir_error``."""
        try:
            head = self.sink.result()
            if "error" in head:
                raise CopyRefused(str(head["error"]))
            code, timed_out, free = head["exit_code"], head["timed_out"], head["free_bytes"]
            if type(code) is not int or type(timed_out) is not bool or type(free) is not int:
                raise CopyRefused("a malformed status")
            new = os.path.join(self.box, "new")
            os.mkdir(new, 0o700)
            unpack(self.sink.file.name, new, 2 * self.quota)
            exchange(new, self.wd)
        except Exception as err:   # the folder stays as it was
            if result.timed_out and not self.sink.complete:
                # the host's clock ran out (copying in or out took over the grace): the
                # command's writes are lost, which "timed out" alone does not tell
                err = (f"the sandbox was killed {self.grace:g} s past the command's "
                       f"wall time, before its working copy came back")
            result.workdir_error = f"the working copy was not taken back: {err}"[:500]
            return
        sig = code - 128 if 128 < code < 128 + 65 else None   # bwrap's convention
        result.returncode, result.killed_by_signal = (-sig, sig) if sig else (code, None)
        result.timed_out, result.workdir_free_bytes = timed_out, free

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            if fd >= 0:
                os.close(fd)
        self.read_fd = self.write_fd = -1
        self.sink.file.close()
        shutil.rmtree(self.box, ignore_errors=True)


def _parts(name: str) -> list[str]:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts or len(parts) > MAX_DEPTH or len(name) > 4096:
        raise CopyRefused(f"a name the copy cannot hold: {name[:200]!r}")
    return parts


def _open_dir(root_fd: int, parts: list[str]) -> int:
    """A descriptor of the folder ``parts`` under ``root_fd``, no link followed on the way."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def unpack(tar_path: str, dest: str, budget: int) -> None:
    """The tar at ``tar_path`` into the empty folder ``dest`` (see the module docstring)."""
    root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    used = 0
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            for m in tar:
                parts = _parts(m.name)
                if not parts:
                    continue   # the root itself
                used += ENTRY_BYTES + (m.size if m.isreg() else 0)
                source = _hard_link_source(root, m)
                used += os.fstat(source).st_size if source is not None else 0
                try:
                    if used > budget:
                        raise CopyRefused(f"the working copy takes over {budget} bytes on disk")
                    parent = _open_dir(root, parts[:-1])
                    try:
                        _make(tar, m, parts, parent, source)
                    finally:
                        os.close(parent)
                finally:
                    if source is not None:
                        os.close(source)
    finally:
        os.close(root)


def _hard_link_source(root: int, m: tarfile.TarInfo) -> int | None:
    """For a hard link (a second name of a file the tar already held), a descriptor of that
    file as unpacked: the name is kept as a copy of it (dropping it lost a file: tar stores
    the first name in its order as the file, whichever the command made first)."""
    if not m.islnk():
        return None
    parts = _parts(m.linkname)
    if not parts:
        return None
    parent = _open_dir(root, parts[:-1])
    try:
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=parent)
    except FileNotFoundError:
        return None
    finally:
        os.close(parent)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def _link_stays_inside(target: str, depth: int) -> bool:
    """A link ``depth`` folders below the copy's root to ``target`` resolves inside the copy:
    relative, and ".." only as a leading run no longer than ``depth``. A ".." after another
    component is refused: that component may itself be a link (``d -> .``), and the kernel
    climbs from where it leads, not from where the name reads (``d/d/../../etc`` would read as
    inside and lead out)."""
    if target.startswith("/"):
        return False
    segs = [s for s in target.split("/") if s not in ("", ".")]
    lead = 0
    while lead < len(segs) and segs[lead] == "..":
        lead += 1
    return ".." not in segs[lead:] and lead <= depth


def _make(tar: tarfile.TarFile, m: tarfile.TarInfo, parts: list[str], parent: int,
          source: int | None = None) -> None:
    name = parts[-1]
    if m.isdir():   # its mode at once: the owner keeps rwx, so its entries can still be made
        os.mkdir(name, 0o700, dir_fd=parent)
        os.chmod(name, (m.mode & 0o755) | 0o700, dir_fd=parent)
    elif m.isreg() and m.sparse is None:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                     dir_fd=parent)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(tar.extractfile(m), out, 1 << 20)
            os.fchmod(out.fileno(), (m.mode & 0o755) | 0o600)
            os.utime(out.fileno(), (m.mtime, m.mtime))
    elif m.issym():
        if _link_stays_inside(m.linkname, len(parts) - 1):
            os.symlink(m.linkname, name, dir_fd=parent)
    elif source is not None:   # a hard link: a copy of the file it names
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                     dir_fd=parent)
        with os.fdopen(fd, "wb") as out, os.fdopen(os.dup(source), "rb") as src:
            src.seek(0)
            shutil.copyfileobj(src, out, 1 << 20)
            st = os.fstat(source)
            os.fchmod(out.fileno(), stat.S_IMODE(st.st_mode))
            os.utime(out.fileno(), ns=(st.st_mtime_ns, st.st_mtime_ns))
    # devices, fifos, sparse files: not kept


RENAME_EXCHANGE = 2


def exchange(new: str, old: str) -> None:
    """Swap the folders ``new`` and ``old`` in one step (renameat2 RENAME_EXCHANGE): there is
    no moment without ``old``. Where the kernel or libc lacks it, two renames."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    at_fdcwd = -100
    if fn is not None and fn(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(old),
                             RENAME_EXCHANGE) == 0:
        return
    parked = new + ".old"
    os.replace(old, parked)
    os.replace(new, old)
    os.replace(parked, new)
