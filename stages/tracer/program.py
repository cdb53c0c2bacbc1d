"""The program under trace: CWM context (code + synthetic entry point), compilation, and the
per-code-object data the tracer looks up at each event.

Context = ``code`` (CR/CRLF normalised to LF, trailing blank space dropped) + one blank line +

    def main():  # << START_OF_TRACE
        return <call>

so every line the tracer reports is a line of the context. A program is compiled once per
(code, filename) (LRU cache, see ``_Body``): tracing one function on many inputs compiles only
their entry points after the first.

Comprehensions on Python 3.12+: PEP 709 inlines list/set/dict comprehensions into the enclosing
function, so they would lose the call frame, ``.0`` local and return frame that CWM's traces (and
Python 3.11) show. To keep traces the same across versions we rewrite, on 3.12+ only,
``[e for x in it ...]`` into ``(lambda .0: [e for x in .0 ...])(iter(it))``: the lambda is a scope
of its own whose only argument is the ``.0`` iterator, exactly what 3.11's ``<listcomp>`` code
object looks like (the comprehension inside it is inlined into the lambda, which is what we
want). Not rewritten (they stay inlined, no scope of their own): async comprehensions and those
containing ``await``, ``:=`` or ``super`` (the rewrite would change their meaning). Generator
expressions and lambdas are never inlined, so they need nothing. The AST round trip costs about
as much as a second compilation, so it is taken only when the text has a ``for`` after other code
on its line, or when the plainly compiled bytecode shows an inlined comprehension anyway
(``LOAD_FAST_AND_CLEAR``, e.g. a comprehension whose ``for`` starts a line).
"""

from __future__ import annotations

import ast
import dis
import inspect
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from types import CodeType

ENTRY_HEADER = "def main():  # << START_OF_TRACE\n"
ITER_NAME = "__codeworld_iter__"  # global bound to builtins.iter when comprehensions are rewritten
INLINED_COMPREHENSIONS = sys.version_info >= (3, 12)
_GLOBAL_LOADS = ("LOAD_GLOBAL", "LOAD_NAME")
_RESUME = dis.opmap["RESUME"]
_MAIN = re.compile(r"\bmain\b")


class InvalidProgram(Exception):
    """The code does not compile, the call is not one expression, or they clash with ``main``."""


@dataclass(slots=True)
class CodeInfo:
    def_line: int  # line shown by a scope's first call frame (the ``def`` line, past decorators)
    code_bytes: bytes  # co_code, for classifying return/jump instructions
    _lines: dict[int, int] = field(default_factory=dict)  # instruction offset -> line, lazily
    _table: list[tuple[int, int, int | None]] | None = None
    code: CodeType | None = None
    _entry: int = -1  # offset of the first RESUME (where a new activation stops first), lazily

    def entry_offset(self) -> int:
        if self._entry < 0:
            code = self.code_bytes
            self._entry = next((i for i in range(0, len(code), 2) if code[i] == _RESUME),
                               len(code))
        return self._entry

    def line_of(self, offset: int) -> int:
        line = self._lines.get(offset)
        if line is None:
            if self._table is None:
                self._table = list(self.code.co_lines())
            line = 0
            for start, end, ln in self._table:
                if start <= offset < end:
                    line = ln or 0
                    break
            self._lines[offset] = line
        return line


@dataclass(slots=True)
class Program:
    context: str
    lines: list[str]  # physical lines of the context, each ending in "\n"
    modules: tuple[CodeType, ...]  # exec them in order in one namespace (see compile_program)
    main_code: CodeType
    infos: dict[int, CodeInfo]  # id(code object) -> info, for every function-level code object
    codes: list[CodeType]
    rewritten: bool  # comprehensions rewritten (needs ITER_NAME in the globals)


def _check_call(call: str) -> str:
    """The call must be one expression. Compiling ``return <call>`` checks that already unless
    the text holds a ``;`` or a line break (``f(1); g()`` would compile as two statements)."""
    call = call.strip()
    if not call:
        raise InvalidProgram("call is empty")
    if ";" in call or "\n" in call or "\r" in call:
        try:
            tree = ast.parse(call, "<call>", mode="eval")
        except (SyntaxError, ValueError) as exc:
            raise InvalidProgram(f"call is not an expression: {exc}") from None
        if "\n" in call or "\r" in call:  # multi-line: put it on the one line of main's body
            call = ast.unparse(tree)
    return call


def _top_level_binds_main(tree: ast.Module) -> bool:
    """Does the module body (not function/class bodies) bind the name ``main``?"""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name == "main":
                return True
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((a.asname or a.name.split(".")[0]) == "main" for a in node.names):
                return True
            continue
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Name) and child.id == "main" and \
                    isinstance(child.ctx, ast.Store):
                return True
            if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case, ast.expr)):
                todo.append(child)
    return False


class _Outline(ast.NodeTransformer):
    """Give list/set/dict comprehensions their own scope again (3.12+, see module doc)."""

    def __init__(self) -> None:
        self.changed = False

    def _outline(self, node: ast.expr) -> ast.expr:
        self.generic_visit(node)
        if any(g.is_async for g in node.generators):
            return node
        for sub in ast.walk(node):
            if isinstance(sub, (ast.Await, ast.NamedExpr, ast.Yield, ast.YieldFrom)) or (
                    isinstance(sub, ast.Name) and sub.id == "super"):
                return node
        first = node.generators[0]
        source_iter = first.iter
        first.iter = ast.copy_location(ast.Name(".0", ast.Load()), source_iter)
        args = ast.arguments(posonlyargs=[], args=[ast.arg(".0")], kwonlyargs=[],
                             kw_defaults=[], defaults=[])
        lam = ast.Lambda(args=args, body=node)
        it = ast.Call(ast.Name(ITER_NAME, ast.Load()), [source_iter], [])
        call = ast.Call(lam, [it], [])
        for new in (lam, args, args.args[0], it, it.func, call):
            ast.copy_location(new, node)
        self.changed = True
        return call

    visit_ListComp = visit_SetComp = visit_DictComp = _outline


def _collect(code: CodeType, out: list[CodeType]) -> None:
    for const in code.co_consts:
        if isinstance(const, CodeType):
            out.append(const)
            _collect(const, out)


def code_info(code: CodeType, lines: list[str]) -> CodeInfo:
    """What the recorder needs of a code object whose source lines are ``lines`` (its call frame
    shows the ``def`` line past any decorators)."""
    return CodeInfo(_def_line(code, lines), code.co_code, code=code)


def _def_line(code: CodeType, lines: list[str]) -> int:
    """A decorated def or class starts (``co_firstlineno``) at its first decorator; its call
    frame shows its own ``def``/``class`` line. A lambda or comprehension written on a decorator
    line (``@deco(key=lambda v: v)``) starts there too, and that line is its own."""
    first = code.co_firstlineno
    name = code.co_name
    if name.startswith("<") or not 0 < first <= len(lines) or \
            not lines[first - 1].lstrip().startswith("@"):
        return first
    header = re.compile(r"[ \t]*(?:async[ \t]+def|def|class)[ \t]+" + re.escape(name) + r"\b")
    for n in range(first, min(len(lines), first + 50)):
        if header.match(lines[n]):
            return n + 1
    return first


@dataclass(slots=True)
class _Body:
    """The program's own code, compiled once per (code, filename) and reused across calls.

    A program seen for the first time is compiled in one go with its entry point (one compile
    instead of two: what a fork-server child, which never sees a program twice, pays); the
    module then also defines that first ``main``, which a later call with another ``call``
    simply rebinds by running its own entry point after it."""

    text: str  # normalised code
    lines: list[str]
    module: CodeType
    codes: list[CodeType]  # the program's code objects (not main's)
    infos: dict[int, CodeInfo]
    rewritten: bool
    call: str | None = None  # the call whose entry point ``module`` also compiles, if any
    main_code: CodeType | None = None
    entry_codes: list[CodeType] = field(default_factory=list)  # main's code and those inside it
    entry_infos: dict[int, CodeInfo] = field(default_factory=dict)


# 3.12+: only inlined comprehensions use LOAD_FAST_AND_CLEAR (to save the enclosing scope's
# variable of the same name); a ``for`` after something else on its line is likely one.
_INLINED_OP = dis.opmap.get("LOAD_FAST_AND_CLEAR", -1)
_MAYBE_COMPREHENSION = re.compile(r"^[ \t]*[^ \t\n#][^\n#]*?\bfor\b", re.MULTILINE)


def _inlines(code: CodeType) -> bool:
    """Does ``code`` or a code object inside it hold an inlined comprehension?"""
    if _INLINED_OP in code.co_code[::2]:  # opcodes sit at even offsets (wordcode)
        return True
    return any(isinstance(c, CodeType) and _inlines(c) for c in code.co_consts)


def _compile(source: str, filename: str) -> tuple[CodeType, bool]:
    """Compile ``source``; on 3.12+ through the AST when it holds a list/set/dict comprehension,
    to outline it (the AST path is about twice as slow: it is taken only when the text suggests
    a comprehension, or the bytecode shows one the text test missed)."""
    if not INLINED_COMPREHENSIONS or "for" not in source:
        return compile(source, filename, "exec", dont_inherit=True), False
    if not _MAYBE_COMPREHENSION.search(source):
        code = compile(source, filename, "exec", dont_inherit=True)
        if not _inlines(code):
            return code, False
    outliner = _Outline()
    tree = outliner.visit(ast.parse(source, filename))
    return compile(tree, filename, "exec", dont_inherit=True), outliner.changed


_BODIES: OrderedDict[tuple[str, str], _Body] = OrderedDict()  # (code, filename) -> body, LRU
_MAX_BODIES = 256


def _normalise(code: str) -> str:
    return code.replace("\r\n", "\n").replace("\r", "\n").rstrip()


def _program_lines(text: str) -> list[str]:
    return [ln + "\n" for ln in text.split("\n")] if text else []


def _check_body(text: str, filename: str) -> None:
    try:
        if "main" in text and _MAIN.search(text) and \
                _top_level_binds_main(ast.parse(text, filename)):
            raise InvalidProgram("the program defines 'main', the name of the entry point")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise InvalidProgram(f"{type(exc).__name__}: {exc}") from None


def _infos(codes: list[CodeType], lines: list[str]) -> dict[int, CodeInfo]:
    return {id(c): code_info(c, lines) for c in codes}


def _remember(key: tuple[str, str], body: _Body) -> _Body:
    if len(_BODIES) >= _MAX_BODIES:
        _BODIES.popitem(last=False)
    _BODIES[key] = body
    return body


def _compile_body(text: str, filename: str) -> _Body:
    """The program alone (after a failed compilation of the whole context)."""
    try:
        module, rewritten = _compile(text + "\n", filename)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise InvalidProgram(f"{type(exc).__name__}: {exc}") from None
    lines = _program_lines(text)
    codes: list[CodeType] = []
    _collect(module, codes)
    return _Body(text, lines, module, codes, _infos(codes, lines), rewritten)


def _check_entry(entry_codes: list[CodeType]) -> None:
    for c in entry_codes:
        if "main" in c.co_names and any(i.argval == "main" and i.opname in _GLOBAL_LOADS
                                        for i in dis.get_instructions(c)):
            raise InvalidProgram("call refers to 'main', the name of the entry point")


def _main_line(body_lines: list[str]) -> int:
    return len(body_lines) + 2 if body_lines else 1  # after the program and one blank line


def _context(text: str, call: str) -> str:
    entry = ENTRY_HEADER + "    return " + call + "\n"
    return text + "\n\n" + entry if text else entry


def context_of(code: str, call: str) -> str:
    """The context :func:`compile_program` builds for ``code`` and ``call`` (for a program it
    compiles; raises InvalidProgram for a call that is not one expression). Pure text work:
    the host rebuilds a trace's prompt with it instead of receiving it from the sandbox."""
    return _context(_normalise(code), _check_call(call))


# A ``yield`` in the call makes main a generator (``await`` outside async code does not
# compile): calling it would run nothing, giving an empty "ok" trace.
_SUSPENDS = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def _check_main(main_code: CodeType) -> None:
    if main_code.co_flags & _SUSPENDS:
        raise InvalidProgram("call holds 'yield': the entry point main would be a generator, "
                             "and calling it runs nothing")


def _program(body: _Body, call: str, modules: tuple[CodeType, ...], main_code: CodeType,
             entry_codes: list[CodeType], entry_infos: dict[int, CodeInfo],
             rewritten: bool) -> Program:
    _check_main(main_code)
    _check_entry(entry_codes)
    lines = body.lines + ["\n", ENTRY_HEADER, "    return " + call + "\n"] if body.lines else \
        [ENTRY_HEADER, "    return " + call + "\n"]
    context = _context(body.text, call)
    infos = dict(body.infos)
    infos.update(entry_infos)
    return Program(context, lines, modules, main_code, infos, body.codes + entry_codes, rewritten)


def _with_entry(body: _Body, call: str, filename: str) -> Program:
    """A known program with a call: reuse its module, compile the entry point if it differs."""
    if call == body.call:
        return _program(body, call, (body.module,), body.main_code, body.entry_codes,
                        body.entry_infos, body.rewritten)
    main_line = _main_line(body.lines)
    entry = ENTRY_HEADER + "    return " + call + "\n"
    try:
        entry_module, rewritten = _compile("\n" * (main_line - 1) + entry, filename)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise InvalidProgram(f"call is not an expression: {exc}") from None
    entry_codes: list[CodeType] = []
    _collect(entry_module, entry_codes)
    entry_infos = {id(c): CodeInfo(c.co_firstlineno, c.co_code, code=c) for c in entry_codes}
    return _program(body, call, (body.module, entry_module), entry_codes[0], entry_codes,
                    entry_infos, body.rewritten or rewritten)


def compile_program(code: str, call: str, filename: str) -> Program:
    """Raises InvalidProgram. ``Program.modules`` are executed in order in one namespace: the
    context's module, or (a program seen before, with another call) the program's cached module
    then the entry point compiled on its own at its line of the context."""
    call = _check_call(call)
    key = (code, filename)
    body = _BODIES.get(key)
    if body is not None:
        _BODIES.move_to_end(key)
        return _with_entry(body, call, filename)
    text = _normalise(code)
    _check_body(text, filename)
    lines = _program_lines(text)
    main_line = _main_line(lines)
    entry = ENTRY_HEADER + "    return " + call + "\n"
    try:
        module, rewritten = _compile(text + "\n\n" + entry if text else entry, filename)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        # the program's fault or the call's: the program alone tells
        return _with_entry(_remember(key, _compile_body(text, filename)), call, filename)
    codes: list[CodeType] = []
    entry_codes: list[CodeType] = []
    main_code = None
    for c in module.co_consts:
        if isinstance(c, CodeType):
            if c.co_name == "main" and c.co_firstlineno == main_line:
                main_code = c
                entry_codes.append(c)
                _collect(c, entry_codes)
            else:
                codes.append(c)
                _collect(c, codes)
    if main_code is None:
        # the compiler dropped the entry point as unreachable (a top-level raise, or sys.exit,
        # before it): the program alone, then the entry point, so running the module body
        # reports what stops it
        return _with_entry(_remember(key, _compile_body(text, filename)), call, filename)
    entry_infos = {id(c): CodeInfo(c.co_firstlineno, c.co_code, code=c) for c in entry_codes}
    body = _remember(key, _Body(text, lines, module, codes, _infos(codes, lines), rewritten,
                                call, main_code, entry_codes, entry_infos))
    return _with_entry(body, call, filename)
