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
the inode of its own pid namespace; same inode, or no way to tell -> refuse to run). Each
fork-server request runs in pid, mount and IPC namespaces of its own under an init of its own
(``_fork_request``): when the request's process ends, its init exits and the kernel kills
whatever the request left. The server is a child subreaper and, on a timeout, kills its whole
subtree by pid (``_kill_descendants``). If anything else shows up in the namespace, or the
subtree will not die, the server exits and the host SIGKILLs the outer bwrap, which tears
the whole pid namespace down.

Pid 1. The server (or the launcher) is the sandbox's pid 1 (bwrap --as-pid-1): a program
cannot kill it (the kernel drops signals to a namespace's init sent from inside), trace it or
take its fds (it is not dumpable), and when it exits the kernel kills everything left. A
fork-server request does not even see the server: its pid 1 is its own init.
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
INFRA_PROCS_SERVER = 3  # the fork server (pid 1 of the sandbox), a request's relay and init
INFRA_PROCS_LAUNCHER = 1  # the launcher (pid 1), the command's parent
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


def _read_to_end(fd):
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


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
    pids, others = _kill_subtree(os.getpid(), time.monotonic() + budget)
    return not pids and not others


def _kill_until_gone(find, deadline):
    """SIGKILL the pids ``find()`` lists, by pid, until it lists none or ``deadline``
    (monotonic) passes; the pids it listed last."""
    while True:
        pids = find()
        if not pids or time.monotonic() > deadline:
            return pids
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.0005)


def _kill_subtree(root, deadline, keep=None):
    """SIGKILL the descendants of ``root`` by pid until none is left or ``deadline`` passes,
    reaping our exited children but ``keep``; (descendants left, other pids of the namespace)."""
    others = []

    def descendants():
        _reap(keep=keep)
        pids, others[:] = _scan(root)
        return pids

    return _kill_until_gone(descendants, deadline), others


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


# A request's own namespaces (``_fork_request``): unshare(2) and mount(2) flags
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID = 0x00020000, 0x08000000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
CAP_SETPCAP, CAP_SYS_ADMIN = 8, 21
REQUEST_CAPS = ("CAP_SYS_ADMIN", "CAP_SETPCAP")  # bwrap --cap-add, the fork server's only
PR_CAPBSET_DROP = 24
TMPFS_ROOTS = ("/tmp", "/dev/shm")
# under a fresh /proc, read-only as bwrap leaves them under its own
_PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus")
INIT_FAILED = 71  # the request's init could not set the request up (its status, as an exit)
_STATUS = struct.Struct("=i")   # a wait status, init -> server (made here: struct's cache would
# otherwise gain an entry in the server at its first request, one more object in later children)
_OOM_REQUEST_INIT, _OOM_PROGRAM = 500, 1000   # oom_score_adj: the server's stays 0


def _check_request_capabilities():
    """The fork server holds CAP_SYS_ADMIN and CAP_SETPCAP in the sandbox's user namespace
    (bwrap --cap-add, nothing else): to give each request namespaces of its own. Each request
    drops them (``_drop_capabilities``) before any of its code runs."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    have = int(fields["CapEff"].strip(), 16)
    for cap in (CAP_SYS_ADMIN, CAP_SETPCAP):
        if not have >> cap & 1:
            raise RuntimeError(f"the fork server lacks capability {cap} in its user namespace "
                               f"(bwrap --cap-add {' --cap-add '.join(REQUEST_CAPS)})")


def _syscall_ok(rc, what):
    if rc != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None):
    enc = lambda v: v.encode() if v is not None else None  # noqa: E731
    _syscall_ok(_libc().mount(enc(source), enc(target), enc(fstype), flags, enc(data)),
                f"mount {target}")


def _drop_capabilities():
    """No capability left, nor any way back (the bounding set emptied, no_new_privs: also
    where no seccomp filter set it): what a request's code starts with."""
    import ctypes

    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _syscall_ok(_libc().prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"dropping capability {cap}")
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)   # _LINUX_CAPABILITY_VERSION_3, this process
    _syscall_ok(_libc().capset(header, (ctypes.c_uint32 * 6)()), "capset")


def _fork_request(tmpfs_bytes, w_status, w_resp):
    """Fork a request's process in namespaces of its own; 0 in that process, the relay's pid
    in the server.

    Nothing of one request reaches the next, and a request cannot see the server: the relay
    (the server's child) unshares a pid and an IPC namespace; its child is the request's init
    (pid 1 there), which unshares a mount namespace, mounts a fresh /proc (only the request's
    processes), /tmp and /dev/shm (empty tmpfs, mode 1777), drops every capability and forks
    the request's process: pid 2, whatever came before. Files, modes, extended attributes,
    pids and inode numbers die with the namespaces; signals, prlimit or setpriority aimed at
    pid 1 reach the request's own init, which lives no longer than the request. The init reaps
    orphans as they exit, writes the request's wait status to ``w_status`` when it ends, and
    exits: the kernel kills whatever is left in the namespace, and the mount namespace (its
    files) goes with the init's exit. The kernel frees an IPC namespace later, asynchronously,
    its memory charged meanwhile (the next request was killed for a segment this one left),
    so the relay removes System V IPC objects itself once the init is gone, then exits: 0
    when all went well (else the server is replaced). (The network namespace stays the
    server's: a fresh one per request costs more than the rare request that leaves a socket,
    see ``_sockets_gone``.)"""
    relay = os.fork()
    if relay:
        return relay
    code = INIT_FAILED
    try:
        # a request's relay and init go before the server, after the request's programs:
        # what a request holds is freed only once they are gone. (Still not dumpable: its
        # process must not trace its init.)
        _oom_first(_OOM_REQUEST_INIT, dumpable=False)
        signal.set_wakeup_fd(-1)   # the server's pipe is the server's
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _syscall_ok(_libc().unshare(CLONE_NEWPID | CLONE_NEWIPC), "unshare")
        init = os.fork()
        if init == 0:
            return _request_init(tmpfs_bytes, w_status, w_resp)
        for fd in (w_status, w_resp):
            os.close(fd)
        _, status = os.waitpid(init, 0)
        set_up = status != INIT_FAILED << 8
        code = 0 if _remove_sysv_ipc() and set_up else INIT_FAILED
    except BaseException:  # noqa: BLE001 - the relay never returns into the server's loop
        pass
    os._exit(code)


def _request_init(tmpfs_bytes, w_status, w_resp):
    """The request's pid 1 (see ``_fork_request``): returns 0 in the request's process only."""
    try:
        cwd = os.getcwd()
        _syscall_ok(_libc().unshare(CLONE_NEWNS), "unshare")
        _mount(None, "/", None, MS_REC | MS_PRIVATE)   # nothing propagates out
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        for name in _PROC_READ_ONLY:
            path = "/proc/" + name
            if os.path.exists(path):
                _mount(path, path, None, MS_BIND | MS_REC)
                _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
                       | MS_NOEXEC)
        for top in TMPFS_ROOTS:
            _mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, f"size={int(tmpfs_bytes)},mode=1777")
        os.chdir(cwd)   # the new /tmp, not the server's beneath it
        _drop_capabilities()
        gc.collect()   # the request's collections start where every other request's did
        pid = os.fork()
    except BaseException as exc:  # noqa: BLE001 - said as the response; the server is replaced
        _write_all(w_resp, _envelope(None, SandboxSetupError(
            f"the sandbox could not set up the request's namespaces: {exc}")))
        _write_all(w_status, _STATUS.pack(INIT_FAILED << 8))
        os._exit(INIT_FAILED)
    if pid == 0:
        os.close(w_status)
        return 0
    # the server's fds and the request's pipes: the request's process has its own copies
    os.closerange(3, w_status)
    os.closerange(w_status + 1, max(w_status + 1, os.sysconf("SC_OPEN_MAX")))
    while True:
        try:
            done, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(INIT_FAILED)
        if done == pid:
            _write_all(w_status, _STATUS.pack(status))
            os._exit(0)


class SandboxSetupError(RuntimeError):
    """The fork server could not give a request its namespaces (a result's error type)."""


def _remove_sysv_ipc():
    """Remove every System V shared memory segment, message queue and semaphore set of this
    (the request's) IPC namespace. True when none is left."""
    libc = _libc()
    for kind, remove in (("shm", lambda i: libc.shmctl(i, 0, None)),
                         ("msg", lambda i: libc.msgctl(i, 0, None)),
                         ("sem", lambda i: libc.semctl(i, 0, 0))):  # IPC_RMID = 0
        for _ in range(2):
            try:
                with open(f"/proc/sysvipc/{kind}") as f:   # this IPC namespace's (the reader's)
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


def _sockets_in_use():
    """(sockets, TCP connections in TIME_WAIT) of this network namespace (/proc/net/sockstat
    counts both per namespace; the per-socket tables under /proc/net cost ms to read)."""
    with open("/proc/net/sockstat") as f:
        fields = {line.split(":")[0]: line.split()[1:] for line in f}
    tcp = fields["TCP"]
    return int(fields["sockets"][1]), int(tcp[tcp.index("tw") + 1])


def _sockets_gone():
    """True when no socket is left in the sandbox's network namespace once a request's
    processes are dead (their own sockets close with them). One that is left was sent over a
    unix socket into that socket's own queue: a cycle that holds what it carries (the fds of
    memfds: memory) until the kernel's collector frees it, asynchronously, even after the
    socket count reads 0; or a TCP connection in TIME_WAIT (60 s: the next request could not
    bind that port). The memory, a listener still accepting, a port taken: state a later
    request would see. False -> the server exits and the host starts a clean one (a fresh
    network namespace and memory cgroup)."""
    try:
        used, time_wait = _sockets_in_use()
    except (OSError, KeyError, ValueError, IndexError):
        return False
    return not used and not time_wait


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


def _oom_first(score=_OOM_PROGRAM, dumpable=True):
    """Make this process (and what it execs or forks) one the kernel's OOM killer picks in the
    sandbox's memory cgroup before the server or launcher: a program first (1000), then a
    request's relay and init (500). Raising one's own oom_score_adj needs no privilege, but
    the /proc files of a process that is not dumpable belong to root: so it is dumpable for
    the write, and stays so only if ``dumpable`` (without this the write failed, unseen, in
    every fork-server request and command, which inherit their parent's undumpable state: the
    OOM killer then chose by size, the server first when the memory was a request's files)."""
    _prctl(PR_SET_DUMPABLE, 1)
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(score))
    except OSError:
        pass
    finally:
        if not dumpable:
            _prctl(PR_SET_DUMPABLE, 0)


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

    ``payload`` is ``{"one": request}`` or ``{"batch": [request, ...], "shared": bool}``; a
    batch runs the requests one after the other, each in a process of its own forked from
    this child, or all in this one when ``shared`` (see _each_request)."""
    try:
        os.setsid()  # own session and process group
        _oom_first()  # and dumpable again: the program may inspect itself, not its init
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a program's usual Python
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        os.dup2(w_out, 1)
        os.dup2(w_err, 2)
        for fd in (w_out, w_err, *close_fds):
            os.close(fd)
        msg = json.loads(payload)
        if "batch" in msg:
            # CPU time adds up over a batch: the budget is per request; the server's
            # per-request wall deadline (reset at each finished request) stops a culprit. A
            # batch whose requests run in processes of their own (_each_request) counts one
            # more: this child, which forks and relays them (their CPU time is their own).
            apply_rlimits(dict(lim, cpu_seconds=float(lim["cpu_seconds"]) * len(msg["batch"])),
                          INFRA_PROCS_SERVER + (0 if msg.get("shared") else 1))
        else:
            apply_rlimits(lim, INFRA_PROCS_SERVER)
    except BaseException as exc:  # noqa: BLE001 - said as the response (no newline: a batch
        try:                      # takes it as no line, then runs each request alone)
            _write_all(w_resp, _envelope(None, exc))
        finally:
            os._exit(0)
    raise Requests(_each_request(handler, msg, w_resp, seed, lim), _finish_child)


def _each_request(handler, msg, w_resp, seed, lim):
    """(handler, request, reply) per request; ``reply(value, exc)`` sends its outcome. In a
    batch, one line per finished request (JSON never holds a raw newline): the server sees
    progress, and a batch cut short still returns its head.

    A batch's requests each run in a process of their own, forked here from this child (which
    runs none: every program starts from the same clean state, as alone) with a response
    pipe of its own: a program can neither change its neighbours' module state, environment
    or working folder nor write their responses (files it leaves in /tmp do stay: one mount
    namespace a batch), and no process of it outlives it (``_kill_all_but``: the programs share
    one pid namespace, and a daemon one left could stop or rewrite the next). A request that
    does not end with exactly one response (killed, crashed, a newline written) ends the
    batch there: the host runs the rest one by one.
    A ``shared`` batch (the caller's choice: ~2 ms a request less) runs them all in this
    process instead, random reseeded before each, and trusts each to write only its own line."""
    seed_random = sys.modules["random"].seed
    if "batch" not in msg:
        seed_random(seed)
        yield handler, msg["one"], lambda value, exc: _write_all(w_resp, _envelope(value, exc))
        return
    if msg.get("shared"):
        for request in msg["batch"]:
            seed_random(seed)  # same seed for every request: deterministic
            yield handler, request, lambda value, exc: _write_all(
                w_resp, _envelope(value, exc) + b"\n")
        return
    _prctl(PR_SET_DUMPABLE, 0)  # the programs it forks may not read or write its memory
    for request in msg["batch"]:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:   # the request's process: the yield runs the handler (boot code)
            os.close(r)
            os.close(w_resp)
            apply_rlimits(lim, INFRA_PROCS_SERVER + 1)   # a request's own CPU budget
            _prctl(PR_SET_DUMPABLE, 1)   # (a program may inspect itself)
            seed_random(seed)  # same seed for every request: deterministic
            yield handler, request, lambda value, exc: _write_all(w, _envelope(value, exc))
            return   # then the boot code's finish() ends the process
        os.close(w)
        body = _read_to_end(r)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        # what the program left (a double-forked daemon: it could stop the next programs
        # or write their memory, same uid, dumpable) dies before its line is written: a
        # program that signals this process meanwhile stops the batch at its own line
        left = _kill_all_but((1, os.getpid()), time.monotonic() + 2.0)
        if left or not body or b"\n" in body or not os.WIFEXITED(status):
            return   # (the batch stops here: the server sees no more lines)
        _write_all(w_resp, body + b"\n")


def _kill_all_but(keep, deadline):
    """SIGKILL every process of this (a request's own) pid namespace but ``keep``, by pid,
    until none is left or ``deadline`` (monotonic) passes; the pids still there. For a
    ``process`` batch's process (pid 2, its init pid 1): only the programs' processes are
    left, whatever they did (setsid, double fork, a namespace of their own: all show in
    this /proc, the request's own, mounted by its init). Orphans stay the init's, which
    reaps them as they exit, as in a request of its own."""
    return _kill_until_gone(
        lambda: [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in keep],
        deadline)


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
    r_status, w_status = os.pipe()
    gc.collect()   # the child's collections come at about the same points (was: +300 objects
    # and a generation-1 count that grew with every request before it)
    t0 = time.monotonic()
    pid = _fork_request(lim["tmpfs_bytes"], w_status, w_resp)   # the relay (request: 0)
    if pid == 0:
        os.close(r_out), os.close(r_err), os.close(r_resp), os.close(r_status)
        _child(handler, payload, w_resp, w_out, w_err, proto_fds, lim, seed)
    for fd in (w_out, w_err, w_resp, w_status):
        os.close(fd)
    os.set_blocking(r_status, False)
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
    open_fds, timed_out, status, set_up = set(caps), False, None, True
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
            wpid, relay_status = os.waitpid(pid, os.WNOHANG)
            if wpid:   # the request's init is gone, so is all of the request
                status = _request_status(r_status)
                set_up = relay_status == 0   # else the sandbox may not be as it was
            elif pidfd is not None:   # exited but not reapable yet: poll instead
                poller.unregister(pidfd)
                os.close(pidfd)
                pidfd = None
    wall = time.monotonic() - t0
    if status is None:  # timeout: the request's namespace goes, the relay cleans up after it
        status = signal.SIGKILL
        set_up = _stop_request(pid)
    clean = _kill_descendants() and set_up  # what is left, by pid, in our subtree
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
    for fd in (*caps, r_status):
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


def _stop_request(relay, budget=2.0):
    """A timed-out request: SIGKILL every process below its relay (its init, and the kernel
    kills the rest of its namespace with it), then let the relay remove the request's System V
    IPC and exit, as after any request (killed with the rest, it left the segments to the
    kernel's later free: the next request was killed for their memory). True when the relay
    exited 0 in time; else ``_kill_descendants`` takes it too and the server is replaced."""
    deadline = time.monotonic() + budget
    _kill_subtree(relay, deadline, keep=relay)
    return _wait_until(relay, deadline) == 0


def _request_status(r_status):
    """The request's wait status as its init wrote it; SIGKILL when it wrote none (its init
    was killed, e.g. by the memory cgroup's OOM killer)."""
    try:
        data = os.read(r_status, _STATUS.size)
    except BlockingIOError:
        data = b""
    return _STATUS.unpack(data)[0] if len(data) == _STATUS.size else int(signal.SIGKILL)


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
        _prctl(PR_SET_DUMPABLE, 0)  # requests (same uid) cannot ptrace the server
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
        _check_request_capabilities()
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
    # what a request's relay and init import, imported now: a later request must not find
    # more modules loaded than the first one did. (socket: loaded in every server so far, for
    # a check it no longer needs; kept, so that what a program finds loaded stays the same.)
    import ctypes, socket  # noqa: E401,F401
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
        clean = header.pop("clean") and _sockets_gone()
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
