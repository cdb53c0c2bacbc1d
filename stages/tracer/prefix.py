"""Reprs of large containers built only as far as the text a trace keeps.

A trace keeps the first ``limit`` characters of a value's repr (``reprs.safe_repr``), but a
plain ``repr`` writes all of it: a local set of 100k ints, repr'd at every line of a loop, made
a trace 600 times slower than the program. :func:`prefix_repr` writes lists, tuples, dicts,
sets, frozensets, OrderedDicts, defaultdicts, Counters and deques (nested too) the way CPython
writes them, element by element, and stops once the scrubbed text is settled past ``limit``
(:func:`.reprs.settled_scrub`): the same text, truncated, as ``safe_repr`` gives from the whole
repr; a value under the limit gets the whole text, the same as ``safe_repr``'s.

What ``safe_repr`` adds to a plain repr is kept: sets whose order may follow addresses, within
lists, tuples, dicts and defaultdicts (``reprs.NESTED_TYPES``) down to ``reprs._SEARCH_DEPTH``
levels, are written sorted (``reprs.address_ordered_set_repr``).

CPython writes ``[...]`` for a container whose repr is already in progress on this thread
(``Py_ReprEnter``): a user ``__repr__`` called from here may reach a container this builder is
writing, so the builder registers its containers in CPython's own list of reprs in progress
(found once per thread, :func:`_reprs_in_progress`), and a user repr sees exactly what it sees
under a plain repr.

Left to the plain repr: the elements a value's text does not reach are never repr'd, so a
``__repr__`` of theirs that raises (or has side effects) no longer shows; the text of a value
over the limit is the truncated text it would have had.
"""

from __future__ import annotations

import gc
import sys
import threading
from collections import Counter, OrderedDict, defaultdict, deque
from operator import is_

from . import reprs

_COUNTER_REPR = Counter.__repr__   # a program may replace it: then the plain repr
BUILT = reprs.BUILT
_TEXT = (str, bytes)
_SHORT = frozenset({int, float, bool, type(None)})   # (an int has at most 4300 digits)
_LONG_TEXT = 64        # a str/bytes element longer than this is written from a prefix
_MAX_DEPTH = 24        # containers deeper than this: their plain repr (Python stack use)
_SLACK = 32            # characters built past the limit before the text is checked
_OD_PAIRS = sys.version_info < (3, 12)   # OrderedDict([(k, v)]); 3.12+: OrderedDict({k: v})


class _Full(Exception):
    """The settled text has passed the limit: the rest would be truncated away."""


class _Unsettled(Exception):
    """A cut element (a long str) left the text unsettled below the limit: take the plain repr."""


_IN_PROGRESS: dict[int, list] = {}


def _reprs_in_progress() -> list:
    """CPython's per-thread list of objects whose repr is in progress (Py_ReprEnter's), found as
    the one list that holds a probe while the probe's repr runs; a private list if not found."""
    ident = threading.get_ident()
    found = _IN_PROGRESS.get(ident)
    if found is None:
        probe: list = []
        seen: list = []

        class _Probe:
            def __repr__(self) -> str:
                seen.extend(r for r in gc.get_referrers(probe)
                            if type(r) is list and r and r[-1] is probe)
                return ""

        probe.append(_Probe())
        repr(probe)
        found = _IN_PROGRESS[ident] = seen[0] if len(seen) == 1 else []
    return found


def looks_long(value, limit: int) -> bool:
    """Could the repr of this container pass ``limit``? (More elements within a few levels than
    the limit has characters, or a long str/bytes among them: C calls only, cheap for small
    values; a wrong guess costs time, never a different text.)"""
    if len(value) > reprs._BIG:
        return True
    children = gc.get_referents(value)
    if set(map(type, children)) <= _SHORT:   # (the common case, first)
        return False
    level, total = [value], 0
    for _ in range(3):
        children = gc.get_referents(*level)
        total += len(children)
        if total > limit:
            return True
        kinds = set(map(type, children))
        if not kinds.isdisjoint(_TEXT) and any(
                len(c) > limit for c in children if type(c) is str or type(c) is bytes):
            return True
        if kinds.isdisjoint(BUILT):
            return False
        level = [c for c in children if type(c) in BUILT]
        if sum(map(len, level)) > limit:
            return True
    return False


def prefix_repr(value, limit: int) -> str | None:
    """``safe_repr(value, limit)`` for a container of a :data:`BUILT` type, its text built only
    as far as needed (built again with its long strs whole if a cut one left the text unsettled:
    scrubbing removed much of it); None when the container changed size while being written:
    the caller takes the plain repr. Raises what an element's repr raises. A set or frozenset
    whose order may follow addresses must have been written by ``address_ordered_set_repr``."""
    t = type(value)
    if t is Counter and Counter.__repr__ is not _COUNTER_REPR:
        return None
    for cut_text in (True, False):
        out = _Builder(limit, cut_text)
        try:
            out.value(value, t in reprs.NESTED_TYPES, 0)
            break
        except _Full:
            return out.settled[:limit] + reprs.MARKER
        except _Unsettled:   # build it again, its long strs whole
            continue
        except RuntimeError:   # resized while iterated
            return None
    text = reprs.scrub("".join(out.parts))
    return text[:limit] + reprs.MARKER if len(text) > limit else text


class _Builder:
    """The repr of a value written into ``parts`` as CPython writes it (raw: scrubbed at the end,
    as a plain repr is), raising ``_Full`` once the scrubbed text is settled past ``limit``."""

    __slots__ = ("parts", "size", "limit", "goal", "slack", "settled", "cut", "cut_text",
                 "active")

    def __init__(self, limit: int, cut_text: bool) -> None:
        self.parts: list[str] = []
        self.size = 0
        self.limit = limit
        self.slack = _SLACK
        self.goal = limit + _SLACK
        self.settled = ""
        self.cut = False          # has a long str/bytes been written from a prefix?
        self.cut_text = cut_text  # may one be?
        self.active = _reprs_in_progress()

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.size += len(text)
        if self.size > self.goal:
            self.check()

    def check(self) -> None:
        raw = "".join(self.parts)
        self.parts = [raw]
        self.settled = reprs.settled_scrub(raw)
        if len(self.settled) > self.limit:
            raise _Full
        if self.cut:
            raise _Unsettled
        self.slack *= 2   # (scrubbing shortened it: build on, checking less often)
        self.goal = self.size + self.slack

    def entered(self, v) -> bool:
        """Py_ReprEnter: True if ``v``'s repr is in progress (write it as a cycle); else
        registers it (the caller must :meth:`leave`)."""
        active = self.active
        if any(map(is_, active, [v] * len(active))):
            return True
        active.append(v)
        return False

    def leave(self, v) -> None:
        active = self.active
        for i in range(len(active) - 1, -1, -1):
            if active[i] is v:
                del active[i]
                return

    def value(self, v, zone: bool, depth: int) -> None:
        """Write ``v``; ``zone``: are sets here written sorted when their order may follow
        addresses (see the module docstring)?"""
        t = type(v)
        if t not in BUILT or depth > _MAX_DEPTH or (
                t is Counter and Counter.__repr__ is not _COUNTER_REPR):
            if (t is str or t is bytes) and self.cut_text and \
                    len(v) > _LONG_TEXT + self.goal - self.size:
                self.text_prefix(v, t)
            else:
                self.add(repr(v))
            return
        if zone and (t is set or t is frozenset) and depth:
            ordered = reprs.address_ordered_set_repr(v, self.limit)
            if ordered is not None:
                self.add(ordered)
                return
        inner = zone and t in reprs.NESTED_TYPES and depth < reprs._SEARCH_DEPTH
        if t is list:
            self.container(v, "[", "]", "[...]", inner, depth)
        elif t is tuple:
            self.container(v, "(", ",)" if len(v) == 1 else ")", "(...)", inner, depth)
        elif t is dict:
            self.container(v, "{", "}", "{...}", inner, depth, pairs=True)
        elif t is set or t is frozenset:
            name = t.__name__
            if not v:
                self.add(name + "()")
            elif t is set:
                self.container(v, "{", "}", "set(...)", False, depth)
            else:
                self.container(v, "frozenset({", "})", "frozenset(...)", False, depth)
        elif t is defaultdict:
            self.default_dict(v, inner, depth)
        elif t is deque:
            tail = ")" if v.maxlen is None else f", maxlen={v.maxlen})"
            if self.entered(v):
                self.add("[...]")
                return
            try:
                self.add("deque(")
                self.container(v, "[", "]" + tail, None, False, depth)
            finally:
                self.leave(v)
        elif t is OrderedDict:
            self.ordered_dict(v, depth)
        else:  # Counter: a repr in Python that writes a new dict, most common first
            if not v:
                self.add("Counter()")
                return
            try:
                items = v.most_common()
            except TypeError:   # counts that do not compare: insertion order (as Counter does)
                items = v.items()
            self.joined(items, "Counter({", "})", False, depth, True)

    def text_prefix(self, s, t) -> None:
        """The start of a long str's (bytes') repr, enough characters to pass the goal: the
        quote the whole repr uses (' unless the text has ' and no "), then the escaped prefix
        (escaped under that quote: the other quote appended forces it)."""
        single, double = ("'", '"') if t is str else (b"'", b'"')
        quote = double if (single in s and double not in s) else single
        other = single if quote is double else double
        head = repr(s[:self.goal - self.size + self.limit] + other)
        self.cut = True
        self.add(head[:-2])   # (past the goal: settled past the limit, _Full, or _Unsettled)

    def container(self, v, open_: str, close: str, cycle: str | None, zone: bool, depth: int,
                  pairs: bool = False) -> None:
        """v's items (its key: value pairs when `pairs`) between open_ and close; `cycle` is
        what repr writes for v met inside itself (None: a type that cannot hold itself)."""
        if cycle is not None:
            if not v:
                self.add(open_ + close)
                return
            if self.entered(v):
                self.add(cycle)
                return
        try:
            self.joined(v.items() if pairs else v, open_, close, zone, depth, pairs)
        finally:
            if cycle is not None:
                self.leave(v)

    def joined(self, items, open_: str, close: str, zone: bool, depth: int,
               pairs: bool) -> None:
        """``open_``, the items joined by ", ", ``close``: each item a value, or (``pairs``) a
        (key, value) pair written ``key: value``."""
        self.add(open_)
        first = True
        for item in items:
            if first:
                first = False
            else:
                self.add(", ")
            if pairs:
                self.value(item[0], zone, depth + 1)
                self.add(": ")
                self.value(item[1], zone, depth + 1)
            else:
                self.value(item, zone, depth + 1)
        self.add(close)

    def default_dict(self, v, zone: bool, depth: int) -> None:
        """``defaultdict(factory, {...})``: CPython writes the dict part first (the defaultdict
        in progress), then the factory (the factory in progress, shown ``...`` in a cycle)."""
        factory = v.default_factory
        if factory is None:
            head = "None"
        elif self.entered(factory):
            head = "..."
        else:
            try:
                head = repr(factory)
            finally:
                self.leave(factory)
        self.add(f"defaultdict({head}, ")
        self.container(v, "{", "})", "{...})", zone, depth, pairs=True)

    def ordered_dict(self, v, depth: int) -> None:
        if not v:
            self.add("OrderedDict()")
            return
        if self.entered(v):
            self.add("...")
            return
        try:
            if not _OD_PAIRS:
                self.joined(v.items(), "OrderedDict({", "})", False, depth, True)
                return
            self.add("OrderedDict([")
            first = True
            for k, x in v.items():
                self.add("(" if first else ", (")
                first = False
                self.value(k, False, depth + 2)
                self.add(", ")
                self.value(x, False, depth + 2)
                self.add(")")
            self.add("])")
        finally:
            self.leave(v)
