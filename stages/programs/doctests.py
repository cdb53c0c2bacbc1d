"""Doctest examples of module-level functions (stdlib ``doctest.DocTestParser``).

Only module-level ``def``s are looked at (not methods, classes or the module docstring): a
doctest becomes a program only when its function is standalone, and only module-level functions
can be. Non-standalone functions are still reported, with ``program=None``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

from .calls import doctest_call, docstring_examples
from .extract import ModuleIndex, extract_functions
from .scope import SAFE_BUILTINS, free_names


@dataclass
class DoctestCase:
    module_id: str
    qualname: str
    program: str | None  # the function's standalone program, None if it is not standalone
    examples: list[tuple[str, str]] = field(default_factory=list)  # (source, want)


def extract_doctests(source: str, module_id: str, *, index: ModuleIndex | None = None,
                     candidates=None) -> list[DoctestCase]:
    """Doctests of the module-level functions of ``source``, in source order. Raises SyntaxError
    if the source does not parse."""
    idx = index or ModuleIndex(source)
    if candidates is None:
        candidates = extract_functions(source, module_id, index=idx)
    programs = {c.qualname: c.program for c in candidates}
    out = []
    for st in idx.tree.body:
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)):
            examples = docstring_examples(st)
            if examples:
                out.append(DoctestCase(module_id, st.name, programs.get(st.name),
                                       [(e.source, e.want) for e in examples]))
    return out


def program_bound_names(program: str) -> set[str]:
    names: set[str] = set()
    for st in ast.parse(program).body:
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(st.name)
        elif isinstance(st, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in st.names)
        elif isinstance(st, ast.Assign):
            names.update(t.id for t in st.targets if isinstance(t, ast.Name))
        elif isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
            names.add(st.target.id)
    return names


def doctest_calls(case: DoctestCase) -> list[str]:
    """Call expressions (source) of the doctest's function that can run against its program:
    ``mod.f(x)`` is rewritten ``f(x)``, ``print(f(x))`` is unwrapped, and every name the call
    uses must be bound by the program or be a safe builtin (names made by earlier examples are
    not available, so such examples are skipped)."""
    if case.program is None:
        return []
    bound = program_bound_names(case.program) | SAFE_BUILTINS
    out: list[str] = []
    for src, _want in case.examples:
        call = doctest_call(src, case.qualname)
        if call is None:
            continue
        call.func = ast.Name(case.qualname, ast.Load())
        text = ast.unparse(call)
        names = free_names(text)
        if names is None or not names[0] <= bound or names[1]:
            continue
        if text not in out:
            out.append(text)
    return out


def doctest_program(case: DoctestCase, *, min_examples: int = 2) -> tuple[str, str] | None:
    """The doctest itself as a program (example level): its examples, in order, become the
    body of ``def doctest_<name>():`` appended to the function's standalone program, the last
    expression returned; the call is ``doctest_<name>()``. Examples run while each is a single
    expression or assignment using only names the program, the builtins or earlier examples
    bind; the first that is not ends the program. None when fewer than ``min_examples`` remain
    (one call is already covered by :func:`doctest_calls`)."""
    if case.program is None:
        return None
    bound = program_bound_names(case.program) | SAFE_BUILTINS
    body: list[ast.stmt] = []
    for src, _want in case.examples:
        try:
            tree = ast.parse(src)
        except SyntaxError:
            break
        if len(tree.body) != 1 or not isinstance(tree.body[0], (ast.Expr, ast.Assign)):
            break
        stmt = tree.body[0]
        names = free_names(src)
        if names is None or not names[0] <= bound or names[1]:
            break
        if isinstance(stmt, ast.Assign):
            if not all(isinstance(t, ast.Name) for t in stmt.targets):
                break
            bound |= {t.id for t in stmt.targets}
        body.append(stmt)
    if len(body) < min_examples:
        return None
    if isinstance(body[-1], ast.Expr):
        body[-1] = ast.Return(body[-1].value)
    name = f"doctest_{case.qualname}"
    func = ast.FunctionDef(name=name, args=ast.arguments(posonlyargs=[], args=[], kwonlyargs=[],
                                                         kw_defaults=[], defaults=[]),
                           body=body, decorator_list=[], returns=None, type_params=[])
    text = ast.unparse(ast.fix_missing_locations(ast.Module(body=[func], type_ignores=[])))
    return f"{case.program.rstrip()}\n\n\n{text}\n", f"{name}()"
