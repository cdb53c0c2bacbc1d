"""Reprs for trace frames: address-free, never raising, bounded in length.

A trace is training data, so the same program must give the same text on every run and every
machine. Three things in a plain ``repr`` break that or blow up the size:

* memory addresses (``<foo.Bar object at 0x7f3a...>``): every `` at 0x<hex>`` followed by
  ``>``, ``;``, ``:``, ``,``, ``)`` or a space is removed, giving ``<foo.Bar object>``,
  ``<function f>``, ``<list_iterator object>``, ``<generator object gen>``, ``<weakref; to 'A'>``,
  ``<weakproxy to A>``, ``<Future state=pending>``; and unittest.mock's decimal ids, every
  `` id='<digits>'`` before ``>``: ``<MagicMock name='m.x'>``;
* where a module was loaded from (``<module 'json' from '/usr/lib/python3.11/json/...'>``, a
  host path) or how (``(frozen)``, ``(built-in)``: how Python was built): ``<module 'json'>``;
* Python 3.11+'s ``str_ascii_iterator`` (an implementation detail of ASCII strings): written
  ``str_iterator``, the name CWM's own traces use for iterating a ``str``;
* sets whose order may follow addresses (an element hashed by identity, or by a ``__hash__``
  of its own class, which may be object's underneath, or a float/complex/Decimal NaN, which
  hashes by identity too): elements sorted by their address-free reprs, at top level and
  inside lists, tuples, dicts and defaultdicts (see ``nested_ordered_repr``);
* very long values: the first ``limit`` characters are kept and ``...<truncated>`` is
  appended. A long list or tuple of scalars is not repr'd whole: its repr is built element by
  element only until it passes the limit (the same prefix, a fraction of the cost: such a local
  is repr'd at every frame); nor is any other long container (dicts, sets, deques, nested
  ones: prefix.py).

A ``__repr__`` that raises gives ``<repr of TypeName raised ExcName>`` instead of failing the
trace. A top-level str or bytes is never scrubbed (its text is the user's data); inside a
container only text matching the address pattern above would be.
"""

from __future__ import annotations

import cmath
import enum
import gc
import math
import re
import sys
from collections import Counter, OrderedDict, defaultdict, deque
from itertools import compress

from .guard import ReprTimeout

DEFAULT_MAX_REPR = 200
# The containers prefix.py writes as far as kept (their long ones are never repr'd whole).
BUILT = frozenset({list, tuple, dict, set, frozenset, OrderedDict, defaultdict, Counter, deque})

# " at 0x7f3a..." before the end of a repr, a separator or more words: <f at 0x..>,
# <weakref at 0x..; to ..>, <cell at 0x..: int object at 0x..>, <weakproxy at 0x.. to A>,
# <Future at 0x.. state=pending>. Not before a quote, so a str ending so inside a list stays.
# unittest.mock writes its objects' ids in decimal, last: <MagicMock name='m.x' id='1403..'>.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+(?=[>;:,) ])| id='[0-9]+'(?=>)")
# Where a module was loaded from (a host path: the interpreter's install prefix, which differs
# between machines) or how (frozen or built-in: how Python was built): <module 'json'> only.
_MODULE = re.compile(r"<module '([^'\\]*)' (?:from '[^']*'|\((?:frozen|built-in)\)|"
                     r"\(namespace\) from \[[^\]]*\])>")
# Types whose repr never carries an address: skip the scrub checks for them.
_PLAIN = frozenset({int, float, bool, complex, type(None), str, bytes})


MARKER = "...<truncated>"
_SCALARS = frozenset({int, float, bool, complex, type(None), str, bytes})
_BIG = 64  # elements: below this the whole repr is cheap


def cut_short(text: str) -> bool:
    """Whether text the tracer wrote (a repr, a frame) holds a value cut at its limit (MARKER
    appended): such a text is not the value's repr, so no answer can be checked against it
    exactly. RL's tasks, evaluation and SFT's output documents (stages/rl_tasks.py,
    stages/evaluate.py, stages/documents.py) do not ask it."""
    return MARKER in text


def truncate(text: str, limit: int = DEFAULT_MAX_REPR) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + MARKER


def long_sequence_repr(value: object, limit: int) -> str | None:
    """``truncate(repr(value), limit)`` for a long list/tuple of scalars, without the whole
    repr; None when that shortcut does not apply (then the caller takes the plain repr)."""
    cut = long_sequence_prefix(value, limit)
    return None if cut is None else cut[0]


def long_sequence_prefix(value: object, limit: int) -> tuple[str, int] | None:
    """:func:`long_sequence_repr` and the number of leading elements its text depends on: the
    same text stands for any list/tuple of that type whose first elements are these objects."""
    t = type(value)
    if (t is not list and t is not tuple) or len(value) <= _BIG:
        return None
    parts, size, texts = [], 1, False
    try:
        for e in value:
            te = type(e)
            if te not in _SCALARS:
                return None
            r = repr(e)
            parts.append(r)
            texts = texts or te is str or te is bytes
            size += len(r) + 2
            if size > limit + 2:  # the whole repr is longer than the limit
                text = ("[" if t is list else "(") + ", ".join(parts)
                if texts:   # (text inside a container is scrubbed: see scrub)
                    text = settled_scrub(text)
                    if len(text) <= limit:
                        return None
                return text[:limit] + MARKER, len(parts)
    except (ValueError, RuntimeError):  # an int over the str-conversion limit; a list resized
        return None
    return None


def repr_failed(value: object, exc: BaseException) -> str:
    """Placeholder for a ``__repr__`` that raised (also: an int too long for ``str``). Any
    exception counts, a class of the program's deriving from BaseException (or SystemExit) too:
    the tracer called that ``__repr__``, not the program, so it must not reach the program
    (only KeyboardInterrupt passes: in-process, it is the caller's)."""
    return f"<repr of {type(value).__qualname__} raised {type(exc).__name__}>"


def scrub(text: str) -> str:
    """Remove memory addresses, module origins and version-specific iterator names from a
    repr."""
    if " at 0x" in text or " id='" in text:
        text = _ADDRESS.sub("", text)
    if "<module '" in text:
        text = _MODULE.sub(r"<module '\1'>", text)
    if "str_ascii_iterator" in text:
        text = text.replace("str_ascii_iterator", "str_iterator")
    return text


# Hashes computed from the value alone (str and bytes under the sandbox's PYTHONHASHSEED=0):
# a set of these iterates in the same order on every run. (None is not one on 3.11: its hash
# is its address, and so is an empty range's, which hashes None.) A class's own __hash__ is
# not trusted: more-itertools' tests hash a str subclass with `super.__hash__(self)`, the
# address again.
_VALUE_HASHES = {t.__hash__ for t in (int, float, complex, str, bytes)}
_VALUE_HASHES |= {enum.Enum.__hash__}   # hash(member name)
# Standard-library types hashed from their value too: Fraction and timedelta (ints), Decimal
# (its value; but a NaN hashes by identity), date/datetime/time (their bytes, through the
# bytes hash: fixed by the pinned seed like str's; an aware one hashes its UTC fields). Their
# modules are not imported here (a sandbox start would pay for them): a set can hold one only
# once its module is loaded, and then its __hash__ joins _VALUE_HASHES at first sight.
_LATER = (("fractions", "Fraction"), ("decimal", "Decimal"), ("datetime", "date"),
          ("datetime", "datetime"), ("datetime", "time"), ("datetime", "timedelta"))
# Value hashes but for a NaN, which hashes by identity (3.10+): hash -> "is this one a NaN?"
# (C functions: no user code runs). Decimal's joins when its module is loaded.
_NAN_CHECKS = {float.__hash__: math.isnan, complex.__hash__: cmath.isnan}


def _later_value_hash(h) -> bool:
    """Is ``h`` the __hash__ of one of the loaded ``_LATER`` types? (Remembered if so.)"""
    for module, name in _LATER:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and cls.__hash__ is h:
            _VALUE_HASHES.add(h)
            if name == "Decimal":
                _NAN_CHECKS[h] = cls.is_nan
            return True
    return False


def _hash_may_follow_address(e: object, depth: int = 0) -> bool:
    h = type(e).__hash__
    if h in _VALUE_HASHES:
        nan = _NAN_CHECKS.get(h)
        return nan is not None and nan(e)
    if h is tuple.__hash__ or h is frozenset.__hash__:
        return depth >= 8 or any(_hash_may_follow_address(x, depth + 1) for x in e)
    if _later_value_hash(h):
        nan = _NAN_CHECKS.get(h)
        return nan is not None and nan(e)
    return True


def address_ordered_set_repr(value: object, limit: int) -> str | None:
    """A set or frozenset whose elements' hashes may be addresses iterates in address order,
    which differs from run to run and machine to machine: its elements are written sorted by
    their address-free reprs instead (a str element's too: it sits inside a container), the
    text cut at ``limit``. None for any other value."""
    t = type(value)
    if (t is not set and t is not frozenset) or not value:
        return None
    try:
        if not _set_may_follow_addresses(value):
            return None
        inner = "{" + ", ".join(sorted(scrub(safe_repr(e, limit)) for e in value)) + "}"
    except RuntimeError:   # resized while iterating (another thread)
        return None
    return truncate(inner if t is set else f"frozenset({inner})", limit)


def _set_may_follow_addresses(value) -> bool:
    """``any(map(_hash_may_follow_address, value))``, deciding by the elements' types alone
    where it can (a set of ints, strs, dates: one look per type, not per element)."""
    for t in set(map(type, value)):
        h = t.__hash__
        if h not in _VALUE_HASHES or h in _NAN_CHECKS:
            return any(map(_hash_may_follow_address, value))
    return False


# Sets inside lists, tuples, dicts and defaultdicts (at any depth: dict keys and values,
# nested containers) follow the same rule. A search first finds them, within bounds: this many
# container levels deep, this many elements in all; past the element bound (undecided) the
# text is rebuilt (prefix.py, which decides each set as it reaches it, and writes only the first
# ``limit`` characters).
_CONTAINERS = frozenset({list, tuple, dict, defaultdict})
NESTED_TYPES = _CONTAINERS   # the types nested_ordered_repr may rewrite
_SETS = frozenset({set, frozenset})
_SEARCH_DEPTH = 8
_SEARCH_ELEMENTS = 4096


def _of_types(objs: list, types: frozenset) -> list:
    return list(compress(objs, map(types.__contains__, map(type, objs))))


def _address_ordered_sets(value: object) -> set[int] | None:
    """Ids of the sets and frozensets inside the container ``value`` (within the search depth)
    whose iteration order may follow addresses; None when there are more elements than the
    search looks at (undecided). Level by level, through ``gc.get_referents`` (the elements of
    lists and tuples, the values and non-str keys of dicts, the elements of sets): C loops,
    where a walk in Python would cost more than the repr itself at every frame."""
    found: set[int] = set()
    level = [value]
    budget = _SEARCH_ELEMENTS
    for _ in range(_SEARCH_DEPTH):
        children = gc.get_referents(*level)
        budget -= len(children)
        if budget < 0:
            return None
        kinds = set(map(type, children))
        if not kinds.isdisjoint(_SETS):
            sets = _of_types(children, _SETS)
            elements = gc.get_referents(*sets)
            budget -= len(elements)
            if budget < 0:
                return None
            if _set_may_follow_addresses(elements):
                found.update(id(x) for x in sets if _set_may_follow_addresses(x))
        if kinds.isdisjoint(_CONTAINERS):
            break
        level = _of_types(children, _CONTAINERS)
    return found


def _may_show_a_set(t: type, text: str) -> bool:
    """Can ``text``, the repr of a ``t``, show a set inside? A set shows as a "{" of its own:
    the common tables and matrices with none skip the search."""
    if t is dict:
        return text.find("{", 1) >= 0
    if t is defaultdict:
        return text.count("{") > 1
    return (t is list or t is tuple) and "{" in text


def nested_ordered_repr(value: object, text: str, limit: int) -> str | None:
    """The address-free repr of a list, tuple, dict or defaultdict holding a set whose order may
    follow addresses, that set's elements sorted, cut at ``limit`` as ``truncate`` cuts. None
    for any other value: its plain repr ``text`` is already as deterministic as its contents."""
    if not _may_show_a_set(type(value), text):
        return None
    try:
        ordered = _address_ordered_sets(value)
    except RuntimeError:   # resized while iterating (another thread)
        return None
    if ordered is not None and not ordered:
        return None
    return _prefix.prefix_repr(value, limit)   # (writes each such set sorted)


def settled_scrub(raw: str) -> str:
    """The longest prefix of ``scrub(raw + rest)`` that no ``rest`` can change: ``raw`` is the
    start of a repr being built (prefix.py). Cut before a match that ``rest`` may complete or
    extend (an address whose hex digits run to the end, a module repr not closed, a name cut
    short)."""
    n = len(raw)
    for word, tail in _ADDRESS_WORDS:
        i = raw.rfind(word)
        if i >= 0 and all(c in tail for c in raw[i + len(word):]):
            n = min(n, i)
        else:
            n = min(n, _before_partial(raw, len(raw), word))
    text = _ADDRESS.sub("", raw) if " at 0x" in raw or " id='" in raw else raw
    n = len(text) - (len(raw) - n)   # (nothing from n on matched: it is raw's tail, unchanged)
    if "<module '" in text:
        pos = 0
        while (i := text.find("<module '", pos, n)) >= 0:
            m = _MODULE.match(text, i)
            if m is not None and m.end() <= n:
                pos = m.end()
            elif m is None and not _MODULE_START.fullmatch(text, i, n):
                pos = i + 1   # (not a module repr, whatever follows)
            else:
                n = i
                break
    n = _before_partial(text, n, "<module '")
    text = _MODULE.sub(r"<module '\1'>", text[:n]) if "<module '" in text[:n] else text[:n]
    text = text[:_before_partial(text, len(text), "str_ascii_iterator")]
    return text.replace("str_ascii_iterator", "str_iterator") if "str_ascii_iterator" in text \
        else text


_HEX = frozenset("0123456789abcdefABCDEF")
# _ADDRESS's words, and the characters a match may have between them and its end
_ADDRESS_WORDS = ((" at 0x", _HEX), (" id='", frozenset("0123456789'")))


def _start_of(*parts: str) -> str:
    """A pattern for any start of ``parts`` in sequence, the empty one included."""
    pattern = ""
    for part in reversed(parts):
        pattern = f"(?:{part}{pattern})?"
    return pattern


# The start of a _MODULE match that the rest of the text may complete (without its closing >).
_MODULE_START = re.compile(r"<module '[^'\\]*" + _start_of("'", " ", "(?:" + "|".join((
    _start_of(*"from", " ", "'[^']*", "'"),
    _start_of(r"\(", *"frozen", r"\)"),
    _start_of(r"\(", *"built-in", r"\)"),
    _start_of(r"\(", *"namespace", r"\)", " ", *"from", " ", r"\[[^\]]*", r"\]"))) + ")"))


def _before_partial(text: str, n: int, word: str) -> int:
    """``n``, or where ``text[:n]`` ends with the start of ``word`` (which may go on past n)."""
    for k in range(min(len(word) - 1, n), 0, -1):
        if text.startswith(word[:k], n - k):
            return n - k
    return n


def safe_repr(value: object, limit: int = DEFAULT_MAX_REPR) -> str:
    short = long_sequence_repr(value, limit)
    if short is not None:
        return short
    ordered = address_ordered_set_repr(value, limit)
    if ordered is not None:
        return ordered
    try:
        if type(value) in BUILT and _prefix.looks_long(value, limit):
            short = _prefix.prefix_repr(value, limit)
            if short is not None:
                return short
        text = repr(value)
        ordered = nested_ordered_repr(value, text, limit) if type(value) in NESTED_TYPES else None
    except BaseException as exc:  # a user __repr__ (or int > sys.get_int_max_str_digits())
        if isinstance(exc, (KeyboardInterrupt, ReprTimeout)):   # failed (see repr_failed;
            raise                                              # guard.py)
        return repr_failed(value, exc)
    if ordered is not None:
        return ordered
    if type(value) not in _PLAIN:
        text = scrub(text)
    if len(text) > limit:
        return text[:limit] + MARKER
    return text


def exception_repr(exc: BaseException, limit: int = DEFAULT_MAX_REPR) -> str:
    """The VALUE of an exception frame: the exception's repr, e.g.
    ``ZeroDivisionError('division by zero')`` (same rules as :func:`safe_repr`)."""
    return safe_repr(exc, limit)


def error_text(exc: BaseException, limit: int = 1000) -> str:
    """``TypeName: message`` (just ``TypeName`` when the message is empty), as the last line of
    a traceback; a message over ``limit`` characters is truncated like a repr."""
    name = type(exc).__name__
    try:
        msg = str(exc)
    except BaseException as failure:  # (a user __str__: any exception, see repr_failed)
        if isinstance(failure, (KeyboardInterrupt, ReprTimeout)):
            raise
        msg = ""
    if not msg.isascii():  # no lone surrogates in JSON responses
        msg = msg.encode("utf-8", "backslashreplace").decode("utf-8")
    return f"{name}: {truncate(scrub(msg), limit)}" if msg else name


from . import prefix as _prefix  # noqa: E402  (it uses this module's helpers; module-level cycle)
