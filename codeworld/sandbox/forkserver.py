"""Host side of the fork server: ``ForkServer`` and ``map_requests``.

A long-lived Python inside bubblewrap (``server.py``) imports the handler once and forks
one child per request; see ``server.py`` for the protocol and ``bwrap.py`` for the
isolation. A request can kill the server (e.g. ``os.kill(os.getppid(), 9)``): that request
is recorded as ``killed`` and the next call starts a new server transparently.
"""
from __future__ import annotations

import dataclasses
import json
import os
import select
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .bwrap import Bind, SandboxError, SandboxUnavailable, build_argv, ensure_available, \
    LAUNCH_ENV, host_pidns, python_install, sandbox_env
from . import memcg, seccomp, uids
from .limits import Limits
from .output import json_or_none

_REQ = struct.Struct(">I")
_RESP = struct.Struct(">IIII")
_SERVER_SOURCE = (Path(__file__).with_name("server.py")).read_text()
# What the fork server keeps in the sandbox's user namespace: to give each request pid, mount
# and IPC namespaces of its own (server._fork_request; each request drops them at once)
REQUEST_CAPS = ("CAP_SYS_ADMIN", "CAP_SETPCAP")
# The fork server's entry point: ``python -c BOOT <server.py's source> serve <config>``. A
# request's child unwinds up to here before the handler runs (``server.Requests``), so these
# lines are the only frames of the harness under a program: a program that prints its own
# stack (traceback.extract_stack) sees them, and editing them changes traced data; editing
# server.py does not.
BOOT = """\
import sys
server = {"__name__": "sandbox_server"}
exec(compile(sys.argv.pop(1), "<sandbox-server>", "exec"), server)
try:
    server["main"](sys.argv[1:])
except server["Requests"] as job:
    requests, finish = job.args
try:
    for handler, request, reply in requests:
        try:
            value = handler(request)
        except BaseException as exc:
            reply(None, exc)
        else:
            reply(value, None)
finally:
    finish()
"""
STATUSES = ("ok", "timeout", "killed", "error", "too_large")


@dataclass
class SandboxResult:
    status: str  # one of STATUSES
    response: Any = None  # the handler's return value when status == "ok"
    error: dict | None = None  # {"type", "message", "traceback"} for error/killed/too_large
    signal: int | None = None  # signal that killed the program (status "killed")
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    wall_seconds: float = 0.0
    server_restarted: bool = field(default=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _interpret(header: dict, out: bytes, err: bytes, body: bytes) -> SandboxResult:
    res = _base_result(header, out, err)
    if res.status == "error":  # the child exited by itself: its envelope decides
        envelope = json_or_none(body) if body else None
        _apply_envelope(res, envelope, header, len(body))
    return res


def _base_result(header: dict, out: bytes, err: bytes) -> SandboxResult:
    """Status from the frame header (timeout / too_large / killed), else "error"."""
    res = SandboxResult(status="error", stdout=out.decode("utf-8", "replace"),
                        stderr=err.decode("utf-8", "replace"),
                        stdout_truncated=bool(header.get("stdout_truncated")),
                        stderr_truncated=bool(header.get("stderr_truncated")),
                        wall_seconds=float(header.get("wall_seconds") or 0.0))
    sig = header.get("signal")
    if header.get("timed_out"):
        res.status, res.signal = "timeout", 9
        res.error = {"type": "Timeout", "message": "wall-clock limit exceeded"}
    elif header.get("too_large"):
        res.status = "too_large"
        res.error = {"type": "ResponseTooLarge",
                     "message": f"response of {header.get('response_bytes')} bytes over the cap"}
    elif sig is not None:
        res.status, res.signal = "killed", int(sig)
        res.error = {"type": "Killed", "message": f"killed by signal {sig}"}
        if header.get("memory_limit"):
            res.error = _memory_limit_error(header["memory_limit"])
    return res


def _memory_limit_error(limit: int) -> dict:
    return {"type": "MemoryLimit", "message": f"killed by the sandbox's memory limit "
                                              f"({limit >> 20} MiB for all its processes and files)"}


def _apply_envelope(res: SandboxResult, envelope: Any, header: dict, size: int) -> bool:
    """Fill ``res`` from ``{"ok": value}`` / ``{"error": {...}}``; False if malformed."""
    if isinstance(envelope, dict) and set(envelope) == {"ok"}:
        res.status, res.response = "ok", envelope["ok"]
        return True
    if isinstance(envelope, dict) and isinstance(envelope.get("error"), dict):
        res.error = {k: str(envelope["error"].get(k, "")) for k in
                     ("type", "message", "traceback")}
        return True
    res.error = {"type": "NoResponse",
                 "message": f"exited with code {header.get('exit_code')} without a "
                            f"valid response ({size} bytes)"}
    return False


class ForkServer:
    """A sandboxed fork server running ``handler`` ("pkg.mod:func") on JSON requests.

    ``code_dirs`` maps sandbox paths to host directories (or single files), bound
    read-only (e.g. ``{"/sandbox/lib/pkg": Path("stages/pkg")}``: never bind the whole
    repository); ``sys_path`` lists sandbox paths put in
    front of sys.path (default ``/sandbox/lib``). ``extra_ro_binds``: host paths, or
    (host, sandbox) pairs, also bound read-only. ``env``: extra environment variables.
    """

    def __init__(self, handler: str, code_dirs: Mapping[str, str | os.PathLike] | None = None,
                 limits: Limits | None = None, *, sys_path: Iterable[str] = ("/sandbox/lib",),
                 extra_ro_binds: Iterable = (), env: Mapping[str, str] | None = None,
                 seed: int = 0, bwrap: str | os.PathLike | None = None,
                 startup_timeout: float = 60.0, share_batch: bool = False):
        if ":" not in handler:
            raise ValueError("handler must look like 'package.module:function'")
        self.handler, self.limits = handler, limits or Limits()
        self.startup_timeout, self.bwrap = startup_timeout, bwrap
        self.share_batch = share_batch   # call_batch's requests in one process (see there)
        self.restarts = 0  # servers started after the first one
        exe, binds = python_install()
        binds += [Bind(os.fspath(src), dest) for dest, src in (code_dirs or {}).items()]
        binds += [_as_bind(b) for b in extra_ro_binds]
        cfg = {"handler": handler, "sys_path": list(sys_path),
               "limits": _limits_config(self.limits),
               "seed": seed, "host_pidns": host_pidns(), "site_dirs": base_site_dirs()}
        # -S: no `site` at startup. Its .pth files cost ~50 ms a server start on machines
        # whose interpreter has slow ones (an egress-CA hook importing certifi/pathlib here);
        # the server adds the base site-packages itself and what `site` gives programs
        # (exit, quit, help), see server.serve.
        self._command = [exe, "-S", "-s", "-c", BOOT, _SERVER_SOURCE, "serve", json.dumps(cfg)]
        self._binds, self._env = binds, sandbox_env(env)
        self._proc: subprocess.Popen | None = None
        self._log = None
        self._started = 0
        self._cgroup: memcg.MemoryCgroup | None = None
        self._uid: uids.UidLease | None = None
        self._lock = threading.Lock()
        self._finalizer = None

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> "ForkServer":
        with self._lock:
            if self._proc is None:
                self._start()
        return self

    def _start(self) -> None:
        ensure_available(self.bwrap)
        self._uid = uids.lease()   # one per server: its requests are one sandbox's
        try:
            argv = build_argv(self._command, uid=self._uid.uid, binds=self._binds,
                              env=self._env, tmpfs_bytes=self.limits.tmpfs_bytes,
                              bwrap=self.bwrap, caps=REQUEST_CAPS)
            self._cgroup = memcg.create(self.limits.sandbox_memory())
            if self._cgroup is not None:
                argv = self._cgroup.wrap(argv)
            self._log = tempfile.TemporaryFile()
            self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=self._log, bufsize=0, start_new_session=True,
                                          env=LAUNCH_ENV)
        except BaseException:
            self._stop(kill=True)   # (the cgroup and the uid back)
            raise
        self._finalizer = weakref.finalize(self, _kill, self._proc, self._cgroup, self._uid)
        if self._started:
            self.restarts += 1
        self._started += 1
        try:
            frame = self._recv(time.monotonic() + self.startup_timeout)
        except SandboxError:
            frame = None
        header = frame[0] if frame else {}
        if header.get("ready"):
            return
        log = self._log_tail()
        self._stop(kill=True)
        if header.get("fatal"):
            raise SandboxError(f"fork server could not load {self.handler}: {header['fatal']}\n"
                               f"{header.get('traceback', '')}")
        if "bwrap" in log:
            raise SandboxUnavailable(f"bubblewrap failed to start the fork server: {log}")
        raise SandboxError(f"fork server failed to start: {log or 'no output'}")

    def _log_tail(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0, os.SEEK_END)
        self._log.seek(max(0, self._log.tell() - 4000))
        return self._log.read().decode("utf-8", "replace").strip()

    def _stop(self, kill: bool) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if kill:
                _kill(proc)
            else:
                try:
                    proc.stdin.close()
                    proc.wait(timeout=self.limits.wall_seconds + 5)
                except (OSError, subprocess.TimeoutExpired):
                    _kill(proc)
            for pipe in (proc.stdin, proc.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass
        if self._finalizer is not None:
            self._finalizer.detach()
        if self._log is not None:
            self._log.close()
            self._log = None
        _release(self._cgroup, self._uid)
        self._cgroup = self._uid = None

    def close(self) -> None:
        with self._lock:
            self._stop(kill=False)

    def __enter__(self) -> "ForkServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests --------------------------------------------------------------
    def call(self, request: Any) -> SandboxResult:
        """Run the handler on ``request`` in a fresh fork of the server."""
        payload = json.dumps({"one": request}, ensure_ascii=False).encode()
        with self._lock:
            got = self._exchange(payload)
        if isinstance(got, SandboxResult):
            return got
        frame, restarted = got
        res = _interpret(*frame)
        res.server_restarted = restarted
        return res

    def call_batch(self, requests: Sequence[Any]) -> list[SandboxResult]:
        """Run several requests in ONE fork of the server, one after the other: saves the
        server's fork and its copy-on-write per request (~15 ms, the dominant cost for small
        requests). Each request runs in a process of its own forked from the batch's (~2 ms):
        its module state, environment, working folder and response pipe are its own, its
        files in /tmp are not (one mount namespace a batch), and every process it left is
        killed before the next request starts (one pid namespace a batch). With ``share_batch`` they all run
        in the batch's process (~0.1 ms a request), at the price of isolation between them:
        module state carries over (random is reseeded before each), and a request can write
        its neighbours' responses (untrusted code could forge them). If the batch as a whole
        fails (timeout, killed, too large, server died, malformed), each request is run
        again alone with ``call``, so a bad request only costs its batch a retry.
        stdout/stderr/wall_seconds of a successful batch are the whole batch's, reported
        on each of its results. The child reports each finished request at once, and the
        wall-clock limit applies to each request: a request that overruns is reported as
        a timeout and the batch goes on with the requests after it."""
        requests = list(requests)
        results: list[SandboxResult] = []
        # A loop, not a recursion over the rest of the batch: a batch with many failing
        # requests (each costs a restart of the rest) must not grow the Python stack.
        while requests:
            done, requests = self._batch_head(requests)
            results += done
        return results

    def _batch_head(self, requests: list) -> tuple[list[SandboxResult], list]:
        """Run ``requests`` as one batch: (results of a head of them, the requests left)."""
        if len(requests) == 1:
            return [self.call(requests[0])], []
        payload = json.dumps({"batch": requests, "shared": self.share_batch},
                             ensure_ascii=False).encode()
        with self._lock:
            got = self._exchange(payload, len(requests))
        if isinstance(got, SandboxResult):  # the server died: isolate the culprit(s)
            return [self.call(r) for r in requests], []
        (header, out, err, body), restarted = got
        base = _base_result(header, out, err)
        results: list[SandboxResult] = []
        # One line per finished request; a batch cut short still returns its head.
        for line in body.split(b"\n")[:-1]:
            res = dataclasses.replace(base, status="error", signal=None, error=None,
                                      server_restarted=restarted)
            envelope = json_or_none(line)
            if not _apply_envelope(res, envelope, header, len(body)) or len(results) == len(requests):
                return [self.call(r) for r in requests], []  # malformed: isolate every request
            results.append(res)
        k = len(results)
        if k == len(requests):
            return results, []
        if base.status == "timeout":
            # the wall deadline is reset at each finished request: request k itself overran
            culprit = dataclasses.replace(base, server_restarted=restarted)
        else:  # killed, too large, or exited early: run it alone to know its own fate
            culprit = self.call(requests[k])
        return results + [culprit], requests[k + 1:]

    def _exchange(self, payload: bytes, requests: int = 1):
        """Send one request frame (of ``requests`` requests); ((header, out, err, body),
        restarted) or, when the server died or misbehaved, the final SandboxResult. Caller
        holds the lock."""
        restarted = False
        for attempt in range(2):
            if self._proc is None or self._proc.poll() is not None:
                restarted = self._proc is not None or self._started > 0
                self._stop(kill=True)
                self._start()
            cgroup = self._cgroup
            oom_before = cgroup.oom_kills() if cgroup is not None else 0
            try:
                self._proc.stdin.write(_REQ.pack(len(payload)) + payload)
                break
            except (BrokenPipeError, ConnectionResetError, ValueError):
                self._stop(kill=True)  # died between requests: retry on a new one
                if attempt:
                    raise SandboxError("fork server keeps dying before requests")
        t0 = time.monotonic()
        status, why = "killed", "fork server died during the request"
        try:
            frame = self._recv(t0 + _answer_within(self.limits.wall_seconds, requests))
        except SandboxError as exc:
            frame, why = None, str(exc)
            status = "timeout" if isinstance(exc, _Deadline) else "error"
        oom = cgroup is not None and cgroup.oom_kills() > oom_before
        if frame is None:
            self._stop(kill=True)  # the request killed it: a new one starts next call
            error = {"type": "ServerDied", "message": why}
            if oom and status == "killed":
                error = _memory_limit_error(cgroup.limit_bytes)
            return SandboxResult(status=status, wall_seconds=time.monotonic() - t0,
                                 error=error, server_restarted=restarted)
        if oom:
            frame[0]["memory_limit"] = cgroup.limit_bytes
        if frame[0].get("server_exiting"):
            self._stop(kill=False)  # it could not clean up: the next call starts afresh
        return frame, restarted

    def _recv(self, deadline: float):
        """One response frame; None on EOF; SandboxError on timeout or a bad frame."""
        fd = self._proc.stdout.fileno()
        head = _read_exact(fd, _RESP.size, deadline)
        if head is None:
            return None
        lens = _RESP.unpack(head)
        lim = self.limits
        caps = (1 << 20, lim.output_bytes, lim.output_bytes, lim.response_bytes)
        if any(n > cap for n, cap in zip(lens, caps)):
            raise SandboxError(f"protocol violation: frame lengths {lens}")
        blobs = []
        for n in lens:
            blob = _read_exact(fd, n, deadline)
            if blob is None:
                return None
            blobs.append(blob)
        try:
            header = json.loads(blobs[0])
        except ValueError as exc:
            raise SandboxError("protocol violation: bad header") from exc
        return (header, *blobs[1:])


class _Deadline(SandboxError):
    pass


ANSWER_SLACK = 10.0   # seconds the server may take past its own deadlines (cleanup, the frame)


def _answer_within(wall_seconds: float, requests: int) -> float:
    """Seconds the host waits for a frame of ``requests`` requests before it takes the server
    for hung (and kills it). The server gives a request ``wall_seconds``, and in a batch
    gives them again at each finished request (server.py: the deadline is reset at each
    response line): a batch may take a wall budget per request, plus one after its last
    line. One deadline of wall + slack for the whole batch killed a batch of 24 programs of
    0.5 s each (wall 1 s) at 11 s and ran all 24 again alone."""
    if requests <= 1:
        return wall_seconds + ANSWER_SLACK
    return (requests + 1) * wall_seconds + ANSWER_SLACK


def _read_exact(fd: int, n: int, deadline: float) -> bytes | None:
    buf = bytearray()
    poller = None
    while len(buf) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Deadline("no answer from the fork server before the deadline")
        if poller is None:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
        if not poller.poll(max(1, int(remaining * 1000))):
            continue
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _kill(proc: subprocess.Popen, cgroup: memcg.MemoryCgroup | None = None,
          held: uids.UidLease | None = None) -> None:
    """SIGKILL the outer bwrap: its pid namespace, hence every sandboxed process, dies; then
    its memory cgroup and its uid can go (a fork server collected without ``close`` ends
    here)."""
    try:
        proc.kill()
    except OSError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    _release(cgroup, held)


def _release(cgroup: memcg.MemoryCgroup | None, held: uids.UidLease | None) -> None:
    """A finished sandbox's memory cgroup, then its uid, which is free only once the
    sandbox's processes are gone: removing the cgroup waits for them, else the lease does."""
    if cgroup is not None:
        cgroup.close()
    if held is not None:
        held.release(0.0 if cgroup is not None else uids.SETTLE_SECONDS)


def _limits_config(limits: Limits) -> dict:
    """The limits as the sandbox side reads them (fork server or launcher), with the seccomp
    filter it installs."""
    return {**limits.to_dict(), "seccomp": seccomp.program_hex()}


def _as_bind(b) -> Bind:
    if isinstance(b, Bind):
        return b
    if isinstance(b, (tuple, list)):
        return Bind(os.fspath(b[0]), os.fspath(b[1]))
    return Bind(os.fspath(b), os.path.abspath(os.fspath(b)))


def base_site_dirs() -> list[str]:
    """The base interpreter's site-packages (not the venv's): what `site` would add."""
    paths = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})
    return list(dict.fromkeys(paths[k] for k in ("purelib", "platlib")))


def map_requests(requests: Iterable[Any], handler: str, workers: int | None = None, *,
                 batch_size: int = 1, **server_kwargs) -> list[SandboxResult]:
    """Run every request through ``workers`` fork servers in parallel; results in input order.

    ``batch_size`` > 1 sends consecutive requests ``batch_size`` at a time through
    ``ForkServer.call_batch`` (one fork per batch; see there for what that shares). The
    batches depend only on the input order, never on scheduling: results are
    deterministic for any ``workers``. ``server_kwargs`` go to ``ForkServer``
    (code_dirs, limits, env, ...).
    """
    reqs = list(requests)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if not reqs:
        return []
    bounds = [(i, min(len(reqs), i + batch_size)) for i in range(0, len(reqs), batch_size)]
    n = max(1, min(workers or os.cpu_count() or 1, len(bounds)))
    results: list[SandboxResult | None] = [None] * len(reqs)
    ensure_available(server_kwargs.get("bwrap"))
    next_batch = iter(bounds)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with ForkServer(handler, **server_kwargs) as server:
                while not errors:
                    with lock:
                        b = next(next_batch, None)
                    if b is None:
                        return
                    i, j = b
                    if j - i == 1:
                        results[i] = server.call(reqs[i])
                    else:
                        results[i:j] = server.call_batch(reqs[i:j])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, name=f"forkserver-{k}", daemon=True)
               for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]
