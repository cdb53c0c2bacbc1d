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
  and reruns only the tests covering a mutated line.
* ``mutants``: copy /work once to /tmp/w, then for each mutant write its source over its file,
  run its tests in a fresh interpreter (``run`` mode, with a timeout: a mutant may loop
  forever), restore the file; one JSON line per mutant ``{"mutant", "status", "outcomes",
  "messages"}``.

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
    code = pytest.main(_pytest_args(spec), plugins=[col, col._protocol_wrapper()])
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
    """subprocess.run in a process group of its own: on timeout the whole group is killed,
    so processes the tests started do not live on into the next mutant's run."""
    with subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        finally:
            try:   # the tests' own children, even after a normal end
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def mutants(spec: dict) -> None:
    work = "/tmp/w"
    shutil.copytree(spec["root"], work, symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    here = os.path.abspath(__file__)
    for m in spec["mutants"]:
        path = os.path.join(work, m["file"])
        with open(path, encoding="utf-8", newline="") as f:
            original = f.read()
        _write(path, m["source"])
        # a home and temp folder of its own: what one mutant's tests leave there (a cache
        # file) must not change the next one's outcomes
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
        finally:
            _write(path, original)
            shutil.rmtree(home, ignore_errors=True)
        print(json.dumps({"mutant": m["id"], "status": status, "outcomes": outcomes,
                          "messages": messages}), flush=True)


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    {"run": run, "mutants": mutants}[spec["mode"]](spec)


if __name__ == "__main__":
    main()
