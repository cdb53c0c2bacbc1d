"""The tracer: run ``main()`` of a compiled program and record CWM frames.

Two backends give the same frames (checked by the tests):

* Python 3.12+: ``sys.monitoring``. Line/call/return/jump events are switched on only for the
  program's own code objects (``set_local_events``), so library code costs nothing; exception
  events (RAISE, PY_UNWIND, PY_THROW) can only be global and are filtered by a dict lookup.
  Line events follow ``sys.settrace`` semantics (CWM's): a LINE event, plus one for every backward
  jump (a loop iterating on one line), forward jumps being DISABLEd at their first firing.
* Python 3.11: ``sys.settrace``; the global trace function returns None for every frame that is
  not program code, so those frames are never traced line by line.

Only code objects compiled from the program are traced; a library calling back into program code
(a ``key=`` function given to ``sorted``) is traced, since the callback's code is the program's.

Events -> frames:
* call: a scope is entered (its ``def`` line) or a generator is resumed (the line it resumes at);
* line: before a line runs (the text writes ``..`` for unchanged values, the structured frame
  keeps full reprs). Locals are in the order of 3.11's ``f_locals`` dict (a name keeps its place
  while bound; a new or re-bound one goes last), emulated on 3.13 where that order changed;
* return: a return, or a generator's ``yield`` (VALUE = the yielded value, an async generator's
  too; the scope stays alive and its next ``next()`` emits a call frame again, at the line it
  resumes at, even for a generator started before main);
* exception: an exception is raised in, or propagates into, a scope; VALUE = ``repr(exc)``,
  e.g. ``"ZeroDivisionError('division by zero')"``. A scope left by an exception gets no return
  frame; a re-raise at the end of a ``finally`` emits nothing either (as in Python 3.11).

Limits: when a frame would exceed ``max_events`` or ``max_bytes``, that frame is dropped and an
internal ``TraceStop`` (a BaseException) is raised inside the program to unwind it; the partial
frames and text are kept but the status is "too_long" (CWM dropped such traces: so must the
caller). With ``sys.monitoring`` the stop is raised again at each later line if the program
swallows it with a bare ``except``; ``sys.settrace`` turns itself off when a tracer raises, so on
3.11 such a program runs on untraced until it ends or the sandbox kills it.

Untraceable runs get status "invalid" ("untraceable: ..." in ``error``): a RecursionError during
the traced call (the depth where it strikes depends on the tracer's own stack use, so the trace
would not show what the program does untraced; on 3.11 the tracer itself can be the frame that
overflows, and CPython then drops it silently), or a program that removes the tracer
(``sys.settrace``) or frees its ``sys.monitoring`` tool id.

Threads started by the program run untraced (only the calling thread is traced).

Reprs that run the program's code (a ``__repr__`` of its own) run within a budget of trace
events: one that never returns is written ``<repr of T timed out>`` (guard.py). Such a repr
can change what the program does (it counts, appends, advances an iterator): the first one
forks the untraced run the trace must agree with (untraced.py), else it is invalid
(``repr_side_effect: ...``).
"""

from __future__ import annotations

import builtins
import dis
import gc
import sys
import threading
from operator import is_ as _is

from .frames import (_KEYS, _SAME, ACTION_SEP, ARG_SEP, CALL, CALL_SEP, EXCEPTION, EXCEPTION_SEP,
                     FRAME_SEP, LINE, LINE_SEP, RETURN, RETURN_SEP, TraceLimits, TraceResult,
                     _enc, _json, _key, name_text, prompt_for, unreserved)
from .program import ITER_NAME, CodeInfo, InvalidProgram, Program, compile_program
from .guard import ReprBudget, ReprTimeout, may_run_python, timed_out
from .prefix import BUILT, prefix_repr
from . import untraced
from .reprs import (_ADDRESS, _BIG, _MODULE, _PLAIN, _SCALARS, MARKER, NESTED_TYPES,
                    address_ordered_set_repr, error_text, exception_repr, long_sequence_prefix,
                    nested_ordered_repr, repr_failed, safe_repr)

_SEQS = (list, tuple)

HAS_MONITORING = hasattr(sys, "monitoring")
_OP = dis.opmap
RETURN_OPS = frozenset(_OP[n] for n in ("RETURN_VALUE", "RETURN_CONST") if n in _OP)
# 3.13's settrace reports a yield at the RESUME that follows YIELD_VALUE.
YIELD_OPS = frozenset(_OP[n] for n in ("YIELD_VALUE", "RESUME") if n in _OP)
# A ``yield from``/``await`` whose sub-iterator finished: 3.11 (SEND) and 3.12+'s settrace
# (END_SEND) report its internal StopIteration as an exception event; sys.monitoring does not.
SEND_OPS = frozenset(_OP[n] for n in ("SEND", "END_SEND") if n in _OP)
_NO_INTERRUPT = _OP.get("JUMP_BACKWARD_NO_INTERRUPT", -1)
_RESUME = _OP["RESUME"]
_TOOL_NAME = "codeworld-tracer"
# 3.11/3.12 keep one f_locals dict per frame: a name keeps its place while bound, a new or
# re-bound one goes last. 3.13 (PEP 667) gives a view in slot order: the recorder emulates the
# former so that the same program gives the same text on every version.
_EMULATE_ORDER = sys.version_info >= (3, 13)
TOO_DEEP = ("RecursionError: the recursion limit was reached while tracing (where it is reached "
             "depends on the tracer's own stack use, so the trace would not be the program's)")


def _tracer_failure(exc: Exception) -> str:
    """Why a trace is untraceable when a tracer callback raised: a RecursionError is the stack
    running out (``TOO_DEEP``); anything else a fault of the tracer's, named. (Uncaught, it
    would end tracing silently on 3.11 and reach the program as if its own line had raised.)"""
    if isinstance(exc, RecursionError):
        return TOO_DEEP
    return "tracer error " + error_text(exc)


def _started(frame, info: CodeInfo | None) -> bool:
    """Has the frame run past its entry (it is resuming, or being thrown into, after a yield or
    await), as opposed to a new activation at its first instruction?"""
    return info is not None and frame.f_lasti > info.entry_offset()


def _resumed(frame, info: CodeInfo) -> bool:
    """Is the frame resuming after a yield or await? Entering a scope stops at its first
    ``RESUME`` (oparg 0), resuming at the one after the suspension point (oparg > 0); a frame's
    f_lasti alone cannot tell, since cell set-up or RETURN_GENERATOR may come before the first."""
    code, i = info.code_bytes, frame.f_lasti
    return 0 <= i < len(code) - 1 and code[i] == _RESUME and code[i + 1] != 0


class TraceStop(BaseException):
    """Raised inside the traced program to unwind it once a limit is hit (by
    :meth:`Recorder.push`: a tracer driving a recorder catches it)."""


# Reprs are reused while a local still holds the very same object and that object cannot have
# changed: an immutable scalar (its repr is a pure function of it), a tuple of such scalars, a
# list of them whose elements are still the same objects in the same order (checked against a
# copy of its element references; for a long one only the elements its truncated text shows), or
# an object of a static (non-heap) type with object's own address-only repr (iterators:
# ``<list_iterator object>``; a static type's name cannot be reassigned). Most locals of a frame
# are unchanged since the scope's last frame: a loop over a table used to repr it at every event.
_IMMUTABLE = frozenset({int, float, bool, complex, type(None), str, bytes})
_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE
_OBJECT_REPR = object.__repr__
_ANY_LENGTH = sys.maxsize

# An async generator's ``yield v`` reaches the tracer as v wrapped in a C object of CPython's
# (repr ``<async_generator_wrapped_value object>``); no attribute leads to v, but the
# wrapper's one GC referent is v.
_WRAPPED = "async_generator_wrapped_value"


def _unwrapped(value):
    if type(value).__flags__ & _HEAPTYPE:   # a class of the program's that took the name
        return value
    inner = gc.get_referents(value)
    return inner[0] if len(inner) == 1 else value


# A repr-cache entry for a name whose container's text was cut (prefix.py): never a hit (its
# length bounds are empty), it tells the next repr of that name to build only what is kept.
_LONG = ()
_PREFIX_CUT = ("", 0)   # (prefix_repr's text is final: no scrub, no cut)


def _entry(value, t, text: str, shown: int) -> tuple | None:
    """Repr-cache entry ``(value, elements, min_len, max_len, text)``: ``text`` stands for
    ``value`` while it is the same object and, if ``elements`` is not None, its length is within
    bounds and it starts with those very objects. None: not reusable. ``shown``: elements the
    text of a long sequence depends on (0: the text is the whole repr)."""
    if t in _IMMUTABLE:
        return (value, None, 0, 0, text)
    if t is tuple or t is list:
        if shown:  # long: the truncated text depends on its first ``shown`` elements only
            return (value, tuple(value[:shown]), shown, _ANY_LENGTH, text)
        if len(value) <= _BIG and set(map(type, value)) <= _SCALARS:
            if t is tuple:
                return (value, None, 0, 0, text)
            return (value, tuple(value), len(value), len(value), text)
        return None
    if t.__repr__ is _OBJECT_REPR and not t.__flags__ & _HEAPTYPE:
        return (value, None, 0, 0, text)
    return None


def _snapshot(items, prev: dict[str, str] | None, limit: int,
              cache: dict[str, tuple], budget: ReprBudget | None) -> tuple[dict[str, str], str]:
    """Reprs of a frame's locals and their LOCALS text: ``json.dumps({name: repr})`` where a value
    equal to its repr in ``prev`` is written ``".."``. The hot loop of the tracer: the repr
    rules of :func:`.reprs.safe_repr` and the JSON of :func:`.frames.render_locals` are inlined
    (the tests check both give the same text). ``cache`` is the scope's name -> ``_entry``: the
    reprs of values that cannot have changed are reused."""
    loc = {}
    out = []
    keys = _KEYS
    same = _SAME_KEYS
    plain = _PLAIN
    nested_types = NESTED_TYPES
    built = BUILT
    big = _BIG
    cached = 0  # entries of the cache that belong to present locals
    for name, value in items:
        if type(name) is not str:  # written into locals() by the program (frames.name_text)
            name = name_text(name)
        hit = cache.get(name)
        if hit is not None and hit[0] is value and (hit[1] is None or (
                hit[2] <= len(value) <= hit[3] and all(map(_is, value, hit[1])))):
            text = hit[4]
            cached += 1
        else:
            t = type(value)
            long = False   # (a container whose text was cut: see _LONG)
            try:
                cut = long_sequence_prefix(value, limit) if t in _SEQS else None
                if cut is None and budget is not None and t not in plain and \
                        may_run_python(value):
                    try:   # (its reprs run Python code: within a budget, see guard.py)
                        text = budget.run(safe_repr, value, limit)
                    except ReprTimeout:
                        text = timed_out(value)
                    cut = _PREFIX_CUT
                elif cut is not None:
                    text = cut[0]
                elif (t is set or t is frozenset) and (
                        ordered := address_ordered_set_repr(value, limit)) is not None:
                    text = ordered   # address-ordered elements, sorted (reprs.py)
                elif t in built and (len(value) > big or (hit is not None and hit[1] is _LONG)) \
                        and (short := prefix_repr(value, limit)) is not None:
                    text = short   # built only as far as kept (prefix.py): settled, cut
                    cut = _PREFIX_CUT
                    long = text.endswith(MARKER)
                else:
                    text = repr(value)
                    if t in nested_types and \
                            (ordered := nested_ordered_repr(value, text, limit)) is not None:
                        text = ordered   # the same for sets inside it (any inner "{")
            except BaseException as exc:  # a user __repr__, or an int over the str-conversion
                if isinstance(exc, KeyboardInterrupt):  # limit (any exception: see repr_failed)
                    raise
                text = repr_failed(value, exc)
                entry = None  # (that limit is a setting the program may change)
            else:
                if cut is None:
                    if t not in plain:
                        if " at 0x" in text or " id='" in text:
                            text = _ADDRESS.sub("", text)
                        if "<module '" in text:
                            text = _MODULE.sub(r"<module '\1'>", text)
                        if "str_ascii_iterator" in text:
                            text = text.replace("str_ascii_iterator", "str_iterator")
                    if len(text) > limit:
                        text = text[:limit] + MARKER
                        long = t in built
                entry = _entry(value, t, text, cut[1] if cut is not None else 0)
                if entry is None and long:
                    entry = (value, _LONG, 1, 0, None)   # a hint: build this name's next one
            if entry is not None:
                cache[name] = entry
                cached += 1
            elif hit is not None:
                del cache[name]
        loc[name] = text
        if prev is not None and prev.get(name) == text:
            out.append(same.get(name) or _same_key(name))
        else:
            out.append((keys.get(name) or _key(name)) + _json(text))
    if len(cache) > cached:  # a local was deleted: the cache must not keep its value alive
        for name in [k for k in cache if k not in loc]:
            del cache[name]
    js = "{" + ", ".join(out) + "}"
    return loc, (unreserved(js) if "<|" in js or "tool" in js else js)   # (inlined check)


def _park_cache(reprs: dict[int, dict], scope: int) -> None:
    """The repr cache a suspended scope keeps: only values that lead to no other object (scalars,
    tuples and lists of scalars). An iterator's entry, say, would keep what it iterates over
    alive after the generator itself is gone untraced (see ``Recorder.parked``)."""
    cache = reprs.get(scope)
    if cache:
        for name in [k for k, hit in cache.items() if not _leads_nowhere(hit[0])]:
            del cache[name]


def _leads_nowhere(value) -> bool:
    t = type(value)
    return t in _IMMUTABLE or ((t is tuple or t is list)
                               and set(map(type, value)) <= _SCALARS)


_SAME_KEYS: dict[str, str] = {}  # local name -> '"name": ".."'


def _same_key(name: str) -> str:
    if len(_SAME_KEYS) > 100_000:
        _SAME_KEYS.clear()
    text = _SAME_KEYS[name] = (_KEYS.get(name) or _key(name)) + _SAME
    return text


class Recorder:
    """Turns tracer events into frame records and their CWM text, as they happen.

    A record is ``(kind, scope, line, locals, value)`` (``TraceResult.frames`` makes Frame
    objects of them on demand); the text of every record but the first (main's call frame) is
    appended to ``parts`` (of every record, with ``text_from_first``). ``last_scope``/
    ``last_locals`` are the ``..`` rule's state (see :class:`.frames.Renderer`, which renders
    the same text from Frame objects).

    Public for tracers that drive it from hooks of their own (the repository tracer,
    ``stages/tracer_repo``): feed it ``enter`` / ``line`` / ``leave`` / ``exception`` /
    ``unwind`` events of frames whose code has a :class:`.program.CodeInfo` in ``infos``
    (:func:`.program.code_info`); ``lines`` are the source lines events refer to (see
    :meth:`use_lines` for a trace that spans files). It raises :class:`TraceStop` out of an
    event once a limit is hit (then ``too_long`` is set), and ``fail(reason)`` marks a trace
    that cannot be trusted (``broken``); ``recs`` and ``parts`` hold what was recorded.
    """

    __slots__ = ("budget", "lines", "nlines", "infos", "max_events", "max_bytes", "max_repr",
                 "recs", "parts", "nbytes", "scopes", "parked", "orders", "reprs", "next_scope",
                 "last_scope", "last_locals", "active", "too_long", "broken", "jump", "mark",
                 "text_from_first")

    def __init__(self, lines: list[str], infos: dict[int, CodeInfo], limits: TraceLimits, *,
                 text_from_first: bool = False) -> None:
        self.lines = lines
        self.nlines = len(lines)
        self.infos = infos
        self.text_from_first = text_from_first  # the first record's text is in ``parts`` too
        self.max_events = limits.max_events
        self.max_bytes = limits.max_bytes
        self.max_repr = limits.max_repr
        self.recs: list[tuple] = []
        self.parts: list[str] = []
        self.nbytes = 0  # UTF-8 size of parts
        self.scopes: dict[object, int] = {}  # running frame object -> scope id
        # A suspended generator's frame is known by its id only, with its code: held here, it
        # would keep the generator's locals alive after the generator itself is gone (finalised
        # where nothing is traced: inside the tracer's own callback, when reading the caller's
        # f_locals drops the last reference), and a __del__ or weakref callback the program
        # waits for would never run while it is traced. (An id may then be reused: a frame
        # claims a parked scope only if it has the same code and has already started.)
        self.parked: dict[int, tuple[int, object]] = {}  # id(frame) -> (scope id, its code)
        self.orders: dict[int, tuple] = {}  # scope -> (emulated, slot) order of its locals (3.13+)
        self.reprs: dict[int, dict] = {}  # live scope -> its repr cache (see _snapshot)
        self.next_scope = 0
        self.last_scope = -1  # scope of the last record
        self.last_locals: dict[str, str] | None = None  # its locals if a call/line record
        self.active = True  # False once main has finished, a limit was hit or tracing failed
        # events left to the reprs that run the program's code (None: none can)
        self.budget: ReprBudget | None = ReprBudget(self)
        self.too_long = False
        self.broken: str | None = None  # why the trace cannot be trusted
        self.jump: tuple[object, int] | None = None  # (frame, dest) of the last backward jump
        # state before the last scope entry (generator closing), the frame by its id: a frame
        # held here would keep its locals alive past its return (a __del__ or weakref callback
        # due there would run late, changing what the program does; see _forget_frame)
        self.mark: tuple | None = None

    def fail(self, reason: str) -> None:
        self.active = False
        if self.broken is None:
            self.broken = reason

    def use_lines(self, lines: list[str]) -> None:
        """Source lines of the frames of the next events (a trace spanning several files)."""
        self.lines = lines
        self.nlines = len(lines)

    def push(self, rec: tuple, piece: str) -> None:
        recs = self.recs
        if recs or self.text_from_first:
            size = len(piece) if piece.isascii() else len(piece.encode("utf-8", "surrogatepass"))
            if len(recs) >= self.max_events or self.nbytes + size > self.max_bytes:
                self.active = False
                self.too_long = True
                raise TraceStop
            self.nbytes += size
            self.parts.append(piece)
        recs.append(rec)

    def items(self, frame, scope: int):
        """The frame's locals in 3.11's order (3.13+ only, see ``_EMULATE_ORDER``)."""
        cur = frame.f_locals
        names = list(cur)  # slot order
        state = self.orders.get(scope)
        if state is None:
            self.orders[scope] = (names, names)
            return cur.items()
        order, last = state
        if names != last:  # some name was bound or unbound since the last snapshot
            kept = [k for k in order if k in cur]
            seen = set(kept)
            order = kept + [k for k in names if k not in seen]
            self.orders[scope] = (order, names)
        if order == names:
            return cur.items()
        return [(k, cur[k]) for k in order]

    def new_scope(self, frame) -> int:
        scope = self.scopes[frame] = self.next_scope
        self.next_scope += 1
        self.reprs[scope] = {}
        return scope

    def resume_scope(self, frame) -> int | None:
        """The scope of a suspended generator's frame being resumed (see ``parked``), else
        None."""
        parked = self.parked.get(id(frame)) if self.parked else None
        if parked is None or parked[1] is not frame.f_code or \
                not _started(frame, self.infos.get(id(frame.f_code))):
            return None
        del self.parked[id(frame)]
        scope = self.scopes[frame] = parked[0]
        self.reprs.setdefault(scope, {})
        return scope

    def knows(self, frame) -> bool:
        """Is ``frame`` one of this recording's scopes (running, or a suspended generator)?"""
        if frame in self.scopes:
            return True
        parked = self.parked.get(id(frame)) if self.parked else None
        return parked is not None and parked[1] is frame.f_code and \
            _started(frame, self.infos.get(id(frame.f_code)))

    def end_scope(self, frame) -> int:
        scope = self.scopes.pop(frame, -1)
        self.reprs.pop(scope, None)
        if _EMULATE_ORDER:
            self.orders.pop(scope, None)
        return scope

    def line(self, frame, line: int) -> None:
        scope = self.scopes.get(frame)
        if scope is None:
            scope = self.new_scope(frame)
        prev = self.last_locals if self.last_scope == scope else None
        loc, js = _snapshot(self.items(frame, scope) if _EMULATE_ORDER else frame.f_locals.items(),
                            prev, self.max_repr, self.reprs[scope], self.budget)
        self.last_scope = scope
        self.last_locals = loc
        self.push((LINE, scope, line, loc, None),
                  LINE_SEP + js + ACTION_SEP
                  + (self.lines[line - 1] if 0 < line <= self.nlines else "\n") + FRAME_SEP)

    def enter(self, frame, info) -> None:
        """A scope is entered (call frame at its def line) or a generator resumed (call frame at
        the line it resumes at)."""
        self.mark = (id(frame), len(self.recs), len(self.parts), self.nbytes, self.last_scope,
                     self.last_locals, self.next_scope)
        scope = self.scopes.get(frame)
        if scope is None:
            scope = self.resume_scope(frame)
        if scope is None:
            # a generator started before tracing (outside main) resumes where it stopped, as
            # one started inside main does
            line = frame.f_lineno if _resumed(frame, info) else info.def_line
            scope = self.new_scope(frame)
        else:
            line = frame.f_lineno
        loc, js = _snapshot(self.items(frame, scope) if _EMULATE_ORDER else frame.f_locals.items(),
                            None, self.max_repr, self.reprs[scope], self.budget)
        self.last_scope = scope
        self.last_locals = loc
        self.push((CALL, scope, line, loc, None),
                  CALL_SEP + js + ACTION_SEP
                  + (self.lines[line - 1] if 0 < line <= self.nlines else "\n") + FRAME_SEP)

    def _value_frame(self, kind: str, sep: str, scope: int, line: int, value: str) -> None:
        if self.last_scope != scope:
            self.last_scope = scope
            self.last_locals = None
        self.push((kind, scope, line, None, value),
                  sep + ACTION_SEP + (self.lines[line - 1] if 0 < line <= self.nlines else "\n")
                  + ARG_SEP + _enc(value) + FRAME_SEP)

    def leave(self, frame, value, yielded: bool) -> None:
        """A return, or a generator's yield (the scope stays alive)."""
        if yielded:
            scope = self.scopes.pop(frame, -1)
            if scope >= 0:   # suspended: parked by id (see ``parked``)
                self.parked[id(frame)] = (scope, frame.f_code)
                _park_cache(self.reprs, scope)
            self._forget_frame(frame)
            if type(value).__name__ == _WRAPPED:
                value = _unwrapped(value)
        else:
            scope = self.end_scope(frame)
            if scope == 0:
                self.active = False  # main returned: nothing after its return frame
            self._forget_frame(frame)
        self._value_frame(RETURN, RETURN_SEP, scope, frame.f_lineno, self.value_repr(value))

    def exception(self, frame, exc) -> None:
        if isinstance(exc, RecursionError):
            self.fail(TOO_DEEP)
            return
        scope = self.scopes.get(frame)
        if scope is None:
            scope = self.new_scope(frame)
        self._value_frame(EXCEPTION, EXCEPTION_SEP, scope, frame.f_lineno,
                          self.value_repr(exc, exception_repr))

    def value_repr(self, value, write=safe_repr) -> str:
        """``write(value, max_repr)``, within the repr budget if it may run Python code."""
        if self.budget is None or not may_run_python(value):
            return write(value, self.max_repr)
        try:
            return self.budget.run(write, value, self.max_repr)
        except ReprTimeout:
            return timed_out(value)

    def _forget_frame(self, frame) -> None:
        """The frame has ended or is suspended: the recorder keeps no reference to it (nor
        ``mark`` its id, which a later frame may reuse). A frame kept alive past its return keeps its locals alive:
        an object whose ``__del__`` or weakref callback the program sees run there would run
        late, and the trace would show what the program never does untraced."""
        if self.jump is not None and self.jump[0] is frame:
            self.jump = None
        if self.mark is not None and self.mark[0] == id(frame):
            self.mark = None

    def unwind(self, frame) -> None:
        """The frame is left by an exception (its exception frame was already recorded)."""
        scope = self.end_scope(frame)
        if scope == 0:
            self.active = False
        mark = self.mark
        self._forget_frame(frame)
        if mark is not None and mark[0] == id(frame) and len(self.recs) == mark[1] + 2:
            # A generator closed (GeneratorExit thrown in at its yield, or before it started)
            # that ran no line: newer CPythons do not even run such a frame, so drop it.
            rec = self.recs[-1]
            if rec[0] == EXCEPTION and rec[4].startswith("GeneratorExit("):
                del self.recs[mark[1]:], self.parts[mark[2]:]
                self.nbytes = mark[3]
                self.last_scope, self.last_locals = mark[4], mark[5]
                self.next_scope = mark[6]
        self.mark = None


# --------------------------------------------------------------------------- sys.settrace


def _run_settrace(rec: Recorder, main):
    infos = rec.infos
    line = rec.line
    raised: set = set()  # frames with an exception event and no line event since

    def local(frame, event, arg):
        if not rec.active:
            return None
        try:
            if event == "line":
                if raised:
                    raised.discard(frame)
                line(frame, frame.f_lineno)
            elif event == "return":
                op = infos[id(frame.f_code)].code_bytes[frame.f_lasti]
                if frame in raised:  # leaving by an exception (its frame is already recorded)
                    raised.discard(frame)
                    if op not in RETURN_OPS:
                        rec.unwind(frame)
                        return local
                if op in RETURN_OPS:
                    rec.leave(frame, arg, False)
                elif op in YIELD_OPS:
                    rec.leave(frame, arg, True)
                else:  # unwinding after a re-raise (end of a finally block)
                    rec.unwind(frame)
            elif event == "exception":
                if arg[0] is StopIteration and \
                        infos[id(frame.f_code)].code_bytes[frame.f_lasti] in SEND_OPS:
                    return local  # the sub-iterator of a ``yield from``/``await`` finished
                raised.add(frame)
                rec.exception(frame, arg[1])
        except Exception as exc:  # (RecursionError: no stack left for the tracer)
            rec.fail(_tracer_failure(exc))
            return None
        return local

    def glob(frame, event, arg):
        if event != "call" or not rec.active:
            return None
        info = infos.get(id(frame.f_code))
        if info is None:
            return None  # not the program's code: not traced, nor anything it calls directly
        try:
            rec.enter(frame, info)
        except Exception as exc:
            rec.fail(_tracer_failure(exc))
            return None
        return local

    # While main runs, the program sees sys.settrace/gettrace as it would untraced: no trace
    # function (gettrace() is None, not ours, whose name would show in its locals), and
    # settrace(None) removes nothing. It used to remove the tracer: a program that saved
    # gettrace(), set None and put it back ran those lines untraced, and its trace, a gap in
    # it, was kept as "ok". A trace function of the program's own would see (and could
    # change) the events: that trace is invalid.
    real_settrace, real_gettrace = sys.settrace, sys.gettrace

    def settrace(function):
        if function is not None:
            rec.fail("the program installed a trace function of its own (sys.settrace)")
            real_settrace(function)

    def gettrace():
        function = real_gettrace()
        return None if function is glob else function

    previous = real_gettrace()
    real_settrace(glob)
    sys.settrace, sys.gettrace = settrace, gettrace
    try:
        return main()
    finally:
        sys.settrace, sys.gettrace = real_settrace, real_gettrace
        # CPython drops a trace function that raised (our TraceStop); anything else that
        # removed it is the program (C code calling PyEval_SetTrace, not sys.settrace): the
        # rest of its run went unrecorded.
        if real_gettrace() is not glob and not rec.too_long and rec.active:
            rec.fail("the program replaced the tracer (sys.settrace)")
        real_settrace(previous)


# --------------------------------------------------------------------------- sys.monitoring


def _acquire_tool() -> int | None:
    mon = sys.monitoring
    for tool in (3, 4, 5, 2, 1, 0):  # unnamed ids first (0/1/2/5: debugger/coverage/profiler/opt)
        if mon.get_tool(tool) is None:
            try:
                mon.use_tool_id(tool, _TOOL_NAME)
            except ValueError:
                continue
            return tool
    return None


def _run_monitoring(rec: Recorder, main, prog: Program, tool: int):
    mon = sys.monitoring
    ev = mon.events
    DISABLE = mon.DISABLE
    infos = rec.infos
    getframe = sys._getframe
    get_ident = threading.get_ident
    tid = get_ident()
    line = rec.line

    def on_start(code, offset):
        if rec.active and get_ident() == tid:
            try:
                rec.enter(getframe(1), infos[id(code)])
            except Exception as exc:
                rec.fail(_tracer_failure(exc))

    def on_throw(code, offset, exc):
        info = infos.get(id(code))
        if info is not None and rec.active and get_ident() == tid:
            try:
                rec.enter(getframe(1), info)
            except Exception as exc:
                rec.fail(_tracer_failure(exc))

    def on_return(code, offset, value):
        if rec.active and get_ident() == tid:
            try:
                rec.leave(getframe(1), value, False)
            except Exception as exc:
                rec.fail(_tracer_failure(exc))

    def on_yield(code, offset, value):
        if rec.active and get_ident() == tid:
            try:
                rec.leave(getframe(1), value, True)
            except Exception as exc:
                rec.fail(_tracer_failure(exc))

    def on_line(code, lineno):
        if not rec.active or get_ident() != tid:
            # (never DISABLE here: the program's code objects are cached and reused)
            if rec.too_long and get_ident() == tid:
                raise TraceStop  # the program swallowed the first one
            return None
        frame = getframe(1)
        jump = rec.jump
        if jump is not None:
            rec.jump = None
            if jump[0] is frame and frame.f_lasti == jump[1]:
                return None  # already recorded for the backward jump that led here
        try:
            line(frame, lineno)
        except Exception as exc:
            rec.fail(_tracer_failure(exc))

    def on_jump(code, src, dest):
        if dest > src:
            return DISABLE
        info = infos[id(code)]
        if info.code_bytes[src] == _NO_INTERRUPT:  # yield-from/await loop: no line (as 3.11)
            return DISABLE
        if rec.active and get_ident() == tid:
            frame = getframe(1)
            try:
                line(frame, info.line_of(dest))
            except Exception as exc:
                rec.fail(_tracer_failure(exc))
                return None
            rec.jump = (frame, dest)
        return None

    def on_raise(code, offset, exc):
        if rec.active and id(code) in infos and get_ident() == tid:
            try:
                rec.exception(getframe(1), exc)
            except Exception as exc:
                rec.fail(_tracer_failure(exc))

    def on_unwind(code, offset, exc):
        if rec.active and id(code) in infos and get_ident() == tid:
            try:
                rec.unwind(getframe(1))
            except Exception as exc:
                rec.fail(_tracer_failure(exc))

    callbacks = {ev.PY_START: on_start, ev.PY_RESUME: on_start, ev.PY_RETURN: on_return,
                 ev.PY_YIELD: on_yield, ev.LINE: on_line, ev.JUMP: on_jump,
                 ev.RAISE: on_raise, ev.PY_UNWIND: on_unwind, ev.PY_THROW: on_throw}
    local = ev.PY_START | ev.PY_RESUME | ev.PY_RETURN | ev.PY_YIELD | ev.LINE | ev.JUMP
    try:
        for event, cb in callbacks.items():
            mon.register_callback(tool, event, cb)
        for code in prog.codes:
            mon.set_local_events(tool, code, local)
        # exception events cannot be local: filtered by the ``id(code) in infos`` checks
        mon.set_events(tool, ev.RAISE | ev.PY_UNWIND | ev.PY_THROW)
        return main()
    finally:
        if mon.get_tool(tool) == _TOOL_NAME:  # (unless the program freed it)
            mon.set_events(tool, 0)
            for code in prog.codes:
                mon.set_local_events(tool, code, 0)
            for event in callbacks:
                mon.register_callback(tool, event, None)
            mon.free_tool_id(tool)
        else:
            rec.fail("the program released the tracer's sys.monitoring tool id")


# --------------------------------------------------------------------------- entry point


def _may_hook_reprs(prog: Program) -> bool:
    """Can a repr the tracer asks for run the program's code? Only through a class of its own
    (a __repr__, __getattr__, property, __lt__ of counts...): one with a class statement, or
    one made by a call such as type(name, bases, namespace). (The words anywhere in the text,
    a comment's too: a false alarm costs time, never text.)"""
    context = prog.context
    return any(word in context for word in _CLASS_MAKERS)


_CLASS_MAKERS = ("class", "type(", "make_dataclass", "namedtuple", "Enum(")


def _go_on_untraced(rec: Recorder, reference: untraced.Reference) -> bool:
    """Fork the untraced reference run (untraced.py); in the fork, stop recording: the program
    goes on untraced (True: no repr runs there until it ends)."""
    if not reference.fork():
        return False
    rec.active = False
    rec.max_events = rec.max_bytes = sys.maxsize   # (the frame being recorded: no TraceStop)
    return True


def _outcome(rec: Recorder, run) -> tuple[str, str | None, str | None, bool]:
    """How ``run()`` (main) ends: ("ok", its value's repr, None) or ("exception", None, its
    text) (a TraceStop: "ok", None, None, the trace is too_long); and whether a repr the tracer
    asked for ran Python code meanwhile (the result's own repr runs once the program has ended:
    it changes nothing the program does)."""
    budget = rec.budget
    try:
        value = run()
    except TraceStop:
        return "ok", None, None, False
    except BaseException as exc:  # uncaught, as Python ends a program: any exception class
        if isinstance(exc, KeyboardInterrupt):   # of the program's too (KeyboardInterrupt goes
            raise                                # through: it is the caller's, in-process)
        if budget is not None:
            budget.program_ended()
        return "exception", None, error_text(exc), budget is not None and budget.ran
    if budget is None:
        return "ok", rec.value_repr(value), None, False
    budget.program_ended()
    return "ok", rec.value_repr(value), None, budget.ran


def trace_call(code: str, call: str, *, entry_filename: str = "<program>",
               limits: TraceLimits = TraceLimits(), module_name: str = "__main__",
               backend: str | None = None) -> TraceResult:
    """Trace ``main()`` where ``main`` returns ``call`` evaluated after ``code``'s module body.

    The module body runs untraced, as ``module_name`` (``if __name__ == "__main__":`` blocks
    run too: pass another name to skip them). ``backend`` is "monitoring" (3.12+ default) or
    "settrace" (3.11 default; also usable on 3.12+, for comparison).
    """
    try:
        prog = compile_program(code, call, entry_filename)
    except InvalidProgram as exc:
        return TraceResult(status="invalid", error=str(exc))
    result = TraceResult(status="ok", prompt=prompt_for(prog.context))
    namespace = {"__name__": module_name, "__builtins__": builtins}
    if prog.rewritten:
        namespace[ITER_NAME] = iter
    try:
        for module in prog.modules:
            exec(module, namespace)
    except BaseException as exc:  # (a class of the program's may derive from BaseException)
        if isinstance(exc, KeyboardInterrupt):
            raise
        result.status, result.error = "invalid", "module body raised " + error_text(exc)
        return result
    main = namespace.get("main")
    if getattr(main, "__code__", None) is not prog.main_code:
        result.status, result.error = "invalid", "the module body rebound 'main'"
        return result

    rec = Recorder(prog.lines, prog.infos, limits)
    reference = None   # the untraced run, from the first repr that runs Python code
    if not _may_hook_reprs(prog):
        rec.budget = None   # (no repr can run its code: no guard to pay for, see guard.py)
    else:
        reference = untraced.Reference()
        rec.budget.before_first = lambda: _go_on_untraced(rec, reference)
    if backend is None:
        backend = "monitoring" if HAS_MONITORING else "settrace"
    tool = _acquire_tool() if backend == "monitoring" else None
    ending = None
    compare = False   # with the untraced run (a repr ran Python code, the trace is whole)
    try:
        if tool is not None:
            ending = _outcome(rec, lambda: _run_monitoring(rec, main, prog, tool))
        else:
            ending = _outcome(rec, lambda: _run_settrace(rec, main))
    finally:
        if reference is not None:
            if reference.in_fork:   # the untraced run: it ends here, never back to the caller
                reference.report(ending[:3] if ending is not None else None)
            written = reference.written()
            compare = ending is not None and ending[3] and not rec.too_long and \
                rec.broken is None
            if not compare:
                reference.close()
    result.status, result.result, result.error = ending[:3]
    if rec.too_long:
        result.status, result.result = "too_long", None
        result.error = (f"trace over its limits (max_events={limits.max_events}, "
                        f"max_bytes={limits.max_bytes})")
    elif rec.broken is not None:
        result.status, result.result = "invalid", None
        result.error = "untraceable: " + rec.broken
    elif compare and (wrong := reference.verdict([*ending[:3], written])):
        result.status, result.result, result.error = "invalid", None, wrong
    result._records = rec.recs
    result._lines = rec.lines
    result.events = len(rec.recs)
    result.text = "".join(rec.parts)
    return result
