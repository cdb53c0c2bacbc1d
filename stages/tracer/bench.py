"""Timing check (not a test): ``python -m stages.tracer.bench [seconds] [--fork N]``.

Traces/s of :func:`trace_call` on one core for a small function (``two_sum``, 12 frames), in
three settings, next to a naive reference tracer (plain ``sys.settrace``, ``json.dumps`` of the
locals at every line, no ``..``, no limits: the least any CWM tracer has to do) timed the same way:

* ``same call``: one program and call traced again and again (nothing left to compile);
* ``same program``: one program, a different input every time (its compilation is cached, the
  entry point's is not: an in-process loop over one function's inputs);
* ``new program``: a different program text every time (what a fork-server child sees: nothing
  is cached across requests);
* ``with a class``: the same call of ``two_sum`` holding an object of the program's class, whose
  ``__repr__`` (side-effect free) the tracer runs at every frame: such a trace is checked
  against an untraced run of the program in a fork (``untraced.py``), which this counts;
* ``--fork N``: N processes each forking one child per trace that calls ``worker.handle`` and
  sends the JSON response back through a pipe (the fork server's work minus the sandbox).

Times are CPU seconds of this process and of the children it waited for (``time.process_time``
and ``RUSAGE_CHILDREN``: the untraced reference runs) so that a busy machine distorts them
less; the fork mode reports wall-clock throughput.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

from .core import HAS_MONITORING, trace_call
from .worker import handle

CODE = '''def two_sum(nums, target):
    seen = {}
    for i, n in enumerate(nums):
        if target - n in seen:
            return [seen[target - n], i]
        seen[n] = i
    return []
'''
CALL = "two_sum([2, 7, 11, 15, 3, 6], 9)"
# two_sum holding an object whose __repr__ is the program's own
CLASS_CODE = '''class Target:
    value = None   # (the naive reference reprs self inside __init__ too)

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        return f"Target({self.value})"

''' + CODE.replace("    seen = {}", "    goal = Target(target)\n    seen = {}")


def naive_trace(code: str, call: str) -> list[str]:
    """Reference: the simplest CWM-like tracer (line events of the program's frames only)."""
    namespace: dict = {}
    exec(compile(code + "\ndef main():\n    return " + call + "\n", "<naive>", "exec"), namespace)
    out: list[str] = []

    def local(frame, event, arg):
        if event == "line":
            out.append(json.dumps({k: repr(v) for k, v in frame.f_locals.items()}))
        return local

    def glob(frame, event, arg):
        return local if frame.f_code.co_filename == "<naive>" else None

    sys.settrace(glob)
    try:
        namespace["main"]()
    finally:
        sys.settrace(None)
    return out


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have been waited for."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def rate(fn, seconds: float) -> float:
    """Calls of ``fn`` per CPU second (best of 3 rounds)."""
    best = 0.0
    for _ in range(3):
        n, start = 0, cpu_seconds()
        while (elapsed := cpu_seconds() - start) < seconds / 3:
            for _ in range(20):
                fn()
            n += 20
        best = max(best, n / elapsed)
    return best


def fresh(fn):
    """``fn(code, call)`` on a program text never seen before (a comment line differs)."""
    counter = iter(range(1 << 62))
    return lambda: fn(f"{CODE}# {next(counter)}\n", CALL)


def new_input(fn):
    """``fn(code, call)`` with a call never seen before (the last number differs; the trace has
    the same frames)."""
    counter = iter(range(100, 1 << 62))
    return lambda: fn(CODE, f"two_sum([2, 7, 11, 15, 3, {next(counter)}], 9)")


def fork_rate(workers: int, seconds: float) -> float:
    """Traces/s of ``workers`` processes, each forking one child per trace."""
    request = json.dumps({"id": 0, "code": CODE, "call": CALL})
    start = time.perf_counter()
    pids = []
    for w in range(workers):
        r, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # a worker: fork a child per trace until time is up, report the count
            os.close(r)
            n, code = 0, 0
            try:
                while time.perf_counter() - start < seconds:
                    cr, cw = os.pipe()
                    child = os.fork()
                    if child == 0:
                        os.close(cr)
                        os.write(cw, json.dumps(handle(json.loads(request))).encode())
                        os._exit(0)
                    os.close(cw)
                    with os.fdopen(cr, "rb") as f:
                        assert json.loads(f.read())["status"] == "ok"
                    os.waitpid(child, 0)
                    n += 1
                os.write(wfd, str(n).encode())
            except BaseException:  # noqa: BLE001 - report through the exit code
                code = 1
            os._exit(code)
        os.close(wfd)
        pids.append((pid, r))
    total = 0
    for pid, r in pids:
        with os.fdopen(r, "rb") as f:
            total += int(f.read() or 0)
        os.waitpid(pid, 0)
    return total / (time.perf_counter() - start)


def main() -> None:
    args = sys.argv[1:]
    workers = 0
    if "--fork" in args:
        i = args.index("--fork")
        workers = int(args[i + 1])
        del args[i:i + 2]
    seconds = float(args[0]) if args else 3.0
    r = trace_call(CODE, CALL)
    assert r.status == "ok", r
    backend = "sys.monitoring" if HAS_MONITORING else "sys.settrace"
    print(f"python {sys.version.split()[0]} ({backend}); {r.events} frames, "
          f"{len(r.text)} chars of text; traces per CPU second, one core:")
    for name, ours, ref in [
            ("same call", lambda: trace_call(CODE, CALL), lambda: naive_trace(CODE, CALL)),
            ("same program", new_input(trace_call), new_input(naive_trace)),
            ("new program", fresh(trace_call), fresh(naive_trace)),
            ("with a class", lambda: trace_call(CLASS_CODE, CALL),
             lambda: naive_trace(CLASS_CODE, CALL))]:
        a, b = rate(ours, seconds), rate(ref, seconds)
        print(f"  {name:13s} trace_call {a:7,.0f}/s ({1e3 / a:.3f} ms)   "
              f"naive reference {b:7,.0f}/s ({1e3 / b:.3f} ms)")
    if workers:
        print(f"  fork per trace, {workers} processes: {fork_rate(workers, seconds):,.0f} traces/s "
              "(wall clock)")


if __name__ == "__main__":
    main()
