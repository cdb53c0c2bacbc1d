"""Building the bubblewrap command line, and checking that a sandbox can be created.

Layout inside every sandbox (both ``run_command`` and the fork server):
  /usr (+ the /bin, /lib, /lib64... symlinks)   host system, read-only (libc, ld.so)
  <sys.base_prefix>                               the Python installation, read-only, at
                                                  its own path (its RPATH is absolute)
  explicit binds (code dirs, workdir, extra_ro_binds) at their destinations
  /proc (new, own pid namespace), /dev (minimal, no ptys: NO_PTYS), /tmp and /dev/shm
  (private tmpfs, size-capped); everything else, / included, is read-only and empty: no /etc,
  no /root, no $HOME, no repository, no network (own net namespace: only its own loopback,
  which bwrap brings up). seccomp.py: sockets of AF_UNIX/INET/INET6 only, no io_uring, no keyrings;
  memcg.py: one memory cap on the whole sandbox.

Privileges. Run as root, bwrap would map the sandbox uid to kernel uid 0, and the kernel
ignores RLIMIT_NPROC for uid 0 (measured here: a fork bomb under nproc=20 made 172 processes
in 0.3 s). So as root we nest two bwraps:
  outer: ``bwrap`` as root, a mount + pid namespace only: binds every host source (which
         may lie under /root, mode 700) read-only onto /stage/N, where any uid can reach it;
  inner: ``setpriv --reuid=U`` then an unprivileged ``bwrap --unshare-all --unshare-user
         --uid 65534`` that binds /stage/N to the final destinations. Kernel uid U != 0, so
         RLIMIT_NPROC holds, and it counts per user namespace, i.e. per sandbox. U is leased
         for the sandbox's life (uids.py), one per live sandbox, so that the kernel's per-uid
         quotas (inotify, pipe buffers...) are not shared either; inside it is 65534.
Killing the outer bwrap kills its pid-1 (--die-with-parent), which tears down the whole
pid namespace, nested one included. Not root: only the inner bwrap runs, as ourselves.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from .errors import INSTALL_HINT, SandboxError, SandboxUnavailable
from .uids import lease

SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
RESERVED_DESTS = ("/", "/proc", "/dev", "/tmp", "/usr", "/stage")
INSIDE_UID = 65534   # the uid (and gid) a program sees, as root: "nobody"


@dataclass(frozen=True)
class Bind:
    src: str  # host path
    dest: str  # path inside the sandbox
    writable: bool = False


# Environment of the bwrap processes themselves. bwrap's own pid 1 inside the sandbox keeps
# the environment it was started with and the program can read its /proc/1/environ (same
# uid), so bwrap must never inherit the host's environment (credentials!): --clearenv only
# scrubs the program's.
LAUNCH_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}

# No pseudo-terminals. bwrap --dev mounts a devpts of the sandbox's own with no cap on its
# count: the kernel's pool of ptys (kernel/pty/max less kernel/pty/reserve, 3072 by default)
# is shared by every devpts but the host's first one, containers' included, and one program
# opened 1000 ptys, all it tried (the default rlimits allow 128 a process, 64 processes).
# Nothing run here needs one: traced programs may not import pty/tty/termios (programs/
# scope.py), the agent's bash runs `bash -c` on pipes, test suites run on pipes and the pinned
# repositories' code opens none. So an empty read-only tmpfs covers that devpts: /dev/ptmx
# (a link to pts/ptmx) leads nowhere, openpty fails with ENOENT, and the covered devpts can
# only be reached by unmounting, which no program's capabilities allow.
NO_PTYS = ("--tmpfs", "/dev/pts", "--remount-ro", "/dev/pts")


def host_pidns() -> int:
    """Inode of this (host) process's pid namespace. Sent to the code that runs inside the
    sandbox, which refuses to start when its own pid namespace is the same one."""
    return os.stat("/proc/self/ns/pid").st_ino


def find_bwrap(bwrap: str | os.PathLike | None = None) -> str:
    cand = str(bwrap or os.environ.get("CODEWORLD_BWRAP") or "bwrap")
    path = shutil.which(cand)
    if not path:
        raise SandboxUnavailable(
            f"bubblewrap executable {cand!r} not found (PATH={os.environ.get('PATH', '')!r}); "
            f"{INSTALL_HINT}. Refusing to run untrusted code without a sandbox.")
    return os.path.realpath(path)


@functools.lru_cache(maxsize=None)
def _features(bwrap_path: str) -> frozenset:
    try:
        res = subprocess.run([bwrap_path, "--help"], capture_output=True, text=True, timeout=30,
                             env=LAUNCH_ENV)
    except OSError as exc:
        raise SandboxUnavailable(f"cannot execute {bwrap_path}: {exc}; {INSTALL_HINT}") from exc
    return frozenset(w for w in (res.stdout + res.stderr).split() if w.startswith("--"))


def python_install() -> tuple[str, list[Bind]]:
    """(interpreter path, binds) of the base Python installation (not the venv)."""
    binds, seen = [], set()
    for prefix in (sys.base_prefix, sys.base_exec_prefix):
        if prefix in seen or prefix == "/usr" or prefix.startswith("/usr/"):
            continue
        seen.add(prefix)
        binds.append(Bind(os.path.realpath(prefix), prefix))
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for name in (f"python{ver}", "python3", "python"):
        exe = os.path.join(sys.base_exec_prefix, "bin", name)
        if os.path.exists(exe):
            return exe, binds
    raise SandboxUnavailable(f"no python interpreter found under {sys.base_exec_prefix}/bin")


def sandbox_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The whole environment of a sandboxed program: an allow-list, nothing inherited."""
    pybin = os.path.dirname(python_install()[0])
    env = {"PATH": f"{pybin}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
           "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1",
           "HOME": "/tmp", "TMPDIR": "/tmp"}
    for key, value in (extra or {}).items():
        if not key or "=" in key or "\0" in key or "\0" in str(value):
            raise ValueError(f"bad environment variable {key!r}")
        env[key] = str(value)
    return env


def _system_args() -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for d in SYSTEM_LINKS:
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    if os.path.isfile("/etc/ld.so.cache"):
        args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    return args


def _check_dest(dest: str) -> str:
    """A mount destination inside the sandbox, normalised; not one of the sandbox's own."""
    norm = os.path.normpath(dest)
    if not os.path.isabs(norm) or any(
            norm == r or (r != "/" and norm.startswith(r + "/")) for r in RESERVED_DESTS):
        raise SandboxError(f"bad sandbox destination {dest!r}")
    return norm


def _check_binds(binds: Iterable[Bind]) -> list[Bind]:
    out = []
    for b in binds:
        dest = _check_dest(b.dest)
        if not os.path.exists(b.src):
            raise SandboxError(f"bind source {b.src!r} does not exist")
        out.append(Bind(os.path.realpath(b.src), dest, b.writable))
    return sorted(out, key=lambda b: b.dest.count("/"))  # parents before children


def build_argv(command: Sequence[str], *, uid: int | None, binds: Iterable[Bind],
               env: Mapping[str, str], chdir: str = "/tmp", tmpfs_bytes: int = 256 << 20,
               bwrap: str | os.PathLike | None = None,
               status_fd: int | None = None,
               sized_tmpfs: Sequence[tuple[str, int]] = (),
               caps: Sequence[str] = ()) -> list[str]:
    """The full argv (outer bwrap + setpriv + inner bwrap when root) running ``command``.
    ``uid``: the kernel uid the sandbox runs as, leased for its life (``uids.lease``); None
    only when we are not root (the sandbox then runs as ourselves).
    ``sized_tmpfs``: (destination, bytes) of further size-limited tmpfs mounts (a working
    copy's quota). ``caps``: capabilities ``command`` keeps in the sandbox's user namespace
    (the fork server's, to give each request namespaces of its own; none otherwise)."""
    path = find_bwrap(bwrap)
    feats = _features(path)
    if (uid is None) != (os.geteuid() != 0) or uid == 0:
        raise SandboxError(f"a sandbox built by uid {os.geteuid()} cannot run as uid {uid}: "
                           f"as root it needs a leased non-zero uid, else none")
    binds = _check_binds(binds)
    inner_bwrap = path if uid is None else "/stage/bwrap"
    inner = [inner_bwrap, "--unshare-all", "--unshare-user"]
    if uid is not None:   # whichever uid it drew, the program sees the same one
        inner += ["--uid", str(INSIDE_UID), "--gid", str(INSIDE_UID)]
    if "--disable-userns" in feats:  # no nested user namespaces for the program
        inner.append("--disable-userns")
    if feats and "--as-pid-1" not in feats:   # (no features: running it will tell what fails)
        raise SandboxUnavailable(f"{path} has no --as-pid-1 option (bubblewrap >= 0.4): the "
                                 f"sandbox's pid 1 must be our own process; {INSTALL_HINT}")
    # Our process (fork server or launcher: non-dumpable, under the seccomp filter) is pid 1,
    # not bwrap's reaper: that one ran as the programs' uid, dumpable and unfiltered, holding
    # the host's pipes on fds 0/1; a program could ptrace it (or pidfd_getfd its fds) to forge
    # results or to run code outside the filter. Pid 1 also cannot be killed from inside.
    inner += ["--as-pid-1", "--die-with-parent", "--new-session", "--hostname", "sandbox",
              "--clearenv"]
    for cap in caps:
        inner += ["--cap-add", cap]
    for key, value in env.items():
        inner += ["--setenv", key, value]
    inner += _system_args()
    outer_binds = []
    for i, b in enumerate(binds):
        src = b.src
        if uid is not None:
            src = f"/stage/{i}"
            outer_binds += ["--bind" if b.writable else "--ro-bind", b.src, src]
        inner += ["--bind" if b.writable else "--ro-bind", src, b.dest]
    if sized_tmpfs and "--size" not in feats:
        raise SandboxUnavailable(f"{path} has no --size option (bubblewrap >= 0.5): a working "
                                 f"copy's size limit cannot be enforced; {INSTALL_HINT}")
    for dest, nbytes in sized_tmpfs:
        inner += ["--size", str(int(nbytes)), "--tmpfs", _check_dest(dest)]
    size = ["--size", str(int(tmpfs_bytes))] if "--size" in feats else []
    inner += ["--proc", "/proc", "--dev", "/dev", *NO_PTYS, *size, "--tmpfs", "/tmp",
              *size, "--tmpfs", "/dev/shm", "--remount-ro", "/", "--remount-ro", "/dev",
              "--chdir", chdir]
    if status_fd is not None:
        inner += ["--json-status-fd", str(status_fd)]
    inner += ["--", *command]
    if uid is None:
        return inner
    setpriv = shutil.which("setpriv")
    if not setpriv:
        raise SandboxUnavailable("setpriv (util-linux) not found: needed to drop root before "
                                 "the sandbox; `apt-get install -y util-linux`")
    # (dirs that privileged bwrap creates implicitly are 0700: make the needed ones 0755)
    outer = [path, "--unshare-pid", "--die-with-parent", "--dev", "/dev", "--bind", "/proc",
             "/proc", "--perms", "0755", "--dir", "/etc", *_system_args(), "--tmpfs", "/tmp",
             "--perms", "0755", "--dir", "/stage",
             "--ro-bind", path, "/stage/bwrap", "--ro-bind", setpriv, "/stage/setpriv",
             *outer_binds, "--", "/stage/setpriv", f"--reuid={uid}", f"--regid={uid}",
             "--clear-groups", "--inh-caps=-all"]
    return outer + inner


_PROBED: set = set()


def ensure_available(bwrap: str | os.PathLike | None = None) -> None:
    """Create a throw-away sandbox once per process; raise SandboxUnavailable if it fails."""
    path = find_bwrap(bwrap)
    key = (path, os.geteuid())
    if key in _PROBED:
        return
    exe, binds = python_install()
    with lease() as held:
        argv = build_argv([exe, "-S", "-c", "pass"], uid=held.uid, binds=binds,
                          env=sandbox_env(), bwrap=path)
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                                 stdin=subprocess.DEVNULL, env=LAUNCH_ENV)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SandboxUnavailable(f"cannot run bubblewrap ({path}): {exc}; "
                                     f"{INSTALL_HINT}") from exc
    if res.returncode != 0:
        raise SandboxUnavailable(
            f"bubblewrap ({path}) could not create the sandbox (exit {res.returncode}): "
            f"{(res.stderr or res.stdout).strip()[-2000:]}; {INSTALL_HINT}")
    _PROBED.add(key)
