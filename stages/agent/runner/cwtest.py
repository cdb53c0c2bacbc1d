"""Sandbox side of the agent stage's test runs. Never imported on the host: the host runs

    python -s -P /sandbox/lib/cwagent/cwtest.py SPEC_FILE

inside ``codeworld.sandbox.run_command`` with the repository at /work and pytest (read-only,
from the host's environment) on PYTHONPATH. Every suite runs under pytest, which also runs
unittest TestCases, so test ids are always pytest node ids.

Modes (``spec["mode"]``):

* ``run``: run the tests of ``spec["tests"]`` (all collected tests when null) in ``spec["root"]``;
  one JSON line per test ``{"test", "outcome", "message"[, "lines"]}`` with outcome pass / fail /
  error / skip, then ``{"summary": {...}}``. With ``coverage`` each test's record lists the lines
  of the package files (``pkg_files``) it executed: the bug synthesis mutates only covered lines
  and reruns only the tests covering a mutated line. ``canary_file`` (the reward's canary
  tests, a path under root): its ``test_*`` functions are collected whatever the project's
  ``python_functions`` says (``check_*``), as its unittest methods are anyway.
* ``mutants``: for each mutant copy /work afresh to /tmp/w (/tmp and /dev/shm otherwise as
  this process found them), write its source over its file, run its tests in a fresh
  interpreter (``run`` mode, with a timeout: a mutant may loop forever), then kill every
  process the run left (this process is a child subreaper: a daemon that left the run's
  process group and session is still its descendant); one JSON line per mutant
  ``{"mutant", "status", "outcomes", "messages"}``. Nothing of one mutant's run reaches the
  next's; a signal its tests send this process is caught and ignored (``_guard_signals``) but
  SIGKILL and SIGSTOP, after which the host runs the later mutants again.

The tests' own output goes to stderr; only these JSON lines go to stdout.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time


def _pytest_args(spec: dict) -> list[str]:
    # addopts of the project's config may name plugins we do not have (--cov...); no cache dir
    # (the tree may be read-only); short tracebacks are what the problem statement quotes.
    args = ["-q", "-p", "no:cacheprovider", "-o", "addopts=", "--rootdir", spec["root"],
            "--tb=short", "-W", "ignore::pytest.PytestUnknownMarkWarning"]
    tests = spec.get("tests")
    return args + (list(tests) if tests else [])


class _Collector:
    def __init__(self, pkg_files: set[str] | None):
        self.order: list[str] = []
        self.outcome: dict[str, str] = {}
        self.message: dict[str, str] = {}
        self.lines: dict[str, set] = {}
        self.collect_errors: list[str] = []
        self.pkg_files = pkg_files

    def _tracer(self, hits: set):
        files = self.pkg_files

        def local(frame, event, arg):
            if event == "line":
                hits.add((frame.f_code.co_filename, frame.f_lineno))
            return local

        def glob(frame, event, arg):
            if frame.f_code.co_filename in files:
                return local
            return None
        return glob

    def _protocol_wrapper(self):
        import pytest

        collector = self

        class Wrap:
            @pytest.hookimpl(wrapper=True)
            def pytest_runtest_protocol(self, item, nextitem):
                if collector.pkg_files is None:
                    return (yield)
                hits: set = set()
                sys.settrace(collector._tracer(hits))
                try:
                    return (yield)
                finally:
                    sys.settrace(None)
                    collector.lines[item.nodeid] = hits
        return Wrap()

    def pytest_runtest_logreport(self, report):
        nid = report.nodeid
        if nid not in self.outcome:
            self.order.append(nid)
            self.outcome[nid] = "pending"  # a pass needs a passed call: a run cut short
        if report.failed:                  # after setup passes nothing
            self.outcome[nid] = "fail" if report.when == "call" else "error"
            self.message[nid] = report.longreprtext[-3000:]
        elif self.outcome[nid] == "pending":
            if report.skipped:
                self.outcome[nid] = "skip"
            elif report.when == "call":
                self.outcome[nid] = "pass"

    def outcome_of(self, nid: str) -> str:
        outcome = self.outcome[nid]
        return "error" if outcome == "pending" else outcome

    def pytest_collectreport(self, report):
        if report.failed:
            self.collect_errors.append(f"{report.nodeid}: {report.longreprtext[-1500:]}")


def _canary_collector(path: str):
    """A plugin that collects the plain ``test_*`` functions of the file at ``path``."""
    import inspect

    import pytest

    class Canaries:
        @pytest.hookimpl(tryfirst=True)
        def pytest_pycollect_makeitem(self, collector, name, obj):
            if isinstance(collector, pytest.Module) and str(collector.path) == path \
                    and name.startswith("test_") and inspect.isfunction(obj):
                return pytest.Function.from_parent(collector, name=name)
            return None
    return Canaries()


def run(spec: dict) -> None:
    real_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the tests' and pytest's own output go to stderr
    root = spec["root"]
    for p in reversed(spec.get("sys_path", [])):
        sys.path.insert(0, os.path.normpath(os.path.join(root, p)))  # no /work/. in paths
    os.chdir(root)
    import pytest

    pkg = {os.path.join(root, f) for f in spec.get("pkg_files", [])} if spec.get("coverage") else None
    col = _Collector(pkg)
    t0 = time.perf_counter()
    plugins = [col, col._protocol_wrapper()]
    if spec.get("canary_file"):
        plugins.append(_canary_collector(os.path.join(root, spec["canary_file"])))
    code = pytest.main(_pytest_args(spec), plugins=plugins)
    for nid in col.order:
        rec = {"test": nid, "outcome": col.outcome_of(nid), "message": col.message.get(nid, "")}
        if pkg is not None:
            by_file: dict[str, list] = {}
            for fn, line in sorted(col.lines.get(nid, ())):
                by_file.setdefault(os.path.relpath(fn, root), []).append(line)
            rec["lines"] = by_file
        real_out.write(json.dumps(rec) + "\n")
    real_out.write(json.dumps({"summary": {"exit": int(code), "tests": len(col.order),
                                           "collect_errors": col.collect_errors,
                                           "seconds": round(time.perf_counter() - t0, 3)}}) + "\n")
    real_out.flush()


def _write(path: str, text: str) -> None:
    # Line ends as they are, as the host's mutate.read_source reads them (this runs in the
    # sandbox and cannot import host code): a CRLF mutant stays CRLF.
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def _run_group(argv: list[str], cwd: str, env: dict, timeout: float):
    """subprocess.run in a process group of its own, killed on timeout; then every process
    the run left (in the group or not) is killed: nothing lives on into the next mutant's run.
    Orphans are ours meanwhile (a subreaper, see ``mutants``): reaped as they exit, as the
    sandbox's pid 1 reaps them in a ``run``, so they do not count against its process limit."""
    with subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        signal.signal(signal.SIGCHLD, lambda *_: _reap_orphans(proc.pid))
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            _kill_descendants()   # a process that left the group may hold the pipes open
            proc.communicate()
            raise
        finally:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            if proc.returncode is None:   # (an exception: the run is ended here)
                proc.kill()
                proc.wait()
            _kill_descendants()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _parents() -> dict[int, int]:
    """{pid: parent pid} of the live processes in /proc (the sandbox's own pid namespace)."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    out[int(name)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return out


def _descendants() -> list[int]:
    parent_of = _parents()
    out, todo = [], [os.getpid()]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parent_of.items() if pp == parent]
        out += kids
        todo += kids
    return out


def _reap_orphans(keep: int) -> None:
    """Reap our exited children but ``keep`` (Popen's, waited for by Popen)."""
    me = os.getpid()
    for pid, parent in _parents().items():
        if parent == me and pid != keep:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def _kill_descendants(budget: float = 5.0) -> None:
    """SIGKILL every descendant of this process, by pid, and reap them, until none is left;
    a RuntimeError when some outlive ``budget`` seconds (the mutants' run ends there)."""
    deadline = time.monotonic() + budget
    while True:
        while True:   # reap what has exited
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not pid:
                break
        pids = _descendants()
        if not pids:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of a mutant's run outlived it: {pids}")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.001)


def _prctl(option: int, value: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 4, 36
SCRATCH = ("/tmp", "/dev/shm")
# Signals a mutant's tests (our uid) may send us that we can catch and leave alone: all but
# SIGKILL and SIGSTOP (those end or stop us: the host sees its mutant's result missing, see
# envs.run_mutants), SIGCHLD (``_run_group``'s) and those the kernel sends for a fault of our
# own, whose handler would return to the faulting instruction.
_NOT_GUARDED = {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGSEGV, signal.SIGBUS,
                signal.SIGFPE, signal.SIGILL, signal.SIGABRT, signal.SIGTRAP, signal.SIGSYS}


def _guard_signals() -> None:
    """A handler that does nothing for each signal a test could end or stop us with. A
    handler, not SIG_IGN: exec resets handlers to the default action but keeps a signal
    ignored, and the tests' processes must start with the actions they would anywhere."""
    for sig in signal.valid_signals():
        if sig not in _NOT_GUARDED:
            try:
                signal.signal(sig, lambda *_: None)
            except (OSError, ValueError):   # (one the C library keeps for itself)
                pass


def _remove(path: str) -> None:
    """``path`` and all under it, whatever modes the tests left (a folder chmod 000)."""
    if os.path.isdir(path) and not os.path.islink(path):
        os.chmod(path, 0o700)
        for dirpath, dirnames, _ in os.walk(path):
            for name in dirnames:
                p = os.path.join(dirpath, name)
                if not os.path.islink(p):
                    os.chmod(p, 0o700)
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _fresh_scratch(found: dict[str, set[str]]) -> None:
    """/tmp and /dev/shm back to what ``found`` lists (what was there before any mutant)."""
    for top, names in found.items():
        for name in os.listdir(top):
            if name not in names:
                _remove(os.path.join(top, name))


def mutants(spec: dict) -> None:
    work = "/tmp/w"
    # what a mutant's run leaves: its processes die after it (they are ours, whatever
    # session or group they moved to), its files go before the next: a fresh copy of /work
    # (no bytecode of an earlier run either) and /tmp, /dev/shm as found (3-15 ms a copy of
    # a 400 kB tree, against 0.3 s or more for a run).
    # Not dumpable: the tests (same uid) cannot write our memory or take our stdout.
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_DUMPABLE, 0)
    _guard_signals()
    found = {top: set(os.listdir(top)) for top in SCRATCH if os.path.isdir(top)}
    here = os.path.abspath(__file__)
    for m in spec["mutants"]:
        _fresh_scratch(found)
        if os.path.lexists(work):
            _remove(work)
        shutil.copytree(spec["root"], work, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
        _write(os.path.join(work, m["file"]), m["source"])
        # a home and temp folder of its own (a cache file there is gone by the next run)
        home = f"/tmp/home-{m['id']}"
        os.makedirs(home)
        env = {**os.environ, "HOME": home, "TMPDIR": home}
        sub = {"mode": "run", "root": work, "sys_path": spec.get("sys_path", []),
               "tests": m["tests"]}
        spec_path = "/tmp/mutant-spec.json"
        with open(spec_path, "w") as f:
            json.dump(sub, f)
        status, outcomes, messages = "ok", {}, {}
        try:
            res = _run_group([sys.executable, "-s", "-P", here, spec_path], work, env,
                             spec["timeout"])
            for line in res.stdout.splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if "test" in rec:
                    outcomes[rec["test"]] = rec["outcome"]
                    if rec["message"]:   # paths as in the tree the agent gets
                        messages[rec["test"]] = rec["message"].replace(work + "/",
                                                                       spec["root"] + "/")
            if not outcomes:
                status = "crash"
        except subprocess.TimeoutExpired:
            status = "timeout"
        print(json.dumps({"mutant": m["id"], "status": status, "outcomes": outcomes,
                          "messages": messages}), flush=True)


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    {"run": run, "mutants": mutants}[spec["mode"]](spec)


if __name__ == "__main__":
    main()
