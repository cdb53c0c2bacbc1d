"""A budget for the code a repr runs: a ``__repr__`` that never returns no longer hangs the trace.

The tracer reprs every local at every frame; untraced, the program never calls those reprs. A
user ``__repr__`` looping forever made the trace time out and be dropped though the program
itself finishes at once. Wall-clock limits would cut a slow repr at a different point on every
run (traces must be byte-identical run after run), so the budget counts trace events instead:
the repr runs under ``sys.call_tracing`` (tracing is off inside the tracer's own callback) with a
counting trace function; past :data:`REPR_EVENTS` events of Python code (the tracer's own
frames not counted) it raises :class:`ReprTimeout` inside that code, and the value is written
``<repr of T timed out>``. The reprs of one trace share :data:`TRACE_EVENTS`: once spent, every
later repr that runs Python code times out at its first event (a loop holding such a value
would otherwise pay the whole budget at every frame). A ``__repr__`` that catches
BaseException and goes on looping is not stopped (the trace times out as before).

Only values whose repr may run Python code pay for the guard (:func:`may_run_python`).
"""

from __future__ import annotations

import gc
import os
import sys
import types

REPR_EVENTS = 100_000      # trace events one repr may take (~20 ms of traced Python code)
TRACE_EVENTS = 1_000_000   # ... all reprs of one trace together

_settrace, _gettrace = sys.settrace, sys.gettrace   # (the program sees wrappers while traced)
_HERE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_HEAPTYPE = 1 << 9
_SCALARS = frozenset({int, float, bool, complex, type(None), str, bytes})
# Built-in types whose repr runs no Python code of the program's (module reprs run importlib's,
# bounded), or whose reprs of their parts are plain scalars.
_LEAVES = _SCALARS | {types.FunctionType, types.BuiltinFunctionType, type, types.ModuleType,
                      range, types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType,
                      types.CodeType, types.CellType, types.FrameType, types.MethodDescriptorType,
                      types.WrapperDescriptorType, types.BuiltinMethodType}
_CONTAINERS = frozenset({list, tuple, dict, set, frozenset})
_KNOWN = _LEAVES | _CONTAINERS
_LOOK = 3   # container levels looked into (deeper: guarded)


class ReprTimeout(BaseException):
    """Raised inside a repr's Python code past its budget (BaseException: a plain ``except
    Exception`` in the repr does not swallow it)."""


def timed_out(value: object) -> str:
    return f"<repr of {type(value).__qualname__} timed out>"


def may_run_python(value: object) -> bool:
    """Can ``repr(value)`` run Python code? A class of the program's (a heap type), a built-in
    type that reprs what it holds (a bound method, a partial, a dict view...), or a list,
    tuple, dict or set holding one within a few levels. Cheap for what the hot loop meets most:
    scalars, and containers of scalars (C calls only)."""
    t = type(value)
    if t in _LEAVES:
        return False
    if t not in _CONTAINERS:
        return t.__flags__ & _HEAPTYPE or t.__repr__ is not object.__repr__
    level = [value]
    for _ in range(_LOOK):
        kinds = set(map(type, children := gc.get_referents(*level)))
        if not kinds <= _KNOWN:
            return True
        if kinds.isdisjoint(_CONTAINERS):
            return False
        level = [c for c in children if type(c) in _CONTAINERS]
    return True


class ReprBudget:
    """The events left to one trace's reprs; :meth:`run` calls a repr function within them.
    ``recorder``: its events are off while a repr runs (``sys.call_tracing`` turns the
    sys.monitoring callbacks back on for the program's code a ``__repr__`` calls)."""

    __slots__ = ("left", "recorder", "ran", "before_first", "skip")

    def __init__(self, recorder) -> None:
        self.left = TRACE_EVENTS
        self.recorder = recorder
        # Has a repr run Python code (a trace event counted)? Only then can tracing have
        # changed what the program does (untraced.py).
        self.ran = False
        # Called once, as Python code is about to run for a repr for the first time: the run
        # is still the untraced one's. True where the untraced run goes on from there (the
        # reference's fork, untraced.py), which runs no repr (``skip``) until the program ends.
        self.before_first = None
        self.skip = False

    def program_ended(self) -> None:
        """Reprs run from now on (the result's) change nothing the program does."""
        self.before_first = None
        self.skip = False

    def run(self, fn, *args):
        """``fn(*args)``, the Python code it runs (but the tracer's) counted: ReprTimeout
        raised in that code past the budget. (In the untraced reference run: ReprTimeout at
        its first event, before any of it runs.)"""
        if self.skip:
            return ""
        budget = min(REPR_EVENTS, self.left)
        count = budget

        def tick(frame, event, arg):
            nonlocal count
            if event == "call" and frame.f_code.co_filename.startswith(_HERE):
                return None   # the tracer's own repr code
            if self.before_first is not None:
                first, self.before_first = self.before_first, None
                self.skip = first()
            if self.skip:
                raise ReprTimeout
            count -= 1
            if count < 0:
                raise ReprTimeout
            return tick

        def call():
            previous = _gettrace()
            _settrace(tick)
            try:
                return fn(*args)
            finally:
                _settrace(previous)

        rec = self.recorder
        active = rec.active
        rec.active = False
        try:
            return sys.call_tracing(call, ())
        finally:
            rec.active = active and not self.skip
            spent = budget - max(count, 0)
            if spent:
                self.ran = True
                self.left -= spent
