"""Shapes of calls: normalised literal argument lists, and the calls of a function that its
docstring examples make."""

from __future__ import annotations

import ast
import doctest

from .scope import parse


def docstring_examples(fn: ast.AST) -> list[doctest.Example]:
    doc = ast.get_docstring(fn, clean=True)
    if not doc or ">>>" not in doc:
        return []
    try:
        return doctest.DocTestParser().get_examples(doc)
    except ValueError:  # inconsistent indentation etc.
        return []


def doctest_call(example_source: str, name: str) -> ast.Call | None:
    """The call of ``name`` an example evaluates (``f(1)``, ``mod.f(1)``, ``print(f(1))``)."""
    try:
        tree = parse(example_source)
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr):
        return None
    call = tree.body[0].value
    if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "print"
            and len(call.args) == 1 and not call.keywords):
        call = call.args[0]
    if not isinstance(call, ast.Call):
        return None
    fn = call.func
    if isinstance(fn, ast.Name) and fn.id == name:
        return call
    if isinstance(fn, ast.Attribute) and fn.attr == name and isinstance(fn.value, ast.Name):
        return call
    return None


def args_source(call: ast.Call, literal_only: bool = True) -> str | None:
    """Normalised argument list of a call; None if it has ``*``/``**`` or (when literal_only) an
    argument that is not a Python literal."""
    parts = []
    for a in call.args:
        if isinstance(a, ast.Starred):
            return None
        parts.append(a)
    for k in call.keywords:
        if k.arg is None:
            return None
        parts.append(k.value)
    if literal_only:
        try:
            for p in parts:
                ast.literal_eval(p)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
    return ", ".join([ast.unparse(a) for a in call.args]
                     + [f"{k.arg}={ast.unparse(k.value)}" for k in call.keywords])
