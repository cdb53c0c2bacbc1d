"""The sandbox (codeworld.sandbox) against hostile programs.

Safety: every hostile program below runs only through the sandbox, only after the
session fixture ``probe`` verified (with harmless code) that the sandbox has its own pid
namespace, a non-root uid and working rlimits; and each hostile snippet starts with
``GUARD``, which re-checks the pid namespace inside the sandbox and refuses to go on in
the host's. Fork-bomb limits are tiny (16 processes, 2 s).
"""
from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from codeworld.sandbox import forkserver as fs
from codeworld.sandbox.server import INFRA_PROCS_SERVER, _scan
from codeworld.sandbox import (INSTALL_HINT, CommandResult, ForkServer, Limits, SandboxError,
                               SandboxUnavailable, map_requests, run_command)

REPO = Path(__file__).resolve().parents[1]
HANDLERS = {"/sandbox/lib/sandbox_handlers.py": str(REPO / "tests" / "sandbox_handlers.py")}
RUN_CODE = "sandbox_handlers:run_code"
HOST_PIDNS = os.stat("/proc/self/ns/pid").st_ino
GUARD = (f"import os\nif os.stat('/proc/self/ns/pid').st_ino == {HOST_PIDNS}:\n"
         f"    raise SystemExit('not sandboxed: refusing')\n")
SMALL = Limits(wall_seconds=5, cpu_seconds=5, memory_bytes=512 << 20, max_processes=16,
               output_bytes=64 << 10)

# In CI the sandbox must be there (make test installs it): a missing bwrap fails, not skips.
pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None and not os.environ.get("CI"),
                                reason=f"bubblewrap is not installed: {INSTALL_HINT}")


def hostile(code: str) -> dict:
    return {"code": GUARD + textwrap.dedent(code)}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="session")
def sentinel():
    """A host process of ours that nothing in the sandbox may touch."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc
    assert _alive(proc.pid), "the host sentinel process was killed"
    proc.kill()
    proc.wait()


@pytest.fixture(scope="session")
def probe(sentinel):
    """Harmless checks that must hold before any hostile program runs."""
    code = textwrap.dedent("""
        import os, resource
        result = {"ns": os.stat("/proc/self/ns/pid").st_ino, "pid": os.getpid(),
                  "uid": os.getuid(), "proc_self": os.readlink("/proc/self"),
                  "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
                  "nproc": resource.getrlimit(resource.RLIMIT_NPROC),
                  "as": resource.getrlimit(resource.RLIMIT_AS)}
    """)
    with ForkServer(RUN_CODE, HANDLERS, SMALL) as server:
        res = server.call({"code": code})
    assert res.ok, res
    got = res.response["result"]
    if got["ns"] == HOST_PIDNS or got["pid"] > 50 or got["proc_self"] != str(got["pid"]):
        pytest.exit(f"sandbox has no private pid namespace: {got}", returncode=3)
    if got["uid"] == 0 or got["nproc"][0] > 64 or got["as"][0] != SMALL.memory_bytes:
        pytest.exit(f"sandbox rlimits/uid not applied: {got}", returncode=3)
    return got


@pytest.fixture(scope="module")
def server(probe):
    with ForkServer(RUN_CODE, HANDLERS, SMALL) as srv:
        yield srv


def _pids_after(server) -> list[int]:
    """Pids seen by a fresh request: only its own namespace's, its init (1) and itself (2)."""
    res = server.call({"code": "import os\nresult = sorted(int(p) for p in os.listdir('/proc')"
                               " if p.isdigit())"})
    assert res.ok, res
    return res.response["result"]


def _server_subtree(server) -> list[int]:
    """From the host: the fork server's processes below its bwrap (pid 1 of the sandbox),
    which a request's leftovers would join; [] when the server is alone."""
    pid = server._proc.pid   # bwrap (outer, inner): one child each, down to the server
    while Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"bwrap"):
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if len(kids) != 1:
            break
        pid = int(kids[0])
    return _scan(pid)[0]   # every descendant, whichever of their threads forked them


def _assert_healthy(server, sentinel):
    assert _pids_after(server) == [1, 2]
    assert _server_subtree(server) == [], "something survived the previous request"
    assert server.call({"code": "result = 6 * 7"}).response == {"result": 42}
    assert _alive(sentinel.pid)


# -- isolation -------------------------------------------------------------------------------

def test_probe_isolation(probe, server):
    # RLIMIT_NPROC counts the sandbox's own processes too: the server, a request's relay, init
    assert probe["uid"] != 0 and probe["nproc"][0] == SMALL.max_processes + INFRA_PROCS_SERVER
    assert probe["pid"] == 2 and probe["pids"] == [1, 2] and probe["proc_self"] == "2"
    res = server.call({"code": "import os\nresult = sorted(os.listdir('/'))"})
    assert set(res.response["result"]) <= {"bin", "dev", "etc", "lib", "lib32", "lib64",
                                            "libx32", "proc", "root", "sandbox", "sbin",
                                            "tmp", "usr"}
    res = server.call({"code": "import os\nresult = sorted(os.listdir('/etc'))"})
    assert res.response["result"] == ["ld.so.cache"]


def test_writes_outside_tmp_fail(server, sentinel, tmp_path):
    target = REPO / "PWNED_BY_SANDBOX"
    for path in ("/etc/passwd", "/etc/x", "/usr/x", str(target), "/sandbox/lib/x",
                 sys.base_prefix + "/x", "/x"):
        res = server.call(hostile(f"open({path!r}, 'w').write('x')"))
        assert res.status == "error" and res.error["type"] in (
            "OSError", "PermissionError", "FileNotFoundError"), (path, res)
    assert not target.exists()
    # /tmp is private, writable, and pristine again for the next request
    assert server.call({"code": "open('/tmp/f', 'w').write('x')\nresult = 1"}).ok
    assert server.call({"code": "import os\nresult = os.listdir('/tmp')"}).response == {
        "result": []}
    _assert_healthy(server, sentinel)


def test_reads_of_secrets_fail(server, sentinel, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("topsecret")
    for path in ("/etc/shadow", str(secret), str(REPO / "pyproject.toml"),
                 str(REPO / "tests" / "test_sandbox.py"), "/root/.bash_history",
                 os.path.expanduser("~/.ssh/id_rsa")):
        res = server.call(hostile(f"result = open({path!r}).read()"))
        assert res.status == "error" and res.error["type"] in (
            "FileNotFoundError", "PermissionError"), (path, res)
    res = server.call({"code": "import os\nresult = os.listdir('/root')"})
    assert res.response["result"] == [".pyenv"]  # only the path to the Python install


def test_environment_is_scrubbed(probe, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "topsecret")
    code = """
        import glob
        seen = dict(os.environ)
        blobs = []
        for name in glob.glob('/proc/[0-9]*/environ') + glob.glob('/proc/[0-9]*/cmdline'):
            try:
                blobs.append(open(name, 'rb').read().decode('utf-8', 'replace'))
            except OSError:
                pass
        result = {'env': seen, 'proc': blobs}
    """
    with ForkServer(RUN_CODE, HANDLERS, SMALL, env={"EXTRA": "1"}) as srv:
        res = srv.call(hostile(code))
    assert res.ok, res
    env = res.response["result"]["env"]
    assert "AWS_SECRET_ACCESS_KEY" not in env and env["EXTRA"] == "1"
    assert not any("topsecret" in b for b in res.response["result"]["proc"])
    assert set(env) <= {"PATH", "LANG", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE",
                        "PYTHONNOUSERSITE", "HOME", "TMPDIR", "PWD", "EXTRA"}
    # (pid 1, the launcher, is not dumpable: its environ cannot be read at all)
    r = run_command(["sh", "-c", "env; for f in /proc/[0-9]*/environ; do "
                                 "cat $f 2>/dev/null; done; true"])
    assert r.returncode == 0 and "topsecret" not in r.stdout


def test_no_network(server, sentinel):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        res = server.call(hostile(f"""
            import socket
            s = socket.create_connection(('127.0.0.1', {port}), timeout=2)
            result = 'connected'
        """))
        assert res.status == "error" and res.error["type"] == "ConnectionRefusedError", res
        res = server.call(hostile("""
            import socket
            s = socket.create_connection(('1.1.1.1', 53), timeout=2)
            result = 'connected'
        """))
        assert res.status == "error", res  # no route: the namespace has only "lo"
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever reached the host's loopback
    finally:
        listener.close()
    res = server.call({"code": "result = [line.split(':')[0].strip() for line in "
                               "open('/proc/net/dev').readlines()[2:]]"})
    assert res.response["result"] == ["lo"]
    _assert_healthy(server, sentinel)


# -- resource exhaustion ---------------------------------------------------------------------

def test_fork_bomb_is_contained(server, sentinel):
    # RLIMIT_NPROC bounds what a program may have alive at once (itself included)...
    res = server.call(hostile("""
        import time
        kids, failures = [], 0
        for _ in range(40):
            try:
                pid = os.fork()
            except OSError:
                failures += 1
                continue
            if pid == 0:
                time.sleep(0.5)
                os._exit(0)
            kids.append(pid)
        for pid in kids:
            os.waitpid(pid, 0)
        result = [len(kids), failures]
    """))
    assert res.ok, res
    assert res.response["result"] == [SMALL.max_processes - 1, 40 - SMALL.max_processes + 1]
    # ... so a real fork bomb stalls, then the wall clock kills all of it
    t0 = time.monotonic()
    bomb = ForkServer(RUN_CODE, HANDLERS, SMALL.replace(wall_seconds=2))
    with bomb:
        res = bomb.call(hostile("""
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
        """))
        assert res.status in ("timeout", "killed"), res
        _assert_healthy(bomb, sentinel)
    assert time.monotonic() - t0 < 15


def test_memory_bomb(server, sentinel):
    res = server.call(hostile("x = bytearray(4 << 30)"))
    assert res.status == "error" and res.error["type"] == "MemoryError", res
    res = server.call(hostile("""
        hog = []
        while True:
            hog.append(bytearray(16 << 20))
    """))
    assert res.status in ("error", "killed") and res.status != "ok", res
    # filling the private tmpfs /tmp ends at its size (or RLIMIT_FSIZE), not in host RAM
    small = ForkServer(RUN_CODE, HANDLERS, SMALL.replace(tmpfs_bytes=8 << 20))
    with small:
        res = small.call(hostile("""
            with open('/tmp/fill', 'wb') as f:
                while True:
                    f.write(b'x' * (1 << 20))
        """))
        assert res.status in ("error", "killed"), res
        _assert_healthy(small, sentinel)
    _assert_healthy(server, sentinel)


def test_infinite_loop_times_out(sentinel, probe):
    with ForkServer(RUN_CODE, HANDLERS, SMALL.replace(wall_seconds=1)) as srv:
        t0 = time.monotonic()
        res = srv.call(hostile("while True: pass"))
        assert res.status == "timeout" and time.monotonic() - t0 < 5, res
        res = srv.call(hostile("import time\nif os.fork() == 0:\n    os.setsid()\n"
                               "time.sleep(60)"))
        assert res.status == "timeout", res
        _assert_healthy(srv, sentinel)
    with ForkServer(RUN_CODE, HANDLERS, SMALL.replace(cpu_seconds=1, wall_seconds=10)) as srv:
        res = srv.call(hostile("while True: pass"))
        assert res.status == "killed" and res.signal in (signal.SIGXCPU, signal.SIGKILL), res


def test_killing_the_parent_and_kill_all(server, sentinel):
    # the server is the namespace's pid 1: a signal from inside cannot kill it
    res = server.call(hostile("os.kill(os.getppid(), 9)\nresult = os.getppid()"))
    assert res.ok and res.response["result"] == 1 and not res.server_restarted, res
    # a server that dies anyway (here: from the host) is replaced for the next request
    server._proc.kill()
    server._proc.wait()
    res = server.call({"code": "result = 1"})
    assert res.ok and res.server_restarted
    # kill(-1) INSIDE the sandbox: only its own pid namespace (GUARD checked it) is hit
    # (pid 1 and the caller are spared by kill(-1): here no one is left to signal)
    res = server.call(hostile("os.kill(-1, 9)\nimport time\ntime.sleep(5)"))
    assert res.status == "error" and res.error["type"] == "ProcessLookupError", res
    _assert_healthy(server, sentinel)
    r = run_command(["python3", "-c", GUARD + "import subprocess, time\n"
                     "p = subprocess.Popen(['sleep', '30'])\ntime.sleep(0.2)\n"
                     "os.kill(-1, 9)\nprint(p.wait())"], limits=SMALL)
    assert r.returncode == 0 and r.stdout == "-9\n", r  # (kill(-1) spares the caller)
    assert _alive(sentinel.pid) and _alive(os.getpid())


def test_left_behind_daemons_are_killed(server, sentinel):
    res = server.call(hostile("""
        import time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(60)
            os._exit(0)
        result = 'bye'
    """))
    assert res.ok, res
    _assert_healthy(server, sentinel)


def test_output_floods_are_capped(server, sentinel):
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    flood = ForkServer(RUN_CODE, HANDLERS, SMALL.replace(wall_seconds=30))
    with flood:
        res = flood.call(hostile("""
            block = b'x' * (1 << 20)
            for _ in range(2048):            # 2 GiB on stdout
                os.write(1, block)
            for _ in range(256):             # and some on stderr, with prints too
                print('y' * 4096, file=__import__('sys').stderr)
            result = 'done'
        """))
        assert res.ok, res
        assert res.stdout_truncated and len(res.stdout) == SMALL.output_bytes
        assert res.stderr_truncated and len(res.stderr) == SMALL.output_bytes
        # prints to the protocol's old fds cannot corrupt it
        res = flood.call({"code": "import sys\nprint('hello')\nsys.stdout.flush()\n"
                                  "result = 5"})
        assert res.ok and res.stdout == "hello\n" and res.response == {"result": 5}
        if os.geteuid() == 0:  # the host's pipes (owned by root) cannot be reopened
            res = flood.call(hostile("""
                try:   # pid 1 is the server: not dumpable, its fds not even listed
                    fds = os.listdir('/proc/1/fd')
                except PermissionError:
                    fds = []
                for fd in fds:
                    try:
                        os.open(f'/proc/1/fd/{fd}', os.O_WRONLY)
                    except OSError:
                        continue
                    raise SystemExit(f'reopened bwrap fd {fd}')
                result = 'none'
            """))
            assert res.ok and res.response == {"result": "none"}, res
        res = flood.call({"code": f"result = 'z' * {SMALL.response_bytes + 10}"})
        assert res.status == "too_large", res
        _assert_healthy(flood, sentinel)
    r = run_command(["python3", "-c", "import os\nb = b'x' * (1 << 20)\n"
                                      "for _ in range(1024): os.write(1, b)"],
                    limits=SMALL.replace(wall_seconds=30))
    assert r.returncode == 0 and r.stdout_truncated and len(r.stdout) == SMALL.output_bytes
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 200 * 1024  # KiB


# -- run_command -----------------------------------------------------------------------------

def test_run_command_can_keep_only_the_tail_of_stderr():
    """A caller that reads only stderr's tail keeps no more: the whole stderr (up to
    output_bytes, e.g. 1 GiB for a repository's suite) was held, decoded, for its last 2000
    characters."""
    r = run_command(["sh", "-c", "head -c 300000 /dev/zero | tr '\\0' x >&2; echo END >&2;"
                                 "echo out"], limits=SMALL, stderr_tail_bytes=1000)
    assert r.returncode == 0 and r.stdout == "out\n" and not r.stdout_truncated
    assert r.stderr_truncated and len(r.stderr_bytes) == 1000
    assert r.stderr == "x" * 996 + "END\n"
    r = run_command(["sh", "-c", "echo short >&2"], limits=SMALL, stderr_tail_bytes=1000)
    assert r.stderr == "short\n" and not r.stderr_truncated
    with pytest.raises(ValueError):
        run_command(["true"], limits=SMALL, stderr_tail_bytes=0)


def test_tail_capture_keeps_the_last_bytes_in_bounded_memory():
    from codeworld.sandbox.command import _TailCapture
    cap, fed = _TailCapture(100), b""
    for i in range(2000):
        chunk = bytes([65 + i % 26]) * (i % 150)
        cap.feed(chunk)
        fed += chunk
        assert len(cap.data) <= 200
    assert cap.total == len(fed) and bytes(cap.result()) == fed[-100:]


def test_run_command_basics(probe, tmp_path):
    r = run_command(["python3", "-c", "import os, sys; print(os.getcwd(), os.getuid());"
                                      "sys.exit(3)"], limits=SMALL)
    assert isinstance(r, CommandResult) and r.returncode == 3 and r.stdout.split()[0] == "/tmp"
    assert r.stdout.split()[1] != "0" and not r.timed_out and r.killed_by_signal is None
    r = run_command(["sh", "-c", "kill -TERM $$"], limits=SMALL)
    assert r.returncode == -signal.SIGTERM and r.killed_by_signal == signal.SIGTERM
    r = run_command(["sh", "-c", "sleep 30 & sleep 30"], limits=SMALL.replace(wall_seconds=1))
    assert r.timed_out and r.killed_by_signal == signal.SIGKILL and r.wall_seconds < 5
    r = run_command(["sh", "-c", "sleep 60 & echo started"], limits=SMALL)  # leftovers die
    assert r.returncode == 0 and r.stdout == "started\n" and r.wall_seconds < 4
    r = run_command(["/nonexistent-program"], limits=SMALL)
    assert r.returncode == 127 and "cannot execute" in r.stderr
    r = run_command(["sh", "-c", "echo $FOO"], env={"FOO": "bar"}, limits=SMALL)
    assert r.stdout == "bar\n"


def test_run_command_workdir(probe, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "data.txt").write_text("hello")
    r = run_command(["sh", "-c", "pwd; cat data.txt; echo x > new.txt"], workdir=repo,
                    limits=SMALL)
    assert r.stdout.startswith("/work\nhello") and r.returncode != 0
    assert not (repo / "new.txt").exists()
    r = run_command(["sh", "-c", "echo x > new.txt && ls /"], workdir=repo,
                    writable_workdir=True, limits=SMALL)
    assert r.returncode == 0 and (repo / "new.txt").read_text() == "x\n"
    assert "main" not in r.stdout.split()
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "f").write_text("ro")
    r = run_command(["sh", "-c", "cat /opt/extra/f; echo y > /opt/extra/g"],
                    extra_ro_binds=[(extra, "/opt/extra")], limits=SMALL)
    assert r.stdout == "ro" and r.returncode != 0 and not (extra / "g").exists()


def test_working_copy_quota_holds_within_one_command(probe, tmp_path):
    """A writable working copy with a quota: the command writes to a tmpfs copy (ENOSPC past
    the quota, the host's disk gets nothing more), then the copy replaces the host's folder."""
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "m.py").write_text("x = 1\n")
    (repo / "gone.txt").write_text("bye")
    (repo / "rel").symlink_to("pkg/m.py")
    quota = 2 << 20
    fill = GUARD + (
        "import os\n"
        "open('new.txt', 'w').write('hi')\n"
        "os.remove('gone.txt')\n"
        "os.symlink('/etc/passwd', 'abs')\n"        # a link out of the copy: not kept
        "os.mkdir('locked'); open('locked/f', 'w').write('in')\n"
        "os.chmod('new.txt', 0); os.chmod('locked', 0)\n"
        "n = 0\n"
        "try:\n"
        "    while True:\n"                          # many files: the quota, not one file's size
        "        open(f'blob{n}', 'wb').write(b'x' * 100000); n += 1\n"
        "except OSError as e:\n"
        "    print('stopped', e.errno, n)\n")
    r = run_command(["python3", "-c", fill], workdir=repo, writable_workdir=True,
                    workdir_quota_bytes=quota, limits=SMALL)
    assert r.returncode == 0 and r.workdir_error is None, (r.stdout, r.stderr)
    assert r.stdout.startswith("stopped 28 ") and r.workdir_free_bytes < 64 << 10   # ENOSPC
    files = {p.relative_to(repo).as_posix() for p in repo.rglob("*")}
    assert {"new.txt", "pkg/m.py", "rel", "locked/f"} <= files and "gone.txt" not in files
    assert "abs" not in files and (repo / "rel").is_symlink()
    assert (repo / "new.txt").read_text() == "hi" and (repo / "locked" / "f").read_text() == "in"
    assert sum(p.stat().st_size for p in repo.rglob("*") if p.is_file()) <= quota
    assert sorted(os.listdir(tmp_path)) == ["repo"]   # nothing of the exchange left beside it
    # the next command sees the copy as it was left (the owner's rights restored)
    r = run_command(["sh", "-c", "cat new.txt locked/f; rm blob*; ls; echo x > y; kill -9 $$"],
                    workdir=repo, writable_workdir=True, workdir_quota_bytes=quota, limits=SMALL)
    assert r.stdout == "hiin" + "".join(f"{n}\n" for n in ("locked", "new.txt", "pkg", "rel"))
    assert r.returncode == -signal.SIGKILL
    assert (repo / "y").read_text() == "x\n"   # a command killed by a signal keeps its writes
    # over its wall time: killed, what it wrote before kept, its leftovers killed too
    r = run_command(["sh", "-c", "echo late > late.txt; sleep 60 & sleep 60"], workdir=repo,
                    writable_workdir=True, workdir_quota_bytes=quota,
                    limits=SMALL.replace(wall_seconds=1))
    assert r.timed_out and r.killed_by_signal == signal.SIGKILL and r.wall_seconds < 10
    assert (repo / "late.txt").read_text() == "late\n"


def test_a_copy_the_host_stopped_waiting_for_is_reported(probe, tmp_path, monkeypatch):
    """The host waits COPY_GRACE_SECONDS past the command's wall time for the copy, then kills
    the sandbox: what the command wrote is lost, and the caller is told so (it was told only
    that the command timed out). Measured with the real grace (20 s): a command that left
    200,000 empty files (wall 30 s) kept its launcher's tar busy past it, and its other file
    was dropped without a word. Here the grace is 0 s, so the host's clock runs out first."""
    from codeworld.sandbox import quota

    monkeypatch.setattr(quota, "COPY_GRACE_SECONDS", 0.0)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "kept.txt").write_text("before")
    r = run_command(["sh", "-c", "echo after > kept.txt; echo new > new.txt; sleep 30"],
                    workdir=repo, writable_workdir=True, workdir_quota_bytes=1 << 20,
                    limits=SMALL.replace(wall_seconds=1))
    assert r.timed_out and r.returncode == -signal.SIGKILL, r
    assert r.workdir_error and "before its working copy came back" in r.workdir_error, r
    assert (repo / "kept.txt").read_text() == "before" and not (repo / "new.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["repo"]


def test_a_command_cannot_forge_the_copy_it_sends_back(probe, tmp_path):
    """Only the launcher holds the pipe the copy goes back through: a command that tries every
    descriptor it can reach (its own, its launcher's, pid 1's, through /proc) writes nowhere,
    and cannot kill its launcher."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "kept.txt").write_text("before")
    forge = ("for f in /proc/self/fd/* /proc/$PPID/fd/* /proc/1/fd/*; do "
             "printf '\\0\\0\\0\\0\\0\\0\\0\\0{}\\n' > $f 2>/dev/null && echo wrote $f; done; ")
    r = run_command(["sh", "-c", forge + "echo after > kept.txt"], workdir=repo,
                    writable_workdir=True, workdir_quota_bytes=1 << 20, limits=SMALL)
    assert r.returncode == 0 and r.workdir_error is None, r
    wrote = [w for w in r.stdout.split() if w.startswith("/proc/")]
    assert wrote and all(w.rsplit("/", 1)[1] in "012" for w in wrote), wrote   # stdin/out/err only
    assert (repo / "kept.txt").read_text() == "after\n"
    # its launcher is pid 1: killing it from inside does nothing; at the deadline the command
    # is killed and its copy comes back as it left it
    r = run_command(["sh", "-c", forge + "echo later > kept.txt; kill -9 $PPID; echo $PPID; "
                     "sleep 30"], workdir=repo, writable_workdir=True,
                    workdir_quota_bytes=1 << 20, limits=SMALL.replace(wall_seconds=2))
    assert r.timed_out and r.workdir_error is None and r.stdout.endswith("\n1\n"), r
    assert (repo / "kept.txt").read_text() == "later\n"
    assert sorted(os.listdir(tmp_path)) == ["repo"]


def test_frame_sink_reads_the_launchers_stream_in_any_chunks(tmp_path):
    from codeworld.sandbox.quota import CopyRefused, FrameSink

    def frames(*parts, status=b'{"exit_code": 0, "timed_out": false, "free_bytes": 5}\n'):
        return b"".join(len(p).to_bytes(8, "big") + p for p in parts) + bytes(8) + status

    stream = frames(b"tar-", b"bytes", status=b'{"error": "' + b"x" * 20000 + b'"}\n')
    for size in (1, 3, 7, len(stream)):   # a long status (an error naming long paths) too
        sink = FrameSink(str(tmp_path / f"t{size}"), cap=100)
        for i in range(0, len(stream), size):
            sink.feed(stream[i:i + size])
        assert sink.complete and sink.result()["error"] == "x" * 20000
        assert (tmp_path / f"t{size}").read_bytes() == b"tar-bytes"
    cut = FrameSink(str(tmp_path / "cut"), cap=100)
    cut.feed(frames(b"tar-")[:10])                  # the sandbox ended mid-tar
    with pytest.raises(CopyRefused, match="ended before sending"):
        cut.result()
    big = FrameSink(str(tmp_path / "big"), cap=4)
    big.feed(frames(b"tar-", b"more"))
    with pytest.raises(CopyRefused, match="over 4 bytes"):
        big.result()
    assert (tmp_path / "big").read_bytes() == b"tar-"   # nothing past the cap reached the disk
    nan = FrameSink(str(tmp_path / "nan"), cap=100)
    nan.feed(frames(status=b'{"exit_code": NaN}\n'))
    with pytest.raises(CopyRefused, match="NaN"):
        nan.result()


def test_unpack_takes_only_what_stays_inside_the_copy(tmp_path):
    """The host's unpacking of the tar the sandbox sends (its content is the command's)."""
    import io
    import tarfile

    from codeworld.sandbox.quota import CopyRefused, unpack

    def tar_of(*members):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for info, data in members:
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        path = tmp_path / f"t{len(list(tmp_path.iterdir()))}.tar"
        path.write_bytes(buf.getvalue())
        return path

    def entry(name, kind=tarfile.REGTYPE, data=b"", link="", mode=0o644):
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode, info.size = kind, link, mode, len(data)
        return info, data if kind == tarfile.REGTYPE else None

    outside = tmp_path / "outside"
    outside.mkdir()
    ok = tar_of(entry(".", tarfile.DIRTYPE, mode=0o755), entry("d", tarfile.DIRTYPE, mode=0o500),
                entry("d/f.py", data=b"x = 1\n", mode=0o000),
                entry("d/up", tarfile.SYMTYPE, link="../d/f.py"),
                entry("abs", tarfile.SYMTYPE, link="/etc/passwd"),           # left out
                entry("esc", tarfile.SYMTYPE, link="../outside"),            # left out
                entry("hard", tarfile.LNKTYPE, link="d/f.py"),               # kept, a copy
                entry("dot", tarfile.SYMTYPE, link="."),
                # reads as inside, leads out: the kernel climbs from where dot/dot leads
                entry("d/trick", tarfile.SYMTYPE, link="../dot/dot/../../outside"),  # left out
                entry("fifo", tarfile.FIFOTYPE))                             # left out
    dest = tmp_path / "dest"
    dest.mkdir()
    unpack(str(ok), str(dest), 1 << 20)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == [
        "d", "d/f.py", "d/up", "dot", "hard"]
    assert (dest / "hard").read_text() == "x = 1\n" and not (dest / "hard").is_symlink()
    assert (dest / "d" / "up").read_text() == "x = 1\n" and os.access(dest / "d" / "f.py", os.R_OK)
    assert os.stat(dest / "d").st_mode & 0o700 == 0o700
    bad = [tar_of(entry("../x", data=b"no")),                                # a name leaving it
           tar_of(entry("/abs", data=b"no")),
           tar_of(entry("l", tarfile.SYMTYPE, link="../outside"), entry("l/x", data=b"no")),
           tar_of(entry("d", tarfile.SYMTYPE, link="."), entry("d/x", data=b"no")),  # through a link
           tar_of(entry("f", data=b"1"), entry("f", data=b"2")),           # nothing overwritten
           tar_of(entry("/".join(["a"] * 300), data=b"deep")),
           tar_of(*[entry(f"f{i}") for i in range(300)])]                   # 4 KiB each: budget
    for i, path in enumerate(bad):
        dest = tmp_path / f"bad{i}"
        dest.mkdir()
        with pytest.raises((CopyRefused, OSError)):
            unpack(str(path), str(dest), 1 << 20)
    assert list(outside.iterdir()) == [] and not (tmp_path / "x").exists()


def test_run_command_pytest_in_repo_copy(probe, tmp_path):
    """The agent stage's use: ``python -m pytest`` in a writable copy bound at /work."""
    import pytest as _pytest

    site = Path(_pytest.__file__).resolve().parents[1]
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    (repo / "mod.py").write_text("def add(a, b):\n    return a + b\n")
    (repo / "tests" / "test_mod.py").write_text(
        "from mod import add\n\ndef test_ok():\n    assert add(1, 2) == 3\n\n"
        "def test_bad():\n    assert add(1, 2) == 4\n")
    r = run_command(["python3", "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                    workdir=repo, writable_workdir=True,
                    extra_ro_binds=[(site, "/opt/site-packages")],
                    env={"PYTHONPATH": "/work:/opt/site-packages"},
                    limits=SMALL.replace(wall_seconds=60))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "1 failed, 1 passed" in r.stdout


# -- unavailable sandbox, errors, map_requests ----------------------------------------------

def test_sandbox_unavailable(tmp_path, monkeypatch):
    for bw in (str(tmp_path / "no-bwrap"),):
        with pytest.raises(SandboxUnavailable, match="apt-get install -y bubblewrap"):
            run_command(["true"], bwrap=bw)
        with pytest.raises(SandboxUnavailable, match="apt-get install -y bubblewrap"):
            ForkServer(RUN_CODE, HANDLERS, bwrap=bw).start()
        with pytest.raises(SandboxUnavailable, match="apt-get install -y bubblewrap"):
            map_requests([{"code": "result = 1"}], RUN_CODE, code_dirs=HANDLERS, bwrap=bw)
    broken = tmp_path / "bwrap"  # present but cannot create a sandbox
    broken.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\n"
                      "exit 1\n")
    broken.chmod(0o755)
    with pytest.raises(SandboxUnavailable, match="No permissions"):
        run_command(["true"], bwrap=broken)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CODEWORLD_BWRAP", raising=False)
    with pytest.raises(SandboxUnavailable, match="not found"):
        ForkServer(RUN_CODE, HANDLERS).start()


def test_call_batch(server, sentinel):
    res = server.call_batch([{"code": "print('a')\nresult = 1"},
                             {"code": "raise ValueError('x')"},
                             {"code": "import random\nresult = random.random()"},
                             {"code": "import random\nresult = random.random()"}])
    assert [r.status for r in res] == ["ok", "error", "ok", "ok"]
    assert res[0].response == {"result": 1} and res[1].error["type"] == "ValueError"
    assert res[2].response == res[3].response  # reseeded before each request
    assert res[0].stdout == "a\n"
    res = server.call_batch([{"code": "result = 1"}, hostile("os._exit(3)")])
    assert [r.status for r in res] == ["ok", "error"]  # re-run alone after the bad batch
    assert res[1].error["type"] == "NoResponse"
    _assert_healthy(server, sentinel)


def test_handler_errors(server, probe):
    res = server.call({"code": "raise ValueError('boom')"})
    assert res.status == "error" and res.error["type"] == "ValueError"
    assert "boom" in res.error["message"] and "ValueError" in res.error["traceback"]
    res = server.call({"code": "import sys\nsys.exit(0)"})
    assert res.status == "error" and res.error["type"] == "SystemExit"
    res = server.call({"code": "import os\nos._exit(0)"})
    assert res.status == "error" and res.error["type"] == "NoResponse"
    with pytest.raises(SandboxError, match="could not load"):
        ForkServer("sandbox_handlers:missing", HANDLERS, SMALL).start()


def test_map_requests_order_and_determinism(probe):
    reqs = [{"code": f"import random, time\ntime.sleep({(i * 7) % 5} / 200)\n"
                     f"result = [{i}, random.random(), hash('abc')]"} for i in range(30)]
    first = map_requests(reqs, RUN_CODE, workers=2, code_dirs=HANDLERS, limits=SMALL)
    again = map_requests(reqs, RUN_CODE, workers=3, code_dirs=HANDLERS, limits=SMALL)
    assert [r.response["result"][0] for r in first] == list(range(30))
    assert [r.response for r in first] == [r.response for r in again]
    mixed = map_requests([{"code": "result = 1"}, hostile("os.kill(os.getpid(), 9)"),
                          {"code": "result = 3"}, {"code": "while True: pass"},
                          {"code": "result = 5"}], RUN_CODE, workers=2, code_dirs=HANDLERS,
                         limits=SMALL.replace(wall_seconds=1))
    assert [r.status for r in mixed] == ["ok", "killed", "ok", "timeout", "ok"]
    # batches: one fork per batch, same results; a failing batch is re-run item by item
    batched = map_requests(reqs, RUN_CODE, workers=2, batch_size=7, code_dirs=HANDLERS,
                           limits=SMALL)
    assert [r.response for r in batched] == [r.response for r in first]
    mixed_b = map_requests([{"code": "result = 1"}, hostile("os.kill(os.getpid(), 9)"),
                            {"code": "result = 3"}, {"code": "while True: pass"},
                            {"code": "result = 5"}, {"code": "raise KeyError(6)"}],
                           RUN_CODE, workers=2, batch_size=3, code_dirs=HANDLERS,
                           limits=SMALL.replace(wall_seconds=1))
    assert [r.status for r in mixed_b] == ["ok", "killed", "ok", "timeout", "ok", "error"]
    assert [r.response for r in mixed_b[::2]] == [{"result": 1}, {"result": 3},
                                                  {"result": 5}]
    assert map_requests([], RUN_CODE, code_dirs=HANDLERS) == []
    res = map_requests([{"xs": [1, 2, 3], "id": 7}], "sandbox_handlers:total",
                       code_dirs=HANDLERS)
    assert res[0].response == {"sum": 6, "id": 7}


def test_batch_deadline_is_per_request_and_the_batch_goes_on(probe):
    # each request may use the whole wall budget; only the one that overruns times out
    fast = [{"code": f"result = {i} * 2"} for i in range(3)]
    slow_ok = {"code": "import time\ntime.sleep(0.6)\nresult = 'slow'"}
    loop = {"code": "while True: pass"}
    with ForkServer(RUN_CODE, HANDLERS, SMALL.replace(wall_seconds=1, cpu_seconds=1)) as srv:
        t0 = time.monotonic()
        res = srv.call_batch([fast[0], slow_ok, slow_ok, loop, fast[1], {"code": "1/0"}, fast[2]])
        took = time.monotonic() - t0
    assert [r.status for r in res] == ["ok", "ok", "ok", "timeout", "ok", "error", "ok"]
    assert [r.response["result"] for r in res if r.ok] == [0, "slow", "slow", 2, 4]
    assert res[5].error["type"] == "ZeroDivisionError"
    assert took < 4.5, took  # one timeout (1 s), the sleeps (1.2 s), no rerun of the batch


def test_the_hosts_deadline_for_a_batch_grows_with_it(probe, monkeypatch):
    """The server gives each request of a batch the wall budget; the host gave the whole batch
    one (wall + slack): 24 programs of 0.5 s (wall 1 s) were killed at 11 s and all run again
    alone. Here the slack is cut to 0.5 s, so that 4 programs of 0.45 s overran it."""
    monkeypatch.setattr(fs, "ANSWER_SLACK", 0.5)
    nap = {"code": "import time\ntime.sleep(0.45)\nresult = 'nap'"}
    with ForkServer(RUN_CODE, HANDLERS, SMALL.replace(wall_seconds=1, cpu_seconds=1)) as srv:
        exchanges = []
        exchange = srv._exchange
        srv._exchange = lambda *a: exchanges.append(a[1:]) or exchange(*a)
        res = srv.call_batch([nap] * 4)
        restarts = srv.restarts
    assert [(r.status, r.response) for r in res] == [("ok", {"result": "nap"})] * 4
    assert exchanges == [(4,)] and restarts == 0 and not any(r.server_restarted for r in res)
    assert fs._answer_within(1, 1) == 1 + fs.ANSWER_SLACK
    assert fs._answer_within(1, 24) == 25 + fs.ANSWER_SLACK


def test_a_batch_that_never_ends_is_still_cut_by_the_host(probe, monkeypatch):
    """A shared batch's program that writes a line break to the response pipe every 0.4 s
    makes the server reset its deadline for ever: the host's (a wall budget per request, one
    more, the slack) still ends it, and each request runs again alone."""
    monkeypatch.setattr(fs, "ANSWER_SLACK", 0.5)
    forever = {"code": textwrap.dedent("""\
        import os, stat, time
        while True:
            for fd in range(3, 64):
                try:
                    if stat.S_ISFIFO(os.fstat(fd).st_mode):
                        os.write(fd, b"\\n")
                except OSError:
                    pass
            time.sleep(0.4)
        """)}
    with ForkServer(RUN_CODE, HANDLERS, SMALL.replace(wall_seconds=1, cpu_seconds=1),
                    share_batch=True) as srv:
        t0 = time.monotonic()
        res = srv.call_batch([{"code": "result = 1"}, forever])
        took = time.monotonic() - t0
    assert [r.status for r in res] == ["ok", "timeout"] and res[0].response == {"result": 1}
    assert took < 15, took   # the batch cut at 3 * 1 + 0.5 s, then 1 s alone


def test_batch_over_the_response_cap_keeps_what_fits_and_goes_on(probe):
    # Each response is a third of the cap: a batch fills the cap after 3 requests. The lines
    # that fit are kept and the batch goes on after them (it used to start over from the
    # top, one request further each time, and to recurse once per restart).
    cap = 64 << 10
    third = {"code": f"result = 'y' * {cap // 3 - 64}"}
    over = {"code": f"result = 'z' * {cap + 10}"}
    reqs = [dict(third, id=i) for i in range(40)] + [over, {"code": "result = 'last'"}]
    with ForkServer(RUN_CODE, HANDLERS, SMALL.replace(response_bytes=cap)) as srv:
        exchanges = []
        exchange = srv._exchange
        srv._exchange = lambda *a: exchanges.append(1) or exchange(*a)
        res = srv.call_batch(reqs)
    assert [r.status for r in res] == ["ok"] * 40 + ["too_large", "ok"]
    assert all(len(r.response["result"]) == cap // 3 - 64 for r in res[:40])
    assert res[-1].response == {"result": "last"}
    # per round: one batch (3 fit) + the overflowing request alone = 4 results in 2 forks
    assert len(exchanges) <= 24, len(exchanges)


def test_a_programs_stack_holds_no_frame_of_the_server(probe, monkeypatch):
    """A request's child unwinds to the fixed boot code before the handler runs: a program
    that prints its stack sees the boot's line, never server.py's line numbers (which change
    with every edit of server.py and would change traced data)."""
    code = ("import traceback\n"
            "result = [[f.filename, f.lineno, f.name] for f in traceback.extract_stack()]")
    with ForkServer(RUN_CODE, HANDLERS, SMALL) as server:
        res = server.call({"code": code})
        batch = server.call_batch([{"code": code}] * 2)
    assert res.ok, res
    stack = res.response["result"]
    boot_line = fs.BOOT.splitlines()[stack[0][1] - 1].strip()
    assert stack[0][::2] == ["<string>", "<module>"] and boot_line == "value = handler(request)"
    assert [f[0] for f in stack[1:]] == ["/sandbox/lib/sandbox_handlers.py", "<string>"]
    assert [r.response for r in batch] == [res.response] * 2
    # the same stack from a server whose source moved every line
    monkeypatch.setattr(fs, "_SERVER_SOURCE", "\n" * 40 + fs._SERVER_SOURCE)
    with ForkServer(RUN_CODE, HANDLERS, SMALL) as server:
        assert server.call({"code": code}).response == res.response
        # an error's traceback starts at the program too
        err = server.call({"code": "def f():\n    raise KeyError('k')\nf()"})
    assert err.error["type"] == "KeyError" and "server" not in err.error["traceback"]
    assert err.error["traceback"].startswith("Traceback (most recent call last):\n  File "
                                             '"/sandbox/lib/sandbox_handlers.py"'), err.error


def test_server_starts_without_site_yet_gives_programs_what_site_gives(probe):
    # The server runs `python -S` (slow .pth files cost every start); programs still get the
    # base interpreter's site-packages on sys.path and site's builtins (exit, quit, help).
    import sysconfig
    purelib = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})["purelib"]
    with ForkServer(RUN_CODE, HANDLERS, SMALL) as srv:
        res = srv.call({"code": "import sys\nresult = [sys.flags.no_site, sys.path, "
                                "[callable(f) for f in (exit, quit, help)]]"})
    no_site, path, builtins_ok = res.response["result"]
    assert no_site == 1 and builtins_ok == [True, True, True]
    assert purelib in path, path
