"""A kernel uid of its own for each live sandbox (as root): ``lease``.

Run as root, a sandbox drops to an unprivileged uid (bwrap.py). The kernel keeps some quotas
per uid, across every namespace that uid created: inotify instances and watches
(fs.inotify.max_user_*), pipe-buffer pages (fs.pipe-user-pages-soft), epoll watches, the
namespaces a uid may create. With one uid for every sandbox, a program holding 128 inotify
instances left every other sandbox none (EMFILE), and one holding 64 MiB of pipe buffers
made the others' F_SETPIPE_SZ fail (EPERM), measured here. So each sandbox leases a uid of
its own from a range for as long as it lives; inside, bwrap maps it back to 65534
(bwrap.INSIDE_UID, what it always was), so what a program sees (getuid, file owners) never
depends on which uid it drew.

A lease is an exclusive ``flock`` on ``<dir>/<uid>``: held by one open file, it ends with
the process that holds it, however that process ends, and it works across processes
(pool workers, concurrent stages) and threads alike. Released only after the sandbox's
processes are gone: after its memory cgroup is removed, or, without one, once no live
process runs as the uid (``release(wait_seconds)``).
``CODEWORLD_SANDBOX_UIDS``: the range, ``FIRST-LAST`` (default 1879048192-1879052287, 4096
uids in the range systemd leaves unused, between its container ranges and 2^31); machines
that share one kernel but not one ``/run`` (containers) should get disjoint ranges.
``CODEWORLD_SANDBOX_UID_DIR``: the lock folder (default ``/run/codeworld-sandbox-uids``, or
under the temporary folder where /run is not writable). Root in a container with a user
namespace of its own may have only some uids (often 0-65535): where the default range is not
mapped, every sandbox runs as 65534, shared, as before leases (warned once); a range set but
not mapped is an error.
"""
from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import stat
import tempfile
import time

from .errors import SandboxError, SandboxUnavailable

log = logging.getLogger(__name__)
ENV_RANGE = "CODEWORLD_SANDBOX_UIDS"
ENV_DIR = "CODEWORLD_SANDBOX_UID_DIR"
DEFAULT_RANGE = (1879048192, 1879048192 + 4095)
LOCK_NAME = "codeworld-sandbox-uids"
# how long a sandbox without a memory cgroup waits for its last processes before its uid goes
SETTLE_SECONDS = 2.0
SHARED_UID = 65534   # where no range is mapped: every sandbox's, as before leases
MAP_FILES = ("/proc/self/uid_map", "/proc/self/gid_map")   # (the sandbox drops both)
_warned: list[bool] = []


class UidLease:
    """One uid held until ``release`` (or this process's end). ``uid`` is None when we are
    not root: the sandbox then runs as ourselves and there is nothing to lease."""

    def __init__(self, uid: int | None = None, fd: int = -1):
        self.uid, self._fd = uid, fd

    def release(self, wait_seconds: float = 0.0) -> None:
        """Free the uid (again: nothing). ``wait_seconds``: first wait, that long at most,
        until no process runs as it: a sandbox without a memory cgroup (whose removal waits
        for its processes) is gone when its bwrap is reaped, but its pid namespace's
        processes are still being killed (measured: 14 of 20 killed fork servers had some
        left at that moment)."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        deadline = time.monotonic() + wait_seconds
        while self.uid is not None and time.monotonic() < deadline and _running_as(self.uid):
            time.sleep(0.002)
        os.close(fd)   # the flock goes with the last reference to the open file

    def __enter__(self) -> "UidLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _running_as(uid: int) -> bool:
    """Whether a live process's real uid is ``uid`` (the sandbox's are not dumpable: their
    /proc folders belong to root, so the status file tells; a zombie holds no quota)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"State:") and line.split()[1] == b"Z":
                        break
                    if line.startswith(b"Uid:"):
                        if int(line.split()[1]) == uid:
                            return True
                        break
        except OSError:   # (gone meanwhile)
            pass
    return False


def uid_range() -> tuple[int, int]:
    """(first, last) uid that sandboxes may run as, from ``CODEWORLD_SANDBOX_UIDS``."""
    text = os.environ.get(ENV_RANGE, "").strip()
    if not text:
        return DEFAULT_RANGE
    first, sep, last = text.partition("-")
    try:
        lo, hi = int(first), int(last) if sep else int(first)
    except ValueError:
        raise SandboxError(f"{ENV_RANGE}={text!r}: expected FIRST-LAST (two uids)") from None
    if not 0 < lo <= hi < 2 ** 32 - 1:
        raise SandboxError(f"{ENV_RANGE}={text!r}: expected 0 < FIRST <= LAST < 4294967295 "
                           f"(uid 0 would lift the process limit)")
    return lo, hi


@functools.lru_cache(maxsize=None)
def mapped(lo: int, hi: int, map_files: tuple[str, ...] = MAP_FILES) -> bool:
    """Whether uids (and gids) ``lo``..``hi`` exist in our user namespace, within one line
    of each map (the map of a process's namespace is written once: cached)."""
    for path in map_files:
        with open(path) as f:
            lines = [tuple(map(int, line.split())) for line in f if line.strip()]
        if not any(first <= lo and hi < first + count for first, _host, count in lines):
            return False
    return True


def lock_dir() -> str:
    """The lock folder: made root-only on first use; refused if anyone else owns it (a
    folder someone else made in /tmp could hand out our leases)."""
    path = os.environ.get(ENV_DIR) or os.path.join(
        "/run" if os.access("/run", os.W_OK) else tempfile.gettempdir(), LOCK_NAME)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise SandboxUnavailable(f"cannot make the sandbox uid lock folder {path}: "
                                 f"{exc.strerror} (set {ENV_DIR})") from exc
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise SandboxUnavailable(f"the sandbox uid lock folder {path} is not a folder of ours "
                                 f"that only we can write: remove it or set {ENV_DIR}")
    return path


def lease(wait_seconds: float = 60.0) -> UidLease:
    """A uid of the range no live sandbox holds, the lowest free one; waits up to
    ``wait_seconds`` while all are taken, then raises SandboxUnavailable."""
    if os.geteuid() != 0:
        return UidLease()
    lo, hi = uid_range()
    if not mapped(lo, hi, MAP_FILES):
        if os.environ.get(ENV_RANGE, "").strip():
            raise SandboxUnavailable(f"{ENV_RANGE}={lo}-{hi}: not all of these uids exist in "
                                     f"this user namespace (see {MAP_FILES[0]}): set a range "
                                     f"inside it")
        if not _warned:
            _warned.append(True)
            log.warning("the sandbox uid range %d-%d does not exist in this user namespace "
                        "(a container's?): every sandbox runs as uid %d and they share the "
                        "kernel's per-uid quotas; set %s to uids it has", lo, hi, SHARED_UID,
                        ENV_RANGE)
        return UidLease(SHARED_UID)   # nothing to lock: shared
    folder = lock_dir()
    deadline = time.monotonic() + wait_seconds
    while True:
        for uid in range(lo, hi + 1):
            fd = os.open(os.path.join(folder, str(uid)),
                         os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                continue
            return UidLease(uid, fd)
        if time.monotonic() >= deadline:
            raise SandboxUnavailable(
                f"all {hi - lo + 1} sandbox uids ({lo}-{hi}) are held by live sandboxes "
                f"(locks in {folder}) after {wait_seconds:.0f} s: widen {ENV_RANGE}")
        time.sleep(0.05)
