"""Run a repository's unittest suite inside the sandbox, tracing the repository's functions
as its tests call them. Never imported on the host: ``stages.repo_traces`` runs it with

    python -s -P -c "...; from cwrepo.runner import main; main()" SPEC_FILE

with the repository bound read-only at /work, this package at /sandbox/lib/cwrepo and the
tracer package (stages/tracer) at /sandbox/lib/cwtrace.

What is traced: an *activation* starts when code in a test file (or a doctest example) calls a
function defined in a package file of the repository; every frame of that function, and of the
repository functions it calls (directly, or through the standard library, e.g. a ``key=``
callback), is recorded until it returns or an exception leaves it. Test code and the standard
library are never traced. A generator function's activation runs from its first resumption to
its exhaustion (a generator the test abandons gives status "invalid"). One activation at a
time: calls made by the test while a generator activation is suspended are not traced.

Frames are recorded by the tracer's public recorder (``cwtrace.Recorder``: same frame events,
``..`` rule, address-free reprs and limits as ``trace_call``), subclassed only to look source
lines up in the file of each frame (an activation spans files: ``use_lines``). Its text starts
with the function's own call frame (``text_from_first``; ``trace_call``'s starts after
``main``'s). At a limit the recorder raises ``TraceStop`` out of the event: the tracer catches
it and stops recording, instead of unwinding the program (the test must go on).

Determinism: str hashes follow the sandbox's PYTHONHASHSEED=0, and the module-level ``random``
is seeded from the test id before each test. A test that reads the clock, sleeps, starts a
thread or reads ``os.urandom`` (through the ``time``, ``threading`` and ``os`` functions, called
from anywhere but unittest's own machinery) gives no traces: its values, and even how often it
calls the repository (e.g. ``time_limited``), may change from run to run. Its activations are
held back until the test ends and then dropped, and they count towards no cap, so the tests
after it trace the same calls on every run. Such tests are counted by reason in the summary's
``tests_untraced``. The code under test sees no tracer (``sys.gettrace()`` is None) and cannot
remove it (``sys.settrace(None)`` removes nothing); a test installing a trace function of its
own gives no traces ("settrace": it would see the events). Still unguarded: ``datetime.now()``
and ``uuid`` (C calls), and ``random.Random()`` without a seed; the host runs the suite twice
and keeps only the traces both runs agree on.

Output: one JSON line per activation on the original stdout (the tests' own output goes to
stderr), then one ``{"summary": ...}`` line. Lines are flushed as they are written, so a run
killed at its time limit still returns the activations it finished.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import random
import sys
import threading
import time
import tokenize
import unittest
from collections import Counter

from cwtrace import (RETURN_OPS, SEND_OPS, TOO_DEEP, YIELD_OPS, CodeInfo, Recorder, TraceLimits,
                     TraceStop, code_info, error_text, safe_repr)

ROOT = "/work"


class _Activation(Recorder):
    """The tracer's recorder for one activation that may span several source files."""

    def __init__(self, infos: dict, limits: TraceLimits, sources) -> None:
        super().__init__([], infos, limits, text_from_first=True)
        self.sources = sources
        self.root = None
        self.module = self.function = self.test = None
        self.seq = 0
        self.value = None
        self.exc: BaseException | None = None
        self.left_by = None  # "return" | "exception" once the root scope is left
        self.raised: set = set()
        self.local = None

    def _use(self, frame) -> None:
        self.use_lines(self.sources(frame.f_code.co_filename))

    def line(self, frame, line: int) -> None:
        self._use(frame)
        Recorder.line(self, frame, line)

    def enter(self, frame, info) -> None:
        self._use(frame)
        Recorder.enter(self, frame, info)

    def leave(self, frame, value, yielded: bool) -> None:
        self._use(frame)
        Recorder.leave(self, frame, value, yielded)

    def exception(self, frame, exc) -> None:
        self._use(frame)
        Recorder.exception(self, frame, exc)


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)
    parts = rel[:-3].split(os.sep) if rel.endswith(".py") else rel.split(os.sep)
    if parts and parts[0] == "src":
        parts = parts[1:]
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


# The interpreter's own: RepoTracer.hide gives the code under test wrappers of them.
_settrace, _gettrace = sys.settrace, sys.gettrace

class RepoTracer:
    def __init__(self, spec: dict, emit) -> None:
        self.pkg = {os.path.join(ROOT, p) for p in spec["pkg_files"]}
        self.tests = {os.path.join(ROOT, p) for p in spec["test_files"]}
        self.limits = TraceLimits(**spec.get("limits", {}))
        self.max_traces = int(spec["max_traces"])
        self.max_per_function = int(spec["max_per_function"])
        self.emit = emit
        self.infos: dict[int, CodeInfo] = {}
        self.lines_cache: dict[str, list[str]] = {}
        self.modules: dict[str, str] = {}
        self.per_function: Counter = Counter()
        self.functions: set[str] = set()
        self.started = 0
        self.cur: _Activation | None = None
        self.test_id: str | None = None
        self.seq = 0
        # the current test's records, emitted when it ends unless it was nondeterministic
        self.pending: list[dict] = []
        self.taint: str | None = None
        self.untraced: Counter = Counter()
        self._counts_at_start: tuple = (0, Counter())

    # ----------------------------------------------------------------- helpers
    def sources(self, filename: str) -> list[str]:
        lines = self.lines_cache.get(filename)
        if lines is None:
            try:
                with tokenize.open(filename) as f:
                    text = f.read()
                lines = [ln + "\n" for ln in text.split("\n")]
            except (OSError, SyntaxError, UnicodeDecodeError):
                lines = []
            self.lines_cache[filename] = lines
        return lines

    def info(self, code) -> CodeInfo:
        info = self.infos.get(id(code))
        if info is None or info.code is not code:
            info = code_info(code, self.sources(code.co_filename))
            self.infos[id(code)] = info  # (holds the code: its id is never reused)
        return info

    def capped(self) -> bool:
        return self.started >= self.max_traces

    def install(self) -> None:
        if not self.capped() or self.cur is not None:
            if not self.is_ours(_gettrace()):
                _settrace(self.glob)
        elif self.is_ours(_gettrace()):
            _settrace(None)  # nothing more to trace: run the rest of the suite at full speed

    def is_ours(self, function) -> bool:
        return getattr(function, "__func__", None) is RepoTracer.glob and \
            getattr(function, "__self__", None) is self

    # ----------------------------------------------------------------- trace functions
    def glob(self, frame, event, arg):
        if event != "call":
            return None
        code = frame.f_code
        fn = code.co_filename
        if fn not in self.pkg:
            return None
        cur = self.cur
        if cur is not None:
            if cur.knows(frame) or self._inside(frame, cur.root):
                return self._enter(cur, frame)
            return None
        if self.test_id is None:
            return None
        back = frame.f_back
        if back is None:
            return None
        bfn = back.f_code.co_filename
        if bfn not in self.tests and not bfn.startswith("<doctest "):
            return None
        module = self.modules.get(fn)
        if module is None:
            module = self.modules[fn] = _module_name(fn)
        name = f"{module}:{code.co_qualname}"
        self.functions.add(name)
        if self.capped() or self.per_function[name] >= self.max_per_function:
            return None
        self.per_function[name] += 1
        self.started += 1
        self.seq += 1
        act = _Activation(self.infos, self.limits, self.sources)
        act.root, act.module, act.function = frame, module, code.co_qualname
        act.test, act.seq = self.test_id, self.seq
        act.local = self._make_local(act)
        self.cur = act
        return self._enter(act, frame)

    @staticmethod
    def _inside(frame, root) -> bool:
        f = frame.f_back
        n = 0
        while f is not None and n < 10_000:
            if f is root:
                return True
            f = f.f_back
            n += 1
        return False

    def _enter(self, act: _Activation, frame):
        try:
            act.enter(frame, self.info(frame.f_code))
        except TraceStop:
            self.finish(act)
            return None
        except RecursionError:
            act.fail(TOO_DEEP)
            self.finish(act)
            return None
        except Exception as exc:  # a bug of ours must not break the repository's test
            act.fail(f"tracer error {error_text(exc)}")
            self.finish(act)
            return None
        return act.local

    def _make_local(self, act: _Activation):
        raised = act.raised
        info = self.info

        def local(frame, event, arg):
            if self.cur is not act or not act.active:
                return None
            try:
                if event == "line":
                    if raised:
                        raised.discard(frame)
                    act.line(frame, frame.f_lineno)
                elif event == "return":
                    op = info(frame.f_code).code_bytes[frame.f_lasti]
                    if frame in raised and op not in RETURN_OPS:
                        raised.discard(frame)
                        if frame is act.root:
                            act.left_by = "exception"
                        act.unwind(frame)
                    else:
                        raised.discard(frame)
                        if op in RETURN_OPS:
                            if frame is act.root:
                                act.value, act.left_by = arg, "return"
                            act.leave(frame, arg, False)
                        elif op in YIELD_OPS:
                            act.leave(frame, arg, True)
                        else:  # unwinding after a re-raise (end of a finally block)
                            if frame is act.root:
                                act.left_by = "exception"
                            act.unwind(frame)
                elif event == "exception":
                    if arg[0] is StopIteration and \
                            info(frame.f_code).code_bytes[frame.f_lasti] in SEND_OPS:
                        return local
                    raised.add(frame)
                    if frame is act.root:
                        act.exc = arg[1]
                    act.exception(frame, arg[1])
            except TraceStop:
                self.finish(act)
                return None
            except RecursionError:
                act.fail(TOO_DEEP)
            except Exception as exc:
                act.fail(f"tracer error {error_text(exc)}")
            if not act.active:
                self.finish(act)
                return None
            return local

        return local

    def finish(self, act: _Activation, unfinished: str | None = None) -> None:
        if self.cur is act:
            self.cur = None
        act.active = False
        result = error = None
        if act.too_long:
            status = "too_long"
            error = (f"trace over its limits (max_events={act.max_events}, "
                     f"max_bytes={act.max_bytes})")
        elif act.broken is not None:
            status, error = "invalid", "untraceable: " + act.broken
        elif unfinished is not None or act.left_by is None:
            status, error = "invalid", unfinished or "the activation did not finish"
        elif act.left_by == "exception" and isinstance(act.exc, GeneratorExit):
            status, error = "invalid", "untraceable: the generator was closed unfinished"
        elif act.left_by == "exception":
            status = "exception"
            error = error_text(act.exc) if act.exc is not None else "exception"
        else:
            status, result = "ok", safe_repr(act.value, act.max_repr)
        self.pending.append({"test": act.test, "seq": act.seq, "module": act.module,
                   "function": act.function, "trace": "".join(act.parts), "result": result,
                   "error": error, "status": status, "events": len(act.recs)})
        # drop frame references (a suspended generator would keep its locals alive)
        act.scopes.clear()
        act.parked.clear()
        act.raised.clear()
        act.root = act.value = act.exc = act.mark = act.jump = None

    def start_test(self, test_id: str) -> None:
        self.test_id, self.seq, self.taint, self.pending = test_id, 0, None, []
        self._counts_at_start = (self.started, self.per_function.copy())

    def end_test(self) -> None:
        if self.cur is not None:
            self.finish(self.cur, "untraceable: the test left the generator unfinished")
        if self.taint is not None:
            # as if the test had traced nothing: later tests see the same caps on every run
            self.started, self.per_function = self._counts_at_start
            self.untraced[self.taint] += 1
        else:
            for rec in self.pending:
                self.emit(rec)
        self.pending = []
        self.test_id = None

    def guard(self) -> None:
        """Wrap the clock, sleep, thread and OS-randomness functions so that a test calling
        them is marked (before the repository or its tests import them by name)."""
        own = (os.path.dirname(unittest.__file__) + os.sep, os.path.dirname(__file__) + os.sep)

        def wrap(owner, name: str, reason: str) -> None:
            fn = getattr(owner, name, None)
            if fn is None:
                return

            @functools.wraps(fn)
            def marked(*args, **kwargs):
                if self.test_id is not None and self.taint is None and \
                        not sys._getframe(1).f_code.co_filename.startswith(own):
                    self.taint = reason
                return fn(*args, **kwargs)

            setattr(owner, name, marked)

        for name in ("time", "time_ns", "monotonic", "monotonic_ns", "perf_counter",
                     "perf_counter_ns", "process_time", "process_time_ns", "thread_time",
                     "thread_time_ns", "localtime", "gmtime", "ctime", "asctime", "strftime"):
            wrap(time, name, "clock")
        wrap(time, "sleep", "sleep")
        self.hide()
        wrap(threading.Thread, "start", "thread")
        wrap(os, "urandom", "urandom")


    def hide(self) -> None:
        """The code under test sees sys.settrace/gettrace as it would untraced (as the program
        tracer's, core._run_settrace): gettrace() is None rather than our glob (the harness in
        its locals), settrace(None) removes nothing (a gap in a trace kept as ok); a trace
        function of the test's own would see the events: that test gives no traces."""

        def settrace(function):
            if function is None:
                if not self.is_ours(_gettrace()):
                    _settrace(None)   # (the test's own function, installed before)
                return
            if self.test_id is not None and self.taint is None:
                self.taint = "settrace"
            _settrace(function)

        def gettrace():
            function = _gettrace()
            return None if self.is_ours(function) else function

        sys.settrace, sys.gettrace = settrace, gettrace


class _FunctionCase(unittest.FunctionTestCase):
    """A module-level ``test_*`` function (pytest style, no fixtures), named module.function."""

    def id(self) -> str:
        f = self._testFunc
        return f"{f.__module__}.{f.__qualname__}"


class _Loader(unittest.TestLoader):
    def loadTestsFromModule(self, module, *args, **kw):
        suite = super().loadTestsFromModule(module, *args, **kw)
        for name in sorted(vars(module)):
            obj = vars(module)[name]
            if not name.startswith("test") or not inspect.isfunction(obj) or \
                    obj.__module__ != module.__name__ or inspect.isgeneratorfunction(obj):
                continue
            try:
                params = inspect.signature(obj).parameters.values()
            except (TypeError, ValueError):
                continue
            if all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                   for p in params):
                suite.addTest(_FunctionCase(obj))
        return suite


class _Result(unittest.TestResult):
    def __init__(self, tracer: RepoTracer) -> None:
        super().__init__()
        self.tracer = tracer
        self.passed = 0

    def startTest(self, test) -> None:
        super().startTest(test)
        self.tracer.start_test(test.id())
        # Tests drawing from the module-level ``random`` without a seed would give other
        # traces on every run: seed it per test, from the test id (not from hash()).
        random.seed(self.tracer.test_id)
        self.tracer.install()

    def stopTest(self, test) -> None:
        _settrace(None)
        self.tracer.end_test()
        super().stopTest(test)

    def addSuccess(self, test) -> None:
        super().addSuccess(test)
        self.passed += 1


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # the tests' own output goes to stderr
    for p in reversed(spec["sys_path"]):
        sys.path.insert(0, p)

    def emit(rec: dict) -> None:
        out.write(json.dumps(rec) + "\n")
        out.flush()

    tracer = RepoTracer(spec, emit)
    tracer.guard()
    suite = unittest.TestSuite()
    load_errors = []
    for start, top in spec["start_dirs"]:
        if top not in sys.path:
            sys.path.insert(0, top)
        loader = _Loader()
        try:
            suite.addTests(loader.discover(start, pattern="test*.py", top_level_dir=top))
        except Exception as exc:
            load_errors.append(f"{start}: {error_text(exc)}")
        load_errors += [e.strip().splitlines()[-1] for e in loader.errors if e.strip()]
    result = _Result(tracer)
    try:
        suite.run(result)
    finally:
        _settrace(None)
    emit({"summary": {
        "tests_run": result.testsRun, "tests_passed": result.passed,
        "tests_failed": len(result.failures) + len(result.unexpectedSuccesses),
        "tests_errors": len(result.errors), "tests_skipped": len(result.skipped),
        "expected_failures": len(result.expectedFailures), "load_errors": load_errors[:20],
        "functions_seen": sorted(tracer.functions), "activations": tracer.started,
        "tests_untraced": dict(sorted(tracer.untraced.items()))}})
