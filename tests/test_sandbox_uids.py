"""Each live sandbox runs as a kernel uid of its own (codeworld.sandbox.uids), so the kernel's
per-uid quotas are not shared between concurrent sandboxes, while programs still see uid
65534. Only as root: otherwise every sandbox runs as ourselves and there is nothing to lease.

The hostile program runs after test_sandbox.py's ``probe`` fixture checked the sandbox, behind
its ``GUARD``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from codeworld.sandbox import ForkServer, SandboxError, SandboxUnavailable, run_command, uids
from codeworld.sandbox.bwrap import INSIDE_UID
from tests.test_sandbox import HANDLERS, RUN_CODE, SMALL, _server_subtree, hostile, \
    probe, sentinel  # noqa: F401

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="uids are leased only as root")


@pytest.fixture
def tiny_range(tmp_path, monkeypatch):
    """Two uids and a lock folder of the test's own."""
    monkeypatch.setenv(uids.ENV_RANGE, "5000-5001")
    monkeypatch.setenv(uids.ENV_DIR, str(tmp_path / "locks"))
    return tmp_path / "locks"


def test_leases_are_exclusive_reused_and_bounded(tiny_range):
    a, b = uids.lease(), uids.lease()
    assert (a.uid, b.uid) == (5000, 5001)
    with pytest.raises(SandboxUnavailable, match=f"all 2 sandbox uids.*{uids.ENV_RANGE}"):
        uids.lease(wait_seconds=0.2)
    a.release()
    with uids.lease() as c:
        assert c.uid == 5000
    b.release()
    # a waiting lease takes the first uid freed meanwhile
    held = [uids.lease(), uids.lease()]
    threading.Timer(0.3, held[1].release).start()
    t0 = time.monotonic()
    with uids.lease(wait_seconds=10) as d:
        assert d.uid == 5001 and 0.25 < time.monotonic() - t0 < 5
    held[0].release()


def test_a_lease_is_held_across_processes_and_ends_with_its_process(tiny_range):
    holder = subprocess.Popen(
        [sys.executable, "-c", "from codeworld.sandbox import uids; held = uids.lease(); "
                               "print(held.uid, flush=True); input()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ),
        cwd=Path(__file__).resolve().parents[1])
    assert holder.stdout.readline().split() == ["5000"]
    with uids.lease() as mine:
        assert mine.uid == 5001
    holder.kill()   # not released: killed
    holder.wait()
    with uids.lease() as mine:
        assert mine.uid == 5000


def test_bad_ranges_and_lock_folders_are_refused(tiny_range, monkeypatch, tmp_path):
    for bad in ("0-10", "10-5", "abc", "5-x", "1-4294967295"):
        monkeypatch.setenv(uids.ENV_RANGE, bad)
        with pytest.raises(SandboxError, match=uids.ENV_RANGE):
            uids.uid_range()
    monkeypatch.setenv(uids.ENV_RANGE, "7000")
    assert uids.uid_range() == (7000, 7000)
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    loose.chmod(0o777)
    monkeypatch.setenv(uids.ENV_DIR, str(loose))
    with pytest.raises(SandboxUnavailable, match="only we can write"):
        uids.lease()
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(uids.ENV_DIR, str(tmp_path / "file"))
    with pytest.raises(SandboxUnavailable, match=uids.ENV_DIR):
        uids.lease()


def test_a_writable_workdir_follows_the_uid_its_sandbox_leased(probe, tmp_path):
    """With the lowest uid held, the command draws another: the tree is chowned to it, the
    program sees 65534 and its files, and what it writes belongs to its uid on the host."""
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "old.txt").write_text("old")
    code = ("import os; open('new.txt', 'w').write('new'); "
            "print(os.getuid(), os.getgid(), os.stat('old.txt').st_uid, open('old.txt').read())")
    with uids.lease() as first:
        r = run_command(["python3", "-c", code], workdir=wd, writable_workdir=True,
                        limits=SMALL)
        second = (wd / "new.txt").stat().st_uid
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(INSIDE_UID)] * 3 + ["old"]
    assert second != first.uid and second != INSIDE_UID
    assert (wd / "old.txt").stat().st_uid == second == (wd / "new.txt").stat().st_gid


HOG = """
    import ctypes, fcntl, os, time
    libc = ctypes.CDLL(None, use_errno=True)
    pipes, pipe_error = [], None
    try:   # the pipe-buffer pages this uid may hold (fs.pipe-user-pages-soft), all of them
        while len(pipes) < MAX_PIPES:
            pipes.append(os.pipe())
            fcntl.fcntl(pipes[-1][1], 1031, 1 << 20)   # F_SETPIPE_SZ
    except OSError as e:
        pipe_error = e.errno
    notes = []   # every inotify instance this uid may have (fs.inotify.max_user_instances)
    while (fd := libc.inotify_init1(0)) >= 0:
        notes.append(fd)
    inotify_error = ctypes.get_errno()
    while not os.path.exists('/signal/done'):   # held until the host has looked
        time.sleep(0.01)
    result = [pipe_error, len(notes), inotify_error]
"""
VICTIM = """
    import ctypes, fcntl, os
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(0)
    r, w = os.pipe()
    try:
        pipe = fcntl.fcntl(w, 1031, 1 << 20)
    except OSError as e:
        pipe = -e.errno
    result = [os.getuid(), fd >= 0, ctypes.get_errno() if fd < 0 else 0, pipe]
"""


def _inotify_fds(server) -> int:
    n = 0
    for pid in _server_subtree(server):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify"
        except OSError:
            pass
    return n


def test_one_sandbox_cannot_use_up_the_kernels_per_uid_quotas_of_another(probe, tmp_path):
    """A program holding every inotify instance and every pipe-buffer page a uid may have
    leaves other sandboxes (fork server and one-shot command) theirs. All sandboxes ran as
    uid 65534 before: the others got EMFILE and EPERM."""
    limit = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    soft_pages = int(Path("/proc/sys/fs/pipe-user-pages-soft").read_text())
    max_pipes = soft_pages // 256 + 1 if soft_pages else 0   # 0: no limit to use up
    signal_dir = tmp_path / "signal"
    signal_dir.mkdir()
    lim = SMALL.replace(wall_seconds=60, cpu_seconds=60, open_files=2 * max_pipes + limit + 64)
    hog_code = hostile(HOG.replace("MAX_PIPES", str(max_pipes)))
    hog_result = {}
    with ForkServer(RUN_CODE, HANDLERS, lim, extra_ro_binds=[(signal_dir, "/signal")]) as hog, \
            ForkServer(RUN_CODE, HANDLERS, SMALL) as victim:
        thread = threading.Thread(target=lambda: hog_result.update(r=hog.call(hog_code)))
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while _inotify_fds(hog) < limit and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _inotify_fds(hog) == limit, "the hog never held the whole inotify quota"
            served = victim.call(hostile(VICTIM))
            once = run_command(["python3", "-c", hostile(VICTIM)["code"]
                                + "print(result)"], limits=SMALL)
        finally:
            (signal_dir / "done").write_text("")
            thread.join(60)
    got = hog_result["r"]
    assert got.ok, got
    # EPERM past the pipe pages, EMFILE at the inotify quota
    assert got.response["result"] == [1 if max_pipes else None, limit, 24]
    assert served.ok, served
    assert served.response["result"] == [INSIDE_UID, True, 0, 1 << 20]
    assert once.returncode == 0, once.stderr
    assert once.stdout.strip() == str([INSIDE_UID, True, 0, 1 << 20])


def test_a_uid_is_freed_only_once_no_process_runs_as_it(tiny_range):
    """A sandbox without a memory cgroup is reaped before the last processes of its pid
    namespace have died: its lease waits for them (SETTLE_SECONDS at most)."""
    held = uids.lease()
    straggler = subprocess.Popen(["setpriv", f"--reuid={held.uid}", f"--regid={held.uid}",
                                  "--clear-groups", "sleep", "0.5"])
    try:
        _until_running_as(held.uid)
        t0 = time.monotonic()
        held.release(wait_seconds=10)
        assert time.monotonic() - t0 > 0.2 and not uids._running_as(5000)
    finally:
        straggler.wait()
    with uids.lease() as again:   # free again; and the wait is bounded
        assert again.uid == 5000
        stuck = subprocess.Popen(["setpriv", "--reuid=5000", "sleep", "30"])
        try:
            _until_running_as(5000)
            t0 = time.monotonic()
            again.release(wait_seconds=0.3)
            assert 0.25 < time.monotonic() - t0 < 5
        finally:
            stuck.kill()
            stuck.wait()


def test_where_the_range_is_not_mapped_every_sandbox_shares_65534(probe, tmp_path,
                                                                   monkeypatch, caplog):
    """Root in a container with a user namespace of its own often has only uids 0-65535: the
    default range is not there, so sandboxes run as 65534 as before leases (warned); a range
    set but not mapped is refused."""
    fake = tmp_path / "uid_map"
    fake.write_text("         0          0      65536\n")
    monkeypatch.setattr(uids, "MAP_FILES", (str(fake), str(fake)))
    monkeypatch.setattr(uids, "_warned", [])
    monkeypatch.setenv(uids.ENV_DIR, str(tmp_path / "locks"))
    a, b = uids.lease(), uids.lease()
    assert a.uid == b.uid == uids.SHARED_UID
    assert "does not exist in this user namespace" in caplog.text
    a.release(), b.release()
    wd = tmp_path / "wd"
    wd.mkdir()
    r = run_command(["python3", "-c", "open('f', 'w').write('x')"], workdir=wd,
                    writable_workdir=True, limits=SMALL)
    assert r.returncode == 0, r.stderr
    assert (wd / "f").stat().st_uid == uids.SHARED_UID
    monkeypatch.setenv(uids.ENV_RANGE, "100000-100009")
    with pytest.raises(SandboxUnavailable, match=f"{uids.ENV_RANGE}=100000-100009: not all"):
        uids.lease()
    monkeypatch.setenv(uids.ENV_RANGE, "1000-1009")
    with uids.lease() as mine:
        assert mine.uid == 1000


def _until_running_as(uid: int) -> None:
    deadline = time.monotonic() + 10
    while not uids._running_as(uid):
        assert time.monotonic() < deadline, f"no process came to run as {uid}"
        time.sleep(0.01)


# Root of a new user namespace that has only uids and gids 0-65535, as in many containers;
# the parent (real root) writes the maps.
IN_SMALL_USERNS = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
r1, w1 = os.pipe()
r2, w2 = os.pipe()
pid = os.fork()
if pid == 0:
    if libc.unshare(0x10000000) != 0:   # CLONE_NEWUSER
        os._exit(90)
    os.write(w1, b"x")
    os.read(r2, 1)
    os.setgid(0)
    os.setuid(0)
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
os.read(r1, 1)
for name in ("uid_map", "gid_map"):
    with open(f"/proc/{pid}/{name}", "w") as f:
        f.write("0 0 65536")
os.write(w2, b"x")
sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""
COMMAND_IN_IT = """
from codeworld.sandbox import Limits, run_command
r = run_command(["python3", "-c", "import os; print(os.getuid())"], limits=Limits())
print(r.returncode, r.stdout.strip())
"""


@pytest.mark.parametrize("uid_range,expected", [
    (None, "0 65534"), ("60000-60099", "0 65534"), ("1879048192-1879048200", "not all")])
def test_a_container_with_few_uids_runs_sandboxes_as_before(probe, tmp_path, uid_range,
                                                             expected):
    """Really in such a user namespace: the default range is missing there, so sandboxes run
    as the shared 65534 (warned); a range inside it is leased; one outside it is refused."""
    env = {**os.environ, uids.ENV_DIR: str(tmp_path / "locks")}
    env.pop(uids.ENV_RANGE, None)
    if uid_range:
        env[uids.ENV_RANGE] = uid_range
    r = subprocess.run([sys.executable, "-c", IN_SMALL_USERNS, COMMAND_IN_IT], env=env,
                       capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert expected in r.stdout + r.stderr, (r.stdout, r.stderr)
    assert ("does not exist in this user namespace" in r.stderr) == (uid_range is None)
    assert (tmp_path / "locks" / "60000").exists() == (uid_range == "60000-60099")
