"""Literal call arguments harvested from source: ``f(3, 'x')`` anywhere in a module (tests
included, e.g. inside ``self.assertEqual(f(3, 'x'), ...)``) gives ``"3, 'x'"`` for ``f``;
``mod.f(...)`` is keyed ``f`` too. Arguments are normalised with ``ast.unparse`` (one line,
deterministic). Calls without arguments, or with ``*``/``**``, are not harvested."""

from __future__ import annotations

import ast
from collections.abc import Iterable

from .calls import args_source
from .scope import parse

MAX_PER_NAME = 16
MAX_CHARS = 200


def harvest_calls(source: str, *, max_per_name: int = MAX_PER_NAME,
                  max_chars: int = MAX_CHARS, tree: ast.Module | None = None
                  ) -> dict[str, list[str]]:
    """Literal argument lists by called name, in source order, de-duplicated, capped.
    Raises SyntaxError if the source does not parse."""
    tree = tree if tree is not None else parse(source)
    out: dict[str, list[str]] = {}
    calls = [n for n in _calls(tree) if n.args or n.keywords]
    # source order; ``f(a)(b)``: the outer call (it ends later) first
    calls.sort(key=lambda n: (n.lineno, n.col_offset, -n.end_lineno, -n.end_col_offset))
    for node in calls:
        fn = node.func
        name = (fn.id if isinstance(fn, ast.Name)
                else fn.attr if isinstance(fn, ast.Attribute) else None)
        if name is None:
            continue
        a = args_source(node)
        if a is None or len(a) > max_chars:
            continue
        _add(out, name, a, max_per_name)
    return out


# Nodes that cannot contain a call: not descended into.
_LEAVES = (ast.Constant, ast.Name, ast.expr_context, ast.operator, ast.cmpop, ast.unaryop,
           ast.boolop, ast.alias)


def _calls(tree: ast.AST) -> list[ast.Call]:
    """Every Call node of ``tree`` (any order): ``ast.walk`` without the generator machinery
    and without visiting leaves, about twice as fast on large test modules."""
    out, stack, call = [], [tree], ast.Call
    while stack:
        node = stack.pop()
        if type(node) is call:
            out.append(node)
        for name in node._fields:
            v = getattr(node, name, None)
            if type(v) is list:
                stack.extend([x for x in v
                              if isinstance(x, ast.AST) and not isinstance(x, _LEAVES)])
            elif isinstance(v, ast.AST) and not isinstance(v, _LEAVES):
                stack.append(v)
    return out


def _add(out: dict[str, list[str]], name: str, args: str, cap: int) -> None:
    got = out.setdefault(name, [])
    if len(got) < cap and args not in got:
        got.append(args)


def merge_harvest(into: dict[str, list[str]], more: dict[str, list[str]], *,
                  max_per_name: int = MAX_PER_NAME) -> dict[str, list[str]]:
    for name, args in more.items():
        for a in args:
            _add(into, name, a, max_per_name)
    return into


def harvest_corpus(records: Iterable[dict], *, max_per_name: int = MAX_PER_NAME,
                   max_chars: int = MAX_CHARS) -> dict[str, list[str]]:
    """First pass over the corpus: literal call arguments by called name. Streams the records
    (one parsed module in memory at a time); unparseable modules are skipped."""
    out: dict[str, list[str]] = {}
    for rec in records:
        try:
            found = harvest_calls(rec["text"], max_per_name=max_per_name, max_chars=max_chars)
        except SyntaxError:
            continue
        merge_harvest(out, found, max_per_name=max_per_name)
    return out
