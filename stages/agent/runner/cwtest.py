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
            self.outcome[nid] = "pass"
        if report.failed:
            self.outcome[nid] = "fail" if report.when == "call" else "error"
            self.message[nid] = report.longreprtext[-3000:]
        elif report.skipped and self.outcome[nid] == "pass":
            self.outcome[nid] = "skip"

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
        rec = {"test": nid, "outcome": col.outcome[nid], "message": col.message.get(nid, "")}
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


def mutants(spec: dict) -> None:
    work = "/tmp/w"
    shutil.copytree(spec["root"], work, symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    here = os.path.abspath(__file__)
    for m in spec["mutants"]:
        path = os.path.join(work, m["file"])
        with open(path, encoding="utf-8") as f:
            original = f.read()
        with open(path, "w", encoding="utf-8") as f:
            f.write(m["source"])
        sub = {"mode": "run", "root": work, "sys_path": spec.get("sys_path", []),
               "tests": m["tests"]}
        spec_path = "/tmp/mutant-spec.json"
        with open(spec_path, "w") as f:
            json.dump(sub, f)
        status, outcomes, messages = "ok", {}, {}
        try:
            res = subprocess.run([sys.executable, "-s", "-P", here, spec_path], cwd=work,
                                 capture_output=True, text=True, timeout=spec["timeout"])
            for line in res.stdout.splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if "test" in rec:
                    outcomes[rec["test"]] = rec["outcome"]
                    if rec["message"]:
                        messages[rec["test"]] = rec["message"]
            if not outcomes:
                status = "crash"
        except subprocess.TimeoutExpired:
            status = "timeout"
        finally:
            with open(path, "w", encoding="utf-8") as f:
                f.write(original)
        print(json.dumps({"mutant": m["id"], "status": status, "outcomes": outcomes,
                          "messages": messages}), flush=True)


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    {"run": run, "mutants": mutants}[spec["mode"]](spec)


if __name__ == "__main__":
    main()
