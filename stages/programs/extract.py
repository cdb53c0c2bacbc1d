"""Standalone module-level functions of one source file, as self-contained programs.

A function is *standalone* when every global name it needs resolves to

- a safe builtin (not ``open``/``eval``/``exit``... see ``scope.BANNED_BUILTINS``),
- a name imported at the top level from a usable standard-library module (``import re``,
  ``from collections import deque``; the import line is rebuilt for just that name),
- another module-level function that is itself standalone (included, transitively), or
- a module-level value assignment ``NAME = expr`` / ``NAME: T = expr`` whose expression is itself
  resolvable by these rules (literal constants, ``ONE_THIRD = 1.0/3.0``,
  ``_ws = re.compile(r'\\s+')``, ...; included in full),

and no reference is I/O or process control (``scope.io_banned``). "Global" means what the
compiler thinks: we read it off ``symtable`` of the snippet, so comprehension, lambda, class and
nested-function scoping are exact.

Decisions: async functions, decorated functions and functions that assign a ``global`` are
skipped; generator functions are skipped as *targets* (calling one runs nothing) but may be
*dependencies*. A name bound more than once at module level, or inside a compound statement
(``try: import x except ImportError: ...``), is ambiguous and never resolves. Names ``main`` (the
tracer's entry point) never resolve. Mutually recursive functions are fine (the standalone set is
the greatest fixed point). At most ``MAX_DEPS`` dependencies per function.

Program layout: ``from __future__`` lines, then the needed import lines (source order), then the
dependency sources and the function itself, exactly as written, in source order. It compiles.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import NamedTuple

from .calls import args_source, docstring_examples, doctest_call
from .scope import (NO_BARE_REFS, RESERVED_NAMES, SAFE_BUILTINS, SourceLines, compiles,
                    free_names, global_refs, io_banned, local_imports_ok, parse,
                    stdlib_importable)

MAX_DEPS = 12
MAX_PROGRAM_CHARS = 30_000


class Param(NamedTuple):
    name: str
    # inspect.Parameter kind name: POSITIONAL_ONLY, POSITIONAL_OR_KEYWORD, VAR_POSITIONAL,
    # KEYWORD_ONLY, VAR_KEYWORD
    kind: str
    annotation: str | None  # annotation source
    default: str | None  # default value source


@dataclass
class FunctionCandidate:
    module_id: str
    qualname: str
    program: str
    params: list[Param]
    lineno: int
    deps: list[str] = field(default_factory=list)  # names of included functions / values
    # literal argument lists of the calls f(...) its docstring examples make
    doctest_inputs: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.qualname.rsplit(".", 1)[-1]


@dataclass
class _Binding:
    kind: str  # "import" | "func" | "value" | "other"
    node: ast.stmt | None = None
    text: str = ""  # import line rebuilt for this name, or the statement source
    origin: str = ""  # dotted origin of an imported name
    needs: set[str] = field(default_factory=set)
    ok: bool = False  # resolvable on its own (before looking at dependencies)
    reason: str = ""


def _params(fn: ast.FunctionDef) -> list[Param]:
    a = fn.args
    src = lambda n: None if n is None else ast.unparse(n)  # noqa: E731
    out: list[Param] = []
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    for i, (arg, d) in enumerate(zip(positional, defaults)):
        kind = "POSITIONAL_ONLY" if i < len(a.posonlyargs) else "POSITIONAL_OR_KEYWORD"
        out.append(Param(arg.arg, kind, src(arg.annotation), src(d)))
    if a.vararg:
        out.append(Param(a.vararg.arg, "VAR_POSITIONAL", src(a.vararg.annotation), None))
    for arg, d in zip(a.kwonlyargs, a.kw_defaults):
        out.append(Param(arg.arg, "KEYWORD_ONLY", src(arg.annotation), src(d)))
    if a.kwarg:
        out.append(Param(a.kwarg.arg, "VAR_KEYWORD", src(a.kwarg.annotation), None))
    return out


def _is_generator(fn: ast.FunctionDef) -> bool:
    stack = list(fn.body)
    while stack:
        n = stack.pop()
        if isinstance(n, (ast.Yield, ast.YieldFrom)):
            return True
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        stack.extend(ast.iter_child_nodes(n))
    return False


def _bound_in(node: ast.AST) -> set[str]:
    """Every name a (compound) module-level statement may bind at module level."""
    out: set[str] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
            continue
        if isinstance(n, ast.Lambda):
            continue
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            out.add(n.id)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            out.update((a.asname or a.name).split(".")[0] for a in n.names)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            out.add(n.name)
        stack.extend(ast.iter_child_nodes(n))
    return out


class ModuleIndex:
    """Module-level bindings of one parsed source file, and which of them are standalone."""

    def __init__(self, source: str, tree: ast.Module | None = None):
        self.source = source
        self.tree = tree if tree is not None else parse(source)
        self.lines = SourceLines(source)
        self.future: list[str] = []
        self.bindings: dict[str, _Binding] = {}
        # name -> (statement index, position in the statement): source order, no ties
        self.order: dict[str, tuple[int, int]] = {}
        counts: dict[str, int] = {}

        def bind(name: str, b: _Binding, i: int, j: int = 0) -> None:
            counts[name] = counts.get(name, 0) + 1
            self.bindings[name], self.order[name] = b, (i, j)

        for i, st in enumerate(self.tree.body):
            if isinstance(st, ast.ImportFrom) and st.module == "__future__":
                self.future.append(ast.unparse(st))
            elif isinstance(st, ast.Import):
                for j, a in enumerate(st.names):
                    name = a.asname or a.name.split(".")[0]
                    origin = a.name if a.asname else name
                    bind(name, _Binding("import", st, ast.unparse(ast.Import([a])), origin), i, j)
            elif isinstance(st, ast.ImportFrom):
                for j, a in enumerate(st.names):
                    if a.name == "*" or st.level or not st.module:
                        bind(a.asname or a.name, _Binding("other"), i, j)
                        continue
                    line = ast.unparse(ast.ImportFrom(st.module, [a], 0))
                    origin = f"{st.module}.{a.name}"
                    bind(a.asname or a.name, _Binding("import", st, line, origin), i, j)
            elif isinstance(st, ast.FunctionDef):
                bind(st.name, _Binding("func", st), i)
            elif (isinstance(st, ast.Assign) and len(st.targets) == 1
                  and isinstance(st.targets[0], ast.Name)):
                bind(st.targets[0].id, _Binding("value", st), i)
            elif (isinstance(st, ast.AnnAssign) and st.value is not None
                  and isinstance(st.target, ast.Name)):
                bind(st.target.id, _Binding("value", st), i)
            else:
                for name in sorted(_bound_in(st)):
                    bind(name, _Binding("other"), i)
        for name, c in counts.items():
            if c > 1 or name in RESERVED_NAMES:
                self.bindings[name] = _Binding("other")
        for name, b in self.bindings.items():
            self._check(name, b)
        self._fixpoint()

    def _check(self, name: str, b: _Binding) -> None:
        if b.kind == "import":
            b.ok = stdlib_importable(b.origin) and not io_banned(b.origin)
            b.reason = "" if b.ok else "import"
            return
        if b.kind not in ("func", "value"):
            b.reason = "ambiguous"
            return
        node = b.node
        if isinstance(node, ast.FunctionDef) and node.decorator_list:
            b.reason = "decorated"
            return
        b.text = self.lines.segment(node) or ast.unparse(node)
        names = free_names(b.text)
        if names is None:
            b.reason = "symtable"
            return
        needed, written = names
        if written:
            b.reason = "global_write"
            return
        needed.discard(name)
        b.needs = needed
        for n in needed:
            if n in self.bindings:
                continue
            if n not in SAFE_BUILTINS:
                b.reason = "unresolved"
                return
        imported = {n for n in needed if n in self.bindings and self.bindings[n].kind == "import"}
        for ref in global_refs(node, needed):
            head, _, rest = ref.partition(".")
            if head in imported:
                origin = self.bindings[head].origin
                if (not rest and origin in NO_BARE_REFS) or io_banned(
                        f"{origin}.{rest}" if rest else origin):
                    b.reason = "io"
                    return
        if not local_imports_ok(node):
            b.reason = "io"
            return
        b.ok = True

    def _fixpoint(self) -> None:
        changed = True
        while changed:
            changed = False
            for b in self.bindings.values():
                if b.ok and b.kind in ("func", "value"):
                    bad = [n for n in b.needs if n in self.bindings and not self.bindings[n].ok]
                    if bad:
                        b.ok, b.reason, changed = False, "dependency", True

    def closure(self, name: str) -> list[str]:
        """Names (functions/values/imports) the binding needs, transitively, excluding itself."""
        seen: set[str] = set()
        stack = [name]
        while stack:
            for n in self.bindings[stack.pop()].needs:
                if n in self.bindings and n not in seen and n != name:
                    seen.add(n)
                    stack.append(n)
        return sorted(seen, key=lambda n: self.order[n])

    def program(self, name: str) -> tuple[str, list[str]] | None:
        deps = self.closure(name)
        imports = [n for n in deps if self.bindings[n].kind == "import"]
        defs = [n for n in deps if self.bindings[n].kind != "import"]
        if len(defs) > MAX_DEPS:
            return None
        lines = list(self.future) + list(dict.fromkeys(self.bindings[n].text for n in imports))
        parts = ["\n".join(lines)] if lines else []
        parts += [self.bindings[n].text for n in sorted(defs + [name], key=lambda n: self.order[n])]
        return "\n\n".join(parts) + "\n", defs


def extract_functions(source: str, module_id: str, *, index: ModuleIndex | None = None,
                      skipped: dict[str, int] | None = None) -> list[FunctionCandidate]:
    """Standalone module-level functions of ``source`` in source order. Raises SyntaxError if
    the source does not parse. ``skipped`` (optional) counts the reasons functions were left out."""
    idx = index or ModuleIndex(source)
    out: list[FunctionCandidate] = []

    def skip(reason: str) -> None:
        if skipped is not None:
            skipped[reason] = skipped.get(reason, 0) + 1

    for st in idx.tree.body:
        if isinstance(st, ast.AsyncFunctionDef):
            skip("async")
            continue
        if not isinstance(st, ast.FunctionDef):
            continue
        b = idx.bindings.get(st.name)
        if b is None or b.node is not st:
            skip("ambiguous")
        elif not b.ok:
            skip(b.reason or "unresolved")
        elif _is_generator(st):
            skip("generator")
        elif (built := idx.program(st.name)) is None:
            skip("too_many_deps")
        elif len(built[0]) > MAX_PROGRAM_CHARS or not compiles(built[0]):
            skip("program")
        else:
            inputs = []
            for ex in docstring_examples(st):
                call = doctest_call(ex.source, st.name)
                a = args_source(call) if call is not None else None
                if a is not None and a not in inputs:
                    inputs.append(a)
            out.append(FunctionCandidate(module_id, st.name, built[0], _params(st), st.lineno,
                                         built[1], inputs))
    return out
