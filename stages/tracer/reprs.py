"""Reprs for trace frames: address-free, never raising, bounded in length.

A trace is training data, so the same program must give the same text on every run and every
machine. Three things in a plain ``repr`` break that or blow up the size:

* memory addresses (``<foo.Bar object at 0x7f3a...>``): every `` at 0x<hex>`` followed by
  ``>``, ``;``, ``:``, ``,`` or ``)`` is removed, giving ``<foo.Bar object>``, ``<function f>``,
  ``<list_iterator object>``, ``<generator object gen>``, ``<weakref; to 'A'>``;
* Python 3.11+'s ``str_ascii_iterator`` (an implementation detail of ASCII strings): written
  ``str_iterator``, the name CWM's own traces use for iterating a ``str``;
* sets whose order may follow addresses (an element hashed by identity, or by a ``__hash__``
  of its own class, which may be object's underneath): elements sorted by repr;
* very long values: the first ``limit`` characters are kept and ``...<truncated>`` is
  appended. A long list or tuple of scalars is not repr'd whole: its repr is built element by
  element only until it passes the limit (the same prefix, a fraction of the cost: such a local
  is repr'd at every frame).

A ``__repr__`` that raises gives ``<repr of TypeName raised ExcName>`` instead of failing the
trace. A top-level str or bytes is never scrubbed (its text is the user's data); inside a
container only text matching the address pattern above would be.
"""

from __future__ import annotations

import enum
import re

DEFAULT_MAX_REPR = 200

# " at 0x7f3a..." before the end of a repr or a separator: <f at 0x..>, <weakref at 0x..; to ..>,
# <cell at 0x..: int object at 0x..>. Not before a quote, so a str inside a list stays as it is.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+(?=[>;:,)])")
# Types whose repr never carries an address: skip the scrub checks for them.
_PLAIN = frozenset({int, float, bool, complex, type(None), str, bytes})


MARKER = "...<truncated>"
_SCALARS = frozenset({int, float, bool, complex, type(None), str, bytes})
_BIG = 64  # elements: below this the whole repr is cheap


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
    parts, size = [], 1
    try:
        for e in value:
            if type(e) not in _SCALARS:
                return None
            r = repr(e)
            parts.append(r)
            size += len(r) + 2
            if size > limit + 2:  # the whole repr is longer than the limit
                text = (("[" if t is list else "(") + ", ".join(parts))[:limit] + MARKER
                return text, len(parts)
    except (ValueError, RuntimeError):  # an int over the str-conversion limit; a list resized
        return None
    return None


def repr_failed(value: object, exc: BaseException) -> str:
    """Placeholder for a ``__repr__`` that raised (also: an int too long for ``str``)."""
    return f"<repr of {type(value).__qualname__} raised {type(exc).__name__}>"


def scrub(text: str) -> str:
    """Remove memory addresses and version-specific iterator names from a repr."""
    if " at 0x" in text:
        text = _ADDRESS.sub("", text)
    if "str_ascii_iterator" in text:
        text = text.replace("str_ascii_iterator", "str_iterator")
    return text


# Hashes computed from the value alone (str and bytes under the sandbox's PYTHONHASHSEED=0):
# a set of these iterates in the same order on every run. (None is not one on 3.11: its hash
# is its address, and so is an empty range's, which hashes None.) A class's own __hash__ is
# not trusted: more-itertools' tests hash a str subclass with `super.__hash__(self)`, the
# address again.
_VALUE_HASHES = frozenset(t.__hash__ for t in (int, float, complex, str, bytes))
_VALUE_HASHES |= {enum.Enum.__hash__}   # hash(member name)


def _hash_may_follow_address(e: object, depth: int = 0) -> bool:
    h = type(e).__hash__
    if h in _VALUE_HASHES:
        return False
    if (h is tuple.__hash__ or h is frozenset.__hash__) and depth < 8:
        return any(_hash_may_follow_address(x, depth + 1) for x in e)
    return True


def address_ordered_set_repr(value: object, limit: int) -> str | None:
    """A set or frozenset whose elements' hashes may be addresses iterates in address order,
    which differs from run to run and machine to machine: its elements are written sorted by
    their (address-free) reprs instead. None for any other value."""
    t = type(value)
    if (t is not set and t is not frozenset) or not value:
        return None
    try:
        if not any(_hash_may_follow_address(e) for e in value):
            return None
        inner = "{" + ", ".join(sorted(safe_repr(e, limit) for e in value)) + "}"
    except RuntimeError:   # resized while iterating (another thread)
        return None
    return inner if t is set else f"frozenset({inner})"


def safe_repr(value: object, limit: int = DEFAULT_MAX_REPR) -> str:
    short = long_sequence_repr(value, limit)
    if short is not None:
        return short
    ordered = address_ordered_set_repr(value, limit)
    if ordered is not None:
        return truncate(ordered, limit)
    try:
        text = repr(value)
    except Exception as exc:  # a user __repr__ (or int > sys.get_int_max_str_digits()) failed
        return repr_failed(value, exc)
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
    except Exception:
        msg = ""
    if not msg.isascii():  # no lone surrogates in JSON responses
        msg = msg.encode("utf-8", "backslashreplace").decode("utf-8")
    return f"{name}: {truncate(scrub(msg), limit)}" if msg else name
