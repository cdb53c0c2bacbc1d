"""One-shot sandboxed command: ``run_command`` (e.g. ``python -m pytest`` in a repo copy)."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Mapping, Sequence

from .bwrap import LAUNCH_ENV, Bind, SandboxError, build_argv, ensure_available, \
    host_pidns, python_install, sandbox_env
from . import memcg, uids
from .forkserver import _SERVER_SOURCE, _as_bind, _kill, _limits_config, _release
from .limits import Limits
from .quota import QuotaCopy

WORKDIR = "/work"


@dataclass
class CommandResult:
    """What the command did. Its output is kept as bytes (``stdout_bytes``, ``stderr_bytes``);
    ``stdout`` and ``stderr`` are their text (UTF-8, a bad byte read as U+FFFD), decoded on
    first use: a caller that reads the output as bytes, line by line, never holds the text of
    all of it (up to 4 times its bytes, more again split into lines)."""
    returncode: int  # -N when killed by signal N (timeout: -9)
    stdout_bytes: bytes | bytearray
    stderr_bytes: bytes | bytearray
    timed_out: bool
    killed_by_signal: int | None
    stdout_truncated: bool
    wall_seconds: float
    stderr_truncated: bool = False
    # with a working-copy quota: why the copy could not come back (then it is as it was before
    # the command), and the room left in it afterwards
    workdir_error: str | None = None
    workdir_free_bytes: int | None = None
    # the kernel killed a process of the sandbox for its memory cap (Limits.sandbox_memory)
    memory_limit_hit: bool = False

    @cached_property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", "replace")

    @cached_property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", "replace")


def _give_to_sandbox(path: str, uid: int | None) -> None:
    """As root, the sandbox runs as the unprivileged uid it leased: it can only write what it
    owns (a tree given to an earlier sandbox belongs to that one's uid: chowned again)."""
    if uid is None:
        return
    os.lchown(path, uid, uid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, uid)


class _Capture:
    """The first ``cap`` bytes of a stream (``total``: all it carried)."""

    def __init__(self, cap: int):
        self.cap, self.data, self.total = cap, bytearray(), 0

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        if len(self.data) < self.cap:
            self.data += chunk[: self.cap - len(self.data)]

    def result(self) -> bytearray:
        return self.data


class _TailCapture(_Capture):
    """The last ``cap`` bytes of a stream (held: at most twice that)."""

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.data += chunk[-self.cap:]
        if len(self.data) > 2 * self.cap:
            del self.data[:-self.cap]

    def result(self) -> bytearray:
        if len(self.data) > self.cap:
            del self.data[:-self.cap]
        return self.data


def run_command(argv: Sequence[str], *, workdir: str | os.PathLike | None = None,
                writable_workdir: bool = False, limits: Limits | None = None,
                extra_ro_binds: Iterable = (), env: Mapping[str, str] | None = None,
                bwrap: str | os.PathLike | None = None,
                workdir_quota_bytes: int | None = None,
                stderr_tail_bytes: int | None = None) -> CommandResult:
    """Run ``argv`` once in a fresh sandbox; ``workdir`` is bound at /work (the cwd).

    ``writable_workdir=True`` binds it read-write; as root this chowns the tree to the
    sandbox's leased uid first (the sandbox cannot write root-owned files otherwise).
    ``workdir_quota_bytes`` (with ``writable_workdir``): instead of the bind, /work is a tmpfs
    of that size holding a copy of ``workdir``, which replaces ``workdir`` after the command
    (``workdir_quota``): the command cannot write more than that to the host's disk.
    ``extra_ro_binds``: host paths (bound at the same path) or (host, sandbox) pairs.
    ``env``: extra variables on top of the allow-list (nothing is inherited).
    ``stderr_tail_bytes``: keep only the last that many bytes of stderr (None: its first
    ``limits.output_bytes``, as of stdout), for a caller that reads no more than its tail: a
    command's stderr is then no more than that in the host's memory, whatever it writes.
    A program killed by signal N is reported through bwrap's exit status 128+N.
    """
    if not argv:
        raise ValueError("empty argv")
    if stderr_tail_bytes is not None and stderr_tail_bytes <= 0:
        raise ValueError(f"stderr_tail_bytes must be positive, got {stderr_tail_bytes!r}")
    limits = limits or Limits()
    ensure_available(bwrap)
    exe, binds = python_install()
    chdir, quota = "/tmp", None
    config = {**_limits_config(limits), "host_pidns": host_pidns()}
    held = uids.lease()   # this sandbox's uid, until its processes are gone (in _run)
    try:
        if workdir is not None:
            wd = os.path.realpath(workdir)
            if not os.path.isdir(wd):
                raise SandboxError(f"workdir {wd} is not a directory")
            if writable_workdir:
                _give_to_sandbox(wd, held.uid)
            if writable_workdir and workdir_quota_bytes is not None:
                quota = QuotaCopy(wd, workdir_quota_bytes, limits)
                binds += quota.binds
                config.update(quota.launcher_config)
                limits = quota.limits
            else:
                binds.append(Bind(wd, WORKDIR, writable_workdir))
            chdir = WORKDIR
        binds += [_as_bind(b) for b in extra_ro_binds]
        launcher = [exe, "-I", "-S", "-c", _SERVER_SOURCE, "launch", json.dumps(config), "--",
                    *map(str, argv)]
        result = _run(launcher, held, binds, env, chdir, limits, bwrap, quota,
                      stderr_tail_bytes)
        if quota is not None:
            quota.take_back(result)
        return result
    finally:
        if quota is not None:
            quota.close()
        held.release()


def _run(launcher: list[str], held: uids.UidLease, binds: list[Bind],
         env: Mapping[str, str] | None, chdir: str, limits: Limits, bwrap,
         quota, stderr_tail_bytes: int | None = None) -> CommandResult:
    cgroup = memcg.create(limits.sandbox_memory())
    try:
        result = _run_in(launcher, held.uid, binds, env, chdir, limits, bwrap, quota, cgroup,
                         stderr_tail_bytes)
        if cgroup is not None:
            result.memory_limit_hit = cgroup.oom_kills() > 0
        return result
    finally:
        _release(cgroup, held)   # (the uid goes before the working copy comes back)


def _run_in(launcher: list[str], uid: int | None, binds: list[Bind],
            env: Mapping[str, str] | None, chdir: str, limits: Limits, bwrap, quota,
            cgroup, stderr_tail_bytes: int | None = None) -> CommandResult:
    r_status, w_status = os.pipe()
    try:
        full = build_argv(launcher, uid=uid, binds=binds, env=sandbox_env(env), chdir=chdir,
                          tmpfs_bytes=limits.tmpfs_bytes, bwrap=bwrap, status_fd=w_status,
                          sized_tmpfs=quota.tmpfs if quota is not None else ())
        if cgroup is not None:
            full = cgroup.wrap(full)
        t0 = time.monotonic()
        proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, bufsize=0,
                                pass_fds=(w_status,) if quota is None else (w_status, quota.write_fd),
                                start_new_session=True, env=LAUNCH_ENV)
    except BaseException:
        os.close(r_status)
        raise
    finally:
        os.close(w_status)
        if quota is not None:
            quota.started()
    err = (_Capture(limits.output_bytes) if stderr_tail_bytes is None
           else _TailCapture(stderr_tail_bytes))
    out, status = _Capture(limits.output_bytes), _Capture(1 << 16)
    caps = {proc.stdout.fileno(): out, proc.stderr.fileno(): err, r_status: status}
    if quota is not None:
        caps[quota.read_fd] = quota.sink
    deadline = t0 + limits.wall_seconds
    timed_out = done_early = False
    try:
        open_fds = set(caps)
        while open_fds:
            if quota is not None and quota.sink.complete and not done_early:
                # the launcher has sent the copy and its status after killing the command:
                # nothing of the sandbox is needed any more (its pid 1 may even be stopped)
                done_early = True
                _kill(proc)
            remaining = deadline - time.monotonic()
            if remaining <= 0 and not timed_out:
                timed_out = True
                _kill(proc)  # outer bwrap dies -> its pid namespace and everything in it
                deadline = time.monotonic() + 10.0  # grace to drain the pipes
                continue
            if remaining <= 0:
                raise SandboxError("sandboxed command still holds its pipes after SIGKILL")
            poller = select.poll()
            for fd in open_fds:
                poller.register(fd, select.POLLIN)
            for fd, _ev in poller.poll(max(1, int(remaining * 1000))):
                chunk = os.read(fd, 1 << 16)
                if chunk:
                    caps[fd].feed(chunk)
                else:
                    open_fds.discard(fd)
        rc = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            _kill(proc)
        proc.stdout.close(), proc.stderr.close()
        os.close(r_status)
    wall = time.monotonic() - t0
    status_text = bytes(status.data).decode("utf-8", "replace")
    if not timed_out and '"child-pid"' not in status_text:
        raise SandboxError(f"bubblewrap could not set up the sandbox (exit {rc}): "
                           f"{bytes(err.data[-8000:]).decode('utf-8', 'replace').strip()[-2000:]}")
    for line in status_text.splitlines():
        try:
            rc = int(json.loads(line).get("exit-code", rc))
        except (ValueError, AttributeError):
            pass
    sig = None
    if timed_out:
        rc, sig = -signal.SIGKILL, int(signal.SIGKILL)
    elif rc > 128 and (rc - 128) < signal.NSIG:
        sig = rc - 128
        rc = -sig
    # (the captures themselves, not copies: a 1 GiB cap is not held twice)
    return CommandResult(returncode=rc, stdout_bytes=out.result(), stderr_bytes=err.result(),
                         timed_out=timed_out,
                         killed_by_signal=sig, stdout_truncated=out.total > out.cap,
                         wall_seconds=wall, stderr_truncated=err.total > err.cap)
