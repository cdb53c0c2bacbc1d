"""In-sandbox side of the sandbox: the fork server loop and the one-shot launcher.

This file runs INSIDE bubblewrap. It is deliberately self-contained (stdlib only, no
package-relative imports): the host passes its source with ``python -c`` so that no
directory of the repository has to be bound into the sandbox.

Protocol (over the server's original stdin/stdout, which are moved off fds 0/1 first):
  host -> server: ``>I`` length + UTF-8 JSON ``{"one": request}`` or ``{"batch": [...]}``
  (parsed by the child only).
  server -> host: ``>IIII`` (header, stdout, stderr, response) lengths, then the four
  blobs. The header is small JSON; stdout/stderr are raw bytes (capped); the response
  is the child's raw JSON envelope ``{"ok": value}`` or ``{"error": {...}}`` (a batch:
  ``{"batch": [envelope, ...]}``), parsed (and validated) by the host.

Killing. Nothing here ever calls ``kill(-1)``. Both modes first check that they run in
a pid namespace of their own, with its own /proc (``check_private_pidns``: the host sends
the inode of its own pid namespace; same inode, or no way to tell -> refuse to run). The
server is a child subreaper and kills what a request leaves behind by pid, within its
own subtree only: the request's process group on timeout, then every descendant
(``_kill_descendants``). If anything else shows up in the namespace, or the subtree will
not die, the server exits and the host SIGKILLs the outer bwrap, which tears the whole
pid namespace down.

Pid 1. The server (or the launcher) is the sandbox's pid 1 (bwrap --as-pid-1): a program
cannot kill it (the kernel drops signals to a namespace's init sent from inside), trace it or
take its fds (it is not dumpable), and when it exits the kernel kills everything left.
"""
import gc
import json
import math
import os
import resource
import select
import signal
import stat
import struct
import sys
import time
import traceback

REQ_HEADER = struct.Struct(">I")
RESP_HEADER = struct.Struct(">IIII")
INFRA_PROCS_SERVER = 1  # the fork server itself (pid 1 of the sandbox: bwrap --as-pid-1)
INFRA_PROCS_LAUNCHER = 1  # the launcher (pid 1), the command's parent
_DUMPABLE_RESET = False  # set once the server made itself non-dumpable
_WAKE = []  # the fork server's SIGCHLD wake-up pipe (read end, write end)
_MEMORY_ERROR = b'{"error": {"type": "MemoryError", "message": "", "traceback": ""}}'


def apply_rlimits(lim, infra_procs):
    """Lower this process's rlimits (never raises a hard limit; clamps to it)."""

    def lower(res, soft, hard=None):
        cur_soft, cur_hard = resource.getrlimit(res)
        hard = soft if hard is None else hard
        if cur_hard != resource.RLIM_INFINITY:
            hard = min(hard, cur_hard)
        resource.setrlimit(res, (min(soft, hard), hard))

    cpu = max(1, int(math.ceil(lim["cpu_seconds"])))
    lower(resource.RLIMIT_CPU, cpu, cpu + 1)  # SIGXCPU first, SIGKILL one second later
    lower(resource.RLIMIT_AS, int(lim["memory_bytes"]))
    lower(resource.RLIMIT_FSIZE, int(lim["file_size_bytes"]))
    lower(resource.RLIMIT_NOFILE, int(lim["open_files"]))
    # RLIMIT_NPROC counts the tasks of this uid in this (bwrap) user namespace, i.e. of
    # this sandbox only; it is enforced because the kernel uid is not 0.
    lower(resource.RLIMIT_NPROC, int(lim["max_processes"]) + infra_procs)
    lower(resource.RLIMIT_CORE, 0)
    lower(resource.RLIMIT_MSGQUEUE, 0)  # no POSIX message queue: it would outlive a request


def _read_exact(fd, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _stat_ppid(pid):
    """Parent pid of ``pid`` from /proc, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()  # after "pid (comm) "
    return int(fields[1]) if len(fields) > 1 else None


def _scan(root):
    """(descendants of ``root``, all other pids) among the live processes in /proc."""
    children, pids = {}, []
    for name in os.listdir("/proc"):
        if name.isdigit():
            ppid = _stat_ppid(name)
            if ppid is not None:
                children.setdefault(ppid, []).append(int(name))
                pids.append(int(name))
    out, todo = [], [root]
    while todo:
        for kid in children.get(todo.pop(), ()):
            out.append(kid)
            todo.append(kid)
    inside = set(out)
    return out, [p for p in pids if p != root and p not in inside]


def _reap(keep=None):
    """Reap every exited child (orphans are reparented to us: we are pid 1) but ``keep``,
    whose status is still to be read (it is only looked at, WNOWAIT)."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid == keep:
            return
        os.waitpid(info.si_pid, 0)


def _kill_descendants(budget=2.0):
    """SIGKILL every descendant of this server, by pid, until none is left.

    No ``kill(-1)`` and no process outside our own subtree is ever signalled: the server
    is a child subreaper, so what a request leaves behind (daemons, fork bombs, processes
    that setsid'ed away from its process group) is reparented to us and stays in our
    subtree. Returns True when the subtree is empty (zombies reaped) and nothing but us is
    left in the namespace: anything else escaped our subtree, and
    the server then exits so that the host tears the whole sandbox down. (/proc was
    verified at startup to be this namespace's own, see ``check_private_pidns``.)"""
    me = os.getpid()
    deadline = time.monotonic() + budget
    while True:
        _reap()
        pids, others = _scan(me)
        if not pids:
            return not others
        if time.monotonic() > deadline:
            return False
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.0005)


_LIBC = []


def _libc():
    import ctypes

    if not _LIBC:
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    return _LIBC[0]


def _prctl(option, value, arg3=0):
    import ctypes

    if _libc().prctl(option, ctypes.c_ulong(value), arg3, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2


def _install_seccomp(program_hex):
    """Put this process, and all it will start, under the host's seccomp filter (built by
    codeworld/sandbox/seccomp.py: classic BPF, 8 bytes an instruction)."""
    if not program_hex:
        return
    import ctypes

    class _Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    code = bytes.fromhex(program_hex)
    buf = ctypes.create_string_buffer(code, len(code))
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER,
           ctypes.byref(_Fprog(len(code) // 8, ctypes.addressof(buf))))


# ioprio_get and sched_getattr, which Python does not wrap
_SYSCALL_NR = {"x86_64": (252, 315), "aarch64": (31, 274)}


def _process_settings():
    """What a process of our uid can change on us from outside (prlimit, setpriority,
    ioprio_set, sched_setaffinity, sched_setscheduler, sched_setattr: the kernel checks the
    uid, not dumpability) and the next requests would inherit: limits that make them fail, a
    priority or time slice that makes them time out. The server compares them after each
    request; changed -> it is replaced."""
    import ctypes

    limits = tuple(resource.getrlimit(getattr(resource, name))
                   for name in sorted(dir(resource)) if name.startswith("RLIMIT_"))
    kernel = None
    numbers = _SYSCALL_NR.get(os.uname().machine)
    if numbers is not None:
        attr = ctypes.create_string_buffer(struct.pack("I", 56), 56)  # struct sched_attr, v1
        got = _libc().syscall(numbers[1], 0, attr, 56, 0)
        kernel = (_libc().syscall(numbers[0], 1, 0), attr.raw if got == 0 else got)
    return (limits, os.getpriority(os.PRIO_PROCESS, 0), sorted(os.sched_getaffinity(0)),
            os.sched_getscheduler(0), os.sched_getparam(0).sched_priority, kernel)


_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS = 0x80086601, 0x40086602
TMPFS_ROOTS = ("/tmp", "/dev/shm")


def _root_state(path):
    """What a request may change on a tmpfs root beyond its entries, all of which a later
    request would meet: its mode (0555: no one writes there), its extended attributes (a
    default ACL denying creation; user.* as a channel from one request to the next) and its
    inode flags (noatime, nodump: inherited by every file made there)."""
    import array
    import fcntl

    xattrs = {}
    for name in sorted(os.listxattr(path, follow_symlinks=False)):
        try:
            xattrs[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            xattrs[name] = None
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
        flags = flags[0]
    except OSError:
        flags = None
    finally:
        os.close(fd)
    return stat.S_IMODE(os.lstat(path).st_mode), xattrs, flags


def _reset_root(path, state):
    """True when the tmpfs root ``path`` is as ``state`` (``_root_state`` at startup), put
    back first if a request changed it."""
    if _root_state(path) == state:
        return True
    _restore_root(path, state)
    return _root_state(path) == state


def _restore_root(path, state):
    import array
    import fcntl

    mode, xattrs, flags = state
    os.chmod(path, 0o700)   # user.* attributes need write permission to be removed
    for name in os.listxattr(path, follow_symlinks=False):
        if name not in xattrs:
            os.removexattr(path, name, follow_symlinks=False)
    if flags is not None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, array.array("i", [flags]))
        finally:
            os.close(fd)
    os.chmod(path, mode)


def _sockets_in_use():
    """(sockets, TCP connections in TIME_WAIT) of this network namespace (/proc/net/sockstat
    counts both per namespace; the per-socket tables under /proc/net cost ms to read)."""
    with open("/proc/net/sockstat") as f:
        fields = {line.split(":")[0]: line.split()[1:] for line in f}
    tcp = fields["TCP"]
    return int(fields["sockets"][1]), int(tcp[tcp.index("tw") + 1])


def _sockets_gone(budget=0.1):
    """True when no socket is left in the sandbox's network namespace once a request's
    processes are dead. A socket can outlive them: sent over a unix socket into that socket's
    own queue (a cycle only the kernel's collector frees: closing any unix socket starts it),
    or a TCP connection in TIME_WAIT (60 s: the next request could not bind that port). The
    memory, a listener still accepting, a port taken: state a later request would see. False
    -> the server exits and the host starts a clean one (a fresh network namespace)."""
    import socket

    for s in socket.socketpair():
        s.close()
    deadline = time.monotonic() + budget
    while True:
        try:
            used, time_wait = _sockets_in_use()
        except (OSError, KeyError, ValueError, IndexError):
            return False
        if time_wait:  # 60 s, not 100 ms: no use waiting
            return False
        if not used:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def _remove_sysv_ipc():
    """Remove every System V shared memory segment, message queue and semaphore set of this
    sandbox's IPC namespace: they outlive the request that made them (its memory, even its
    data, would reach the next request). True when none is left."""
    libc = _libc()
    for kind, remove in (("shm", lambda i: libc.shmctl(i, 0, None)),
                         ("msg", lambda i: libc.msgctl(i, 0, None)),
                         ("sem", lambda i: libc.semctl(i, 0, 0))):  # IPC_RMID = 0
        for _ in range(2):
            try:
                with open(f"/proc/sysvipc/{kind}") as f:
                    ids = [int(line.split()[1]) for line in f.readlines()[1:] if line.strip()]
            except (OSError, ValueError, IndexError):
                return False
            if not ids:
                break
            for ident in ids:
                remove(ident)
        else:
            return False
    return True


def check_private_pidns(host_pidns):
    """Refuse to run anywhere but in a pid namespace of our own, with its own /proc.

    ``host_pidns`` is the inode of the host's /proc/self/ns/pid, sent by the host. If we
    are in the host's namespace, or cannot tell, we stop: this code signals processes by
    pid and must never do so among the host's processes."""
    try:
        mine = os.stat("/proc/self/ns/pid").st_ino
        proc_is_ours = os.readlink("/proc/self") == str(os.getpid())
    except OSError as exc:
        raise RuntimeError(f"cannot verify the pid namespace: {exc}") from exc
    if not host_pidns or mine == int(host_pidns):
        raise RuntimeError("not inside a private pid namespace: refusing to run")
    if not proc_is_ours:
        raise RuntimeError("/proc is not this pid namespace's: refusing to run")


def _clean_dir(path):
    """Remove what a request left in a tmpfs root (writable again: ``_reset_root`` first),
    so that the next request starts pristine."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return
    if not names:
        return
    import shutil

    for name in names:
        p = os.path.join(path, name)
        if os.path.isdir(p) and not os.path.islink(p):
            _open_up(p)
            shutil.rmtree(p)
        else:
            os.unlink(p)


def _open_up(top):
    """Give the owner rwx on ``top`` and every folder under it, each before it is listed
    (a request may leave folders of mode 000 or 0300 that cannot be listed or emptied)."""
    os.chmod(top, 0o700)
    todo = [top]
    while todo:
        with os.scandir(todo.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    os.chmod(entry.path, 0o700)
                    todo.append(entry.path)


def _oom_first():
    """Make this process (and what it execs or forks) the first that the kernel's OOM
    killer picks in the sandbox's memory cgroup, before the server or launcher (raising
    one's own oom_score_adj needs no privilege)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


class Requests(BaseException):
    """Raised in a request's child once it is set up, caught by the boot code (``BOOT`` in
    forkserver.py), which then runs the handler on each request: ``args`` = (an iterable of
    (handler, request, reply), finish). Unwinding first leaves no frame of this file under
    the program, so a program that walks its stack (``traceback.extract_stack()``) sees only
    the boot's few fixed lines: traced data does not change when this file does."""


def _envelope(value, exc):
    """JSON bytes of ``{"ok": value}``, or ``{"error": ...}`` for the exception ``exc``."""
    if exc is None:
        try:
            return json.dumps({"ok": value}, ensure_ascii=False).encode()
        except BaseException as bad:  # noqa: BLE001 - a value JSON cannot hold
            exc = bad
    if isinstance(exc, MemoryError):
        return _MEMORY_ERROR
    try:
        tb = exc.__traceback__
        # the top entry is the boot's (or this function's) frame, not the program's
        tb = traceback.format_exception(type(exc), exc, tb.tb_next if tb else None)
        err = {"type": type(exc).__name__, "message": str(exc)[:4000],
               "traceback": "".join(tb)[-8000:]}
        return json.dumps({"error": err}, ensure_ascii=False).encode()
    except BaseException:  # noqa: BLE001
        return json.dumps({"error": {"type": type(exc).__name__, "message": "",
                                     "traceback": ""}}).encode()


def _child(handler, payload, w_resp, w_out, w_err, close_fds, lim, seed):
    """Runs in the forked child: sets it up, then raises ``Requests`` (never returns).

    ``payload`` is ``{"one": request}`` or ``{"batch": [request, ...]}``; a batch runs the
    requests one after the other in this one child (random reseeded before each)."""
    try:
        os.setsid()  # own session and process group
        _oom_first()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a program's usual Python
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        if _DUMPABLE_RESET:
            _prctl(PR_SET_DUMPABLE, 1)  # the program may inspect itself; not the server
        os.dup2(w_out, 1)
        os.dup2(w_err, 2)
        for fd in (w_out, w_err, *close_fds):
            os.close(fd)
        msg = json.loads(payload)
        if "batch" in msg:
            # CPU time adds up over a batch: the budget is per request; the server's
            # per-request wall deadline (reset at each finished request) stops a culprit.
            lim = dict(lim, cpu_seconds=float(lim["cpu_seconds"]) * max(1, len(msg["batch"])))
        apply_rlimits(lim, INFRA_PROCS_SERVER)
    except BaseException as exc:  # noqa: BLE001 - said as the response (no newline: a batch
        try:                      # takes it as no line, then runs each request alone)
            _write_all(w_resp, _envelope(None, exc))
        finally:
            os._exit(0)
    raise Requests(_each_request(handler, msg, w_resp, seed), _finish_child)


def _each_request(handler, msg, w_resp, seed):
    """(handler, request, reply) per request; ``reply(value, exc)`` sends its outcome. In a
    batch, one line per finished request (JSON never holds a raw newline): the server sees
    progress, and a batch cut short still returns its head."""
    seed_random = sys.modules["random"].seed
    batch = "batch" in msg
    end = b"\n" if batch else b""
    for request in msg["batch"] if batch else [msg["one"]]:
        seed_random(seed)  # same seed for every request: deterministic
        yield handler, request, lambda value, exc: _write_all(w_resp, _envelope(value, exc) + end)


def _finish_child():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            pass
    os._exit(0)


class _Capture:
    __slots__ = ("cap", "data", "total")

    def __init__(self, cap):
        self.cap, self.data, self.total = cap, bytearray(), 0

    def feed(self, chunk):
        self.total += len(chunk)
        room = self.cap - len(self.data)
        if room > 0:
            self.data += chunk[:room]


def _run_one(handler, payload, lim, seed, proto_fds):
    out_cap, resp_cap = int(lim["output_bytes"]), int(lim["response_bytes"])
    r_out, w_out = os.pipe()
    r_err, w_err = os.pipe()
    r_resp, w_resp = os.pipe()
    gc.collect()   # the child's collections come at about the same points (was: +300 objects
    # and a generation-1 count that grew with every request before it)
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(r_out), os.close(r_err), os.close(r_resp)
        _child(handler, payload, w_resp, w_out, w_err, proto_fds, lim, seed)
    for fd in (w_out, w_err, w_resp):
        os.close(fd)
    caps = {r_out: _Capture(out_cap), r_err: _Capture(out_cap), r_resp: _Capture(resp_cap + 1)}
    poller = select.poll()
    for fd in caps:
        poller.register(fd, select.POLLIN)
    if _WAKE:
        poller.register(_WAKE[0], select.POLLIN)
    try:
        pidfd = os.pidfd_open(pid)
        poller.register(pidfd, select.POLLIN)
    except (AttributeError, OSError):
        pidfd = None
    wall_budget = float(lim["wall_seconds"])
    deadline = t0 + wall_budget
    batch = payload.startswith(b'{"batch"')  # the wall budget is per request of a batch
    open_fds, timed_out, status = set(caps), False, None
    while status is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        wait_ms = remaining * 1000 if pidfd is not None else min(remaining * 1000, 5)
        exited = pidfd is None
        for fd, _ev in poller.poll(max(1, int(math.ceil(wait_ms)))):
            if fd == pidfd:
                exited = True
            elif _WAKE and fd == _WAKE[0]:   # a child exited: an orphan is reaped now
                try:
                    while os.read(fd, 512):
                        pass
                except BlockingIOError:
                    pass
                _reap(keep=pid)
            elif fd in open_fds:
                chunk = os.read(fd, 1 << 16)
                if chunk:
                    caps[fd].feed(chunk)
                    if batch and fd == r_resp and b"\n" in chunk:
                        deadline = time.monotonic() + wall_budget
                else:
                    poller.unregister(fd)
                    open_fds.discard(fd)
        if exited:
            wpid, st = os.waitpid(pid, os.WNOHANG)
            if wpid:
                status = st
            elif pidfd is not None:   # exited, but a tracer holds its status: poll instead
                poller.unregister(pidfd)
                os.close(pidfd)
                pidfd = None
    wall = time.monotonic() - t0
    if status is None:  # timeout: it goes with its subtree, next (no blocking wait: a tracer
        status = signal.SIGKILL  # it started could hold its exit status until killed too)
    clean = _kill_descendants()  # whatever it left behind, by pid, within our subtree
    for fd in open_fds:  # every writer is dead now: drain what is buffered
        os.set_blocking(fd, False)
        try:
            while True:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                caps[fd].feed(chunk)
        except BlockingIOError:
            pass
    for fd in caps:
        os.close(fd)
    if pidfd is not None:
        os.close(pidfd)
    out, err, resp = caps[r_out], caps[r_err], caps[r_resp]
    header = {
        "timed_out": timed_out,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "stdout_truncated": out.total > out_cap, "stderr_truncated": err.total > out_cap,
        "response_bytes": resp.total, "too_large": resp.total > resp_cap,
        "wall_seconds": wall, "clean": clean,
    }
    # One response over the cap is dropped; a batch keeps the lines that fit, so the host
    # takes those results and goes on from the request that overflowed (not from the top).
    body = bytes(resp.data[:resp_cap]) if batch else b"" if header["too_large"] else bytes(resp.data)
    return header, bytes(out.data), bytes(err.data), body


def serve(cfg):
    proto_in, proto_out = os.dup(0), os.dup(1)  # non-inheritable copies
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)  # stray prints can never corrupt the protocol
    os.close(devnull)

    def send(header, out=b"", err=b"", resp=b""):
        h = json.dumps(header).encode()
        _write_all(proto_out, RESP_HEADER.pack(len(h), len(out), len(err), len(resp))
                   + h + out + err + resp)

    try:
        check_private_pidns(cfg.get("host_pidns"))
        _prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of requests stay in our subtree
        global _DUMPABLE_RESET
        _prctl(PR_SET_DUMPABLE, 0)  # requests (same uid) cannot ptrace the server
        _DUMPABLE_RESET = True
        while sys.path and sys.path[0] in ("", os.getcwd()):
            del sys.path[0]
        sys.path[:0] = list(cfg["sys_path"])
        if sys.flags.no_site and "site_dirs" in cfg:
            # started with -S (see ForkServer): what `site` would have done, minus .pth files
            import site

            sys.path += [d for d in cfg["site_dirs"] if d not in sys.path and os.path.isdir(d)]
            site.setquit(), site.setcopyright(), site.sethelper()
        mod_name, _, func_name = cfg["handler"].partition(":")
        import importlib

        handler = importlib.import_module(mod_name)
        for part in func_name.split("."):
            handler = getattr(handler, part)
        if not callable(handler):
            raise TypeError(f"{cfg['handler']} is not callable")
        _install_seccomp(cfg["limits"].get("seccomp"))
    except BaseException as exc:  # noqa: BLE001
        send({"fatal": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        return 3
    import random  # noqa: F401 - imported here so that every child can reseed it

    lim, seed = cfg["limits"], cfg.get("seed", 0)
    # As pid 1 the kernel drops a signal from inside only while its action is the default:
    # Python's own SIGINT handler would let a request interrupt the server.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    # An orphan (reparented to us) that exits wakes the request loop through this pipe, to be
    # reaped at once: zombies count against the request's process limit until reaped.
    _WAKE[:] = os.pipe()
    for fd in _WAKE:
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(_WAKE[1], warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    # what the cleanup between requests imports, imported now: a later request must not
    # find more modules loaded than the first one did
    import array, ctypes, fcntl, shutil, socket  # noqa: E401,F401
    for tmp in TMPFS_ROOTS:
        os.chmod(tmp, 0o1777)
    roots = {tmp: _root_state(tmp) for tmp in TMPFS_ROOTS}
    settings = _process_settings()
    gc.collect()
    gc.freeze()  # keep the imported heap shared copy-on-write with the children
    send({"ready": True, "pid": os.getpid()})
    while True:
        head = _read_exact(proto_in, REQ_HEADER.size)
        if head is None:
            return 0
        payload = _read_exact(proto_in, REQ_HEADER.unpack(head)[0])
        if payload is None:
            return 0
        sys.stdout.flush(), sys.stderr.flush()
        header, out, err, resp = _run_one(handler, payload, lim, seed,
                                          (proto_in, proto_out, *_WAKE))
        clean = header.pop("clean")
        try:
            for tmp, state in roots.items():
                clean = _reset_root(tmp, state) and clean
                _clean_dir(tmp)
        except Exception:  # noqa: BLE001 - whatever the tree, a new server starts clean
            clean = False
        clean = _remove_sysv_ipc() and clean
        clean = clean and _sockets_gone()
        clean = clean and _process_settings() == settings
        header["server_exiting"] = not clean
        send(header, out, err, resp)
        if not clean:
            return 4  # could not restore a pristine sandbox: the host starts a new one


def launch(lim, argv):
    """One-shot mode: check the namespace, install the filter, apply the rlimits, then run
    the command as our child (with a working copy to carry: ``launch_on_copy``) and exit
    with its status (128+N when killed by signal N). We stay, as pid 1 and not dumpable: the
    command cannot trace its parent or take the host's pipes from it."""
    try:
        check_private_pidns(lim.get("host_pidns"))
    except RuntimeError as exc:
        os.write(2, f"sandbox: {exc}\n".encode())
        os._exit(126)
    try:
        _install_seccomp(lim.get("seccomp"))
    except OSError as exc:
        os.write(2, f"sandbox: cannot install the seccomp filter: {exc}\n".encode())
        os._exit(126)
    _prctl(PR_SET_DUMPABLE, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # pid 1: only default actions are dropped
    apply_rlimits(lim, INFRA_PROCS_LAUNCHER)
    if lim.get("workdir_copy"):
        os._exit(launch_on_copy(lim["workdir_copy"], argv))
    pid = _start_command(argv)
    while True:   # (orphans are ours too, as pid 1); the host ends the sandbox at its deadline
        done, status = os.waitpid(-1, 0)
        if done == pid:
            os._exit(_exit_code(status))


def _start_command(argv, cwd=None, close=()):
    """Fork the command (dumpable again: exec resets it) and return its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            for fd in close:
                os.close(fd)
            _oom_first()
            # a command starts as from a shell: Python ignores SIGPIPE and SIGXFSZ, and an
            # ignored signal stays ignored across exec (`yes | head` would print errors)
            for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            if cwd is not None:
                os.chdir(cwd)
            os.execvp(argv[0], argv)
        except OSError as exc:
            os.write(2, f"sandbox: cannot execute {argv[0]!r}: {exc}\n".encode())
        os._exit(127)
    return pid


def _exit_code(status):
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _copy_tree(src, dest):
    """``src`` onto the existing folder ``dest``, in sorted order (a tmpfs lists a folder in
    the order its entries were made, so listings in the sandbox do not depend on the host's
    filesystem); links are copied as links."""
    import shutil

    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        rel = os.path.relpath(dirpath, src)
        target = dest if rel == "." else os.path.join(dest, rel)
        for name in dirnames + sorted(filenames):
            s, d = os.path.join(dirpath, name), os.path.join(target, name)
            if os.path.islink(s):
                os.symlink(os.readlink(s), d)
            elif os.path.isdir(s):
                os.mkdir(d)
                shutil.copystat(s, d)
            elif os.path.isfile(s):
                shutil.copy2(s, d)
        if rel != "." and not os.path.islink(dirpath):
            shutil.copystat(dirpath, target)


def _wait_until(pid, deadline):
    """The exit status of child ``pid``, or None when ``deadline`` (monotonic) passed first;
    other exited children (orphans reparented to us) are reaped meanwhile."""
    while True:
        try:
            done, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return None
        if done == pid:
            return status
        if done:
            continue
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.002)


class _Frames:
    """A write-only file over fd ``fd`` that sends what is written as frames (8-byte length,
    then the bytes): the host can tell a complete tar (ended by an empty frame) from one cut
    short, whatever bytes the tar holds."""

    def __init__(self, fd):
        self.fd = fd

    def write(self, data):
        if data:
            _write_all(self.fd, len(data).to_bytes(8, "big") + bytes(data))
        return len(data)

    def end(self):
        _write_all(self.fd, (0).to_bytes(8, "big"))


def launch_on_copy(wc, argv):
    """Run ``argv`` on a working copy held in a size-limited tmpfs, and hand the copy back.

    ``wc``: ``src`` (the host's copy, read-only), ``dest`` (the tmpfs, the cwd), ``out_fd``
    (the write end of a pipe to the host), ``deadline_seconds``. The copy is made, the command
    runs as our child until it exits or the deadline, every process it left is killed (as
    pid 1 we inherit orphans), then ``out_fd`` gets a tar of ``dest`` in frames, an empty
    frame, and a JSON status line last. Only this process holds ``out_fd`` (the command never
    gets it, and cannot take ours: we are not dumpable), so nothing the command writes can
    pass for the copy or the status. Returns the
    exit code for bwrap (128+N when killed by signal N)."""
    import tarfile

    out = _Frames(int(wc["out_fd"]))
    os.set_inheritable(out.fd, False)

    def finish(head, tree=None):
        if tree is not None:
            try:
                with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                    tar.add(tree, arcname=".")   # recursive, each folder's entries sorted
            except Exception as exc:   # an unreadable or too deep tree: the frames end here
                head = {"error": f"writing the working copy out: {type(exc).__name__}: {exc}"}
        out.end()
        _write_all(out.fd, json.dumps(head).encode() + b"\n")

    try:
        _copy_tree(wc["src"], wc["dest"])
    except Exception as exc:   # ENOSPC: the host's copy is over the quota
        finish({"error": f"copying the working copy in: {type(exc).__name__}: {exc}"})
        return 125
    pid = _start_command(argv, cwd=wc["dest"], close=(out.fd,))
    status = _wait_until(pid, time.monotonic() + float(wc["deadline_seconds"]))
    if status is None:
        code, timed_out = 128 + signal.SIGKILL, True
    else:
        code, timed_out = _exit_code(status), False
    if not _kill_descendants():
        finish({"error": "processes of the command outlived it"})
        return code
    try:
        owner_access(wc["dest"])   # a `chmod 000` must not keep a file out of the copy
    except Exception as exc:
        finish({"error": f"reading the working copy: {type(exc).__name__}: {exc}"})
        return code
    st = os.statvfs(wc["dest"])
    finish({"exit_code": code, "timed_out": timed_out, "free_bytes": st.f_bavail * st.f_frsize},
           wc["dest"])
    return code


def owner_access(root):
    """Read and write (and search, on folders) for the owner, everywhere under ``root``; links
    are neither followed nor changed. A folder is opened up before it is walked into."""
    os.chmod(root, os.lstat(root).st_mode | 0o700)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            mode = os.lstat(p).st_mode
            if not stat.S_ISLNK(mode):
                os.chmod(p, mode | (0o700 if stat.S_ISDIR(mode) else 0o600))


def main(args):
    if args[0] == "serve":
        sys.exit(serve(json.loads(args[1])))
    if args[0] == "launch":
        launch(json.loads(args[1]), args[3:] if args[2] == "--" else args[2:])
    sys.exit(f"sandbox runtime: unknown mode {args[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
