"""Mutation fuzzer over literal argument lists.

``mutate(args_source, rng)`` parses ``f(<args_source>)``, evaluates every argument as a literal,
picks one node of one argument's value tree (a scalar, or a container) with ``rng`` and perturbs
it: ints +-1 / 0 / -1 / negated / doubled / big, floats likewise, strings and bytes get a char
dropped / duplicated / inserted / swapped-case / emptied, containers get an element dropped /
duplicated / appended / emptied, bools flip, None becomes 0 or '' (and any node may become None).
All choices come from ``rng`` and walks are in a fixed order (set elements sorted by rendering),
so the result is a function of (args_source, rng state) only. The result is again a literal
argument list; it is the input unchanged only if the mutation is a no-op, which callers dedupe.
"""

from __future__ import annotations

import ast
import math
import random

from .values import Unrenderable, render

_BIG = (2**31 - 1, 2**31, -(2**31), 2**63, 10**9, 255, 256, 65536)
_CHARS = "a Z0_-.\n\té/"
MAX_STR = 64
MAX_LEN = 32


def parse_args(args_source: str) -> tuple[list, list[tuple[str, object]]]:
    """Literal values of ``f(<args_source>)``: (positional, [(keyword, value)]). ValueError if an
    argument is not a literal or the text is not an argument list."""
    try:
        call = ast.parse(f"f({args_source})", mode="eval").body
    except SyntaxError as e:
        raise ValueError(str(e)) from None
    if not isinstance(call, ast.Call):
        raise ValueError("not a call")
    if (any(isinstance(a, ast.Starred) for a in call.args)
            or any(k.arg is None for k in call.keywords)):
        raise ValueError("star arguments")
    try:
        pos = [ast.literal_eval(a) for a in call.args]
        kws = [(k.arg, ast.literal_eval(k.value)) for k in call.keywords]
    except (TypeError, SyntaxError, MemoryError, RecursionError) as e:
        raise ValueError(str(e)) from None
    return pos, kws


def render_args(pos: list, kws: list[tuple[str, object]]) -> str:
    return ", ".join([render(v) for v in pos] + [f"{k}={render(v)}" for k, v in kws])


def _ordered(container) -> list:
    if isinstance(container, (set, frozenset)):
        return sorted(container, key=render)
    if isinstance(container, dict):
        return list(container.items())
    return list(container)


def _nodes(value, path=()) -> list[tuple]:
    """Paths to every node of a value tree, pre-order; a dict item is entered through its value."""
    out = [path]
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            out += _nodes(v, path + (i,))
    elif isinstance(value, dict):
        for i, (_k, v) in enumerate(value.items()):
            out += _nodes(v, path + (i,))
    return out


def _get(value, path):
    for i in path:
        value = list(value.values())[i] if isinstance(value, dict) else value[i]
    return value


def _set(value, path, new):
    if not path:
        return new
    i, rest = path[0], path[1:]
    if isinstance(value, dict):
        k = list(value)[i]
        out = dict(value)
        out[k] = _set(value[k], rest, new)
        return out
    items = list(value)
    items[i] = _set(items[i], rest, new)
    return tuple(items) if isinstance(value, tuple) else items


def _mutate_int(v: int, rng: random.Random) -> int:
    return rng.choice([v + 1, v - 1, 0, -1, 1, -v, v * 2, rng.choice(_BIG), rng.randint(-100, 100)])


def _mutate_float(v: float, rng: random.Random) -> float:
    out = rng.choice([v + 1.0, v - 1.0, 0.0, -0.0, -v, v * 2, v / 3, 0.5, 1e-9, 1e300,
                      float(rng.randint(-100, 100))])
    return out if math.isfinite(out) else 0.0


def _mutate_text(v, rng: random.Random):
    chars = _CHARS if isinstance(v, str) else _CHARS.encode("latin-1")
    unit = (lambda c: c) if isinstance(v, str) else (lambda c: bytes([c]))  # noqa: E731
    empty = v[:0]
    ops = ["empty", "insert", "swapcase", "double"]
    if v:
        ops += ["drop", "dup", "drop", "dup", "reverse"]
    op = rng.choice(ops)
    i = rng.randrange(len(v)) if v else 0
    if op == "empty":
        return empty
    if op == "insert":
        return v[:i] + unit(rng.choice(chars)) + v[i:]
    if op == "swapcase":
        return v.swapcase()
    if op == "double":
        return (v + v)[:MAX_STR] if v else unit(rng.choice(chars))
    if op == "drop":
        return v[:i] + v[i + 1:]
    if op == "dup":
        return (v[:i + 1] + v[i:])[:MAX_STR]
    return v[::-1]


def _mutate_container(v, rng: random.Random):
    items = _ordered(v)
    ops = ["empty"] if not items else ["drop", "dup", "append", "empty", "drop", "dup"]
    op = rng.choice(ops)
    if op == "empty":
        new = []
    else:
        i = rng.randrange(len(items))
        if op == "drop":
            new = items[:i] + items[i + 1:]
        elif op == "dup":
            new = (items[:i + 1] + items[i:])[:MAX_LEN]
        else:  # append a mutated copy of an element
            new = (items + [_mutate_item(items[i], v, rng)])[:MAX_LEN]
    if isinstance(v, dict):
        return dict(new)
    if isinstance(v, (set, frozenset)):
        return set(new)
    return tuple(new) if isinstance(v, tuple) else new


def _mutate_item(item, container, rng):
    if isinstance(container, dict):
        k, val = item
        return (_mutate_scalar(k, rng), val)
    return _mutate_scalar(item, rng)


def _mutate_scalar(v, rng: random.Random):
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return _mutate_int(v, rng)
    if isinstance(v, float):
        return _mutate_float(v, rng)
    if isinstance(v, complex):
        return complex(_mutate_float(v.real, rng), v.imag)
    if isinstance(v, (str, bytes)):
        return _mutate_text(v, rng)
    if v is None:
        return rng.choice([0, "", [], False])
    if isinstance(v, (list, tuple, set, frozenset, dict)):
        return _mutate_container(v, rng)
    return v


def mutate(args_source: str, rng: random.Random) -> str:
    """One mutation of a literal argument list (see module doc). ValueError if the input is not
    a literal argument list."""
    pos, kws = parse_args(args_source)
    slots = [("p", i) for i in range(len(pos))] + [("k", i) for i in range(len(kws))]
    if not slots:
        return args_source
    kind, i = rng.choice(slots)
    value = pos[i] if kind == "p" else kws[i][1]
    path = rng.choice(_nodes(value))
    node = _get(value, path)
    try:
        new_node = None if (node is not None and rng.random() < 0.05) else _mutate_scalar(node, rng)
        new = _set(value, path, new_node)
    except TypeError:  # e.g. an unhashable element put into a set or used as a dict key
        return args_source
    if kind == "p":
        pos = pos[:i] + [new] + pos[i + 1:]
    else:
        kws = kws[:i] + [(kws[i][0], new)] + kws[i + 1:]
    try:
        return render_args(pos, kws)
    except Unrenderable:
        return args_source
