"""A memory cgroup around each sandbox: one cap on all the memory a sandbox can hold.

The rlimits bound each process (RLIMIT_AS) and each tmpfs bounds its bytes, but nothing bounded
the sum: max_processes times RLIMIT_AS, and the inodes of a tmpfs (an empty file costs about
1 KiB of kernel memory and no tmpfs byte: 800k files made 800 MB of slab in 3.5 s). A memory
cgroup charges all of it to the sandbox (process memory, tmpfs pages, kernel objects such as
those inodes, socket buffers); past the cap the kernel's OOM killer kills inside the sandbox
only, the programs first (they raise their own oom_score_adj to 1000, see
``server._oom_first``). Memory held in a fork-server request's files and System V IPC
objects lasts until the request ends: they die with its own namespaces
(``server._fork_request``). What the cgroup does not see is refused by the seccomp filter
(``seccomp.py``: netlink sockets).

Where: a child of this process's own cgroup, in a cgroup v1 ``memory`` hierarchy or in the
unified (v2) hierarchy when its memory controller can be enabled there; it needs write access
(root, or a delegated subtree). On v2 our own cgroup must then hold no process itself (the
"no internal processes" rule): true of a delegated subtree whose processes live in a leaf,
not of most containers, where v2 therefore gives no cgroup (only v1 is tested here). Where
none can be made, sandboxes run without it (the per-process rlimits still hold; warned once).
``CODEWORLD_SANDBOX_MEMCG``: ``auto`` (default), ``require`` (no cgroup is an error; CI sets
it), ``off``.
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .bwrap import SandboxUnavailable

log = logging.getLogger(__name__)
ENV = "CODEWORLD_SANDBOX_MEMCG"
PREFIX = "codeworld-sandbox-"
# Joining happens in the process that becomes the sandbox, before it forks anything: a shell
# moves itself ("0" = the writer) into the cgroup, then execs bwrap; every process of the
# sandbox is born inside.
_JOIN = 'echo 0 > "$0" && exec "$@"'
# Socket buffers of one sandbox. On v1 they are counted apart from the cap (a sandbox can
# hold cap + TCP_BYTES); on v2 they count within it.
TCP_BYTES = 64 << 20
_seq = itertools.count()
_warned: list[str] = []
_swept: set[Path] = set()


@dataclass(frozen=True)
class _Hierarchy:
    version: int  # 1 or 2
    base: Path  # the folder new cgroups are made in (our own cgroup's folder)


@dataclass
class MemoryCgroup:
    """One cgroup capped at ``limit_bytes``; ``wrap`` puts a command in it."""

    path: Path
    version: int
    limit_bytes: int

    def wrap(self, argv: list[str]) -> list[str]:
        return ["/bin/sh", "-c", _JOIN, str(self.path / "cgroup.procs"), *argv]

    def oom_kills(self) -> int:
        """Processes the kernel killed here for the cap, so far (0 if it cannot tell)."""
        name, key = ("memory.oom_control", "oom_kill") if self.version == 1 else \
            ("memory.events", "oom_kill")
        try:
            text = (self.path / name).read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
        return 0

    def close(self, wait: float = 2.0) -> bool:
        """Remove the cgroup once its processes are gone (they die with the sandbox's pid
        namespace, a moment after its outer bwrap); False when it is still busy after
        ``wait`` seconds (a later ``create`` in a new process sweeps it)."""
        deadline = time.monotonic() + wait
        while True:
            self._reclaim()
            try:
                os.rmdir(self.path)
                return True
            except FileNotFoundError:
                return True
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                    log.warning("could not remove the sandbox's memory cgroup %s: %s",
                                self.path, exc.strerror)
                    return False
                time.sleep(0.005)

    def _reclaim(self) -> None:
        """Free the pages still charged here (page cache the sandbox read): a cgroup removed
        with charges lingers in the kernel as a "dying" one until they are reclaimed."""
        name, value = ("memory.force_empty", "0") if self.version == 1 else \
            ("memory.reclaim", str(self.limit_bytes))
        try:
            (self.path / name).write_text(value)
        except OSError:
            pass  # busy (processes still exiting) or not all reclaimable: rmdir tells


def _own_paths() -> tuple[str | None, str | None]:
    """This process's cgroup path in the v1 memory hierarchy and in the unified one."""
    v1 = v2 = None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _hid, controllers, path = line.split(":", 2)
        if controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v1, v2


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(root within the hierarchy, mount point, fs type, super options) of cgroup mounts."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) >= 5 and len(rest) >= 3 and rest[0] in ("cgroup", "cgroup2"):
            out.append((_unescape(fields[3]), _unescape(fields[4]), rest[0],
                        set(rest[2].split(","))))
    return out


def _unescape(field: str) -> str:
    """mountinfo writes a space, tab, newline or backslash in a path as \\ooo (octal)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _under(mount_root: str, mount_point: str, path: str) -> Path | None:
    if mount_root != "/" and path != mount_root and not path.startswith(mount_root + "/"):
        return None  # our cgroup is outside what this mount shows
    rel = path[len(mount_root):] if mount_root != "/" else path
    return Path(mount_point) / rel.lstrip("/")


def find_hierarchy() -> _Hierarchy | None:
    """Where this process may make memory cgroups, or None."""
    try:
        v1_path, v2_path = _own_paths()
        mounts = _mounts()
    except (OSError, ValueError):
        return None
    for root, point, fstype, opts in mounts:
        if fstype == "cgroup" and "memory" in opts and v1_path is not None:
            base = _under(root, point, v1_path)
            if base is not None and (base / "memory.limit_in_bytes").exists():
                return _Hierarchy(1, base)
    for root, point, fstype, _opts in mounts:
        if fstype == "cgroup2" and v2_path is not None:
            base = _under(root, point, v2_path)
            if base is None:
                continue
            try:
                available = (base / "cgroup.controllers").read_text().split()
            except OSError:
                continue
            if "memory" in available and _v2_enable_memory(base):
                return _Hierarchy(2, base)
    return None


def _v2_enable_memory(base: Path) -> bool:
    control = base / "cgroup.subtree_control"
    try:
        if "memory" in control.read_text().split():
            return True
        control.write_text("+memory")  # EBUSY where processes live in ``base`` itself
        return True
    except OSError:
        return False


def _start_time(pid: int | str) -> str | None:
    """A process's start time (clock ticks since boot): with its pid, a name no later process
    can have."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner() -> str:
    return f"{os.getpid()}-{_start_time('self')}"


def _sweep(base: Path) -> None:
    """Remove the cgroups left by processes that are gone (a cgroup still holding processes
    cannot be removed: EBUSY, so a live sandbox is never touched)."""
    if base in _swept:
        return
    _swept.add(base)
    for d in base.glob(PREFIX + "*"):
        pid, start, *_ = d.name[len(PREFIX):].split("-") + ["", ""]
        if pid.isdigit() and _start_time(pid) != start:
            try:
                os.rmdir(d)
            except OSError:
                pass


def _mode() -> str:
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "require", "off"):
        raise ValueError(f"{ENV}={mode!r}: expected auto, require or off")
    return mode


def create(limit_bytes: int) -> MemoryCgroup | None:
    """A new memory cgroup capped at ``limit_bytes`` (no swap beyond it), or None where
    cgroups cannot be made here (see the module's doc)."""
    mode = _mode()
    if mode == "off":
        return None
    h = find_hierarchy()
    why = "no writable memory cgroup hierarchy (cgroup v1 memory, or v2 with the memory " \
          "controller delegated) for this process"
    if h is not None:
        _sweep(h.base)
        path = h.base / f"{PREFIX}{_owner()}-{next(_seq)}"
        try:
            os.mkdir(path)
        except OSError as exc:
            why = f"cannot make {path}: {exc.strerror}"
        else:
            try:
                _set_limit(path, h.version, int(limit_bytes))
                return MemoryCgroup(path, h.version, int(limit_bytes))
            except OSError as exc:
                why = f"cannot set the memory limit of {path}: {exc.strerror}"
                try:
                    os.rmdir(path)
                except OSError:
                    pass
    if mode == "require":
        raise SandboxUnavailable(f"{ENV}=require: {why}")
    if why not in _warned:
        _warned.append(why)
        log.warning("sandboxes run without a memory cgroup (only per-process limits): %s", why)
    return None


def _set_limit(path: Path, version: int, limit: int) -> None:
    if version == 1:
        (path / "memory.limit_in_bytes").write_text(str(limit))
        swap = path / "memory.memsw.limit_in_bytes"  # present where swap is accounted
        if swap.exists():
            swap.write_text(str(limit))
        else:  # swap not accounted: do not let the sandbox's pages go there past the cap
            (path / "memory.swappiness").write_text("0")
        # v1 charges socket buffers only once this is set (v2 always does): an audit queued
        # 1 GiB in loopback TCP from a sandbox capped at 160 MiB
        tcp = path / "memory.kmem.tcp.limit_in_bytes"
        if tcp.exists():
            tcp.write_text(str(min(limit, TCP_BYTES)))
    else:
        (path / "memory.max").write_text(str(limit))
        swap = path / "memory.swap.max"
        if swap.exists():
            swap.write_text("0")
