"""Procedural bug synthesis (SWE-smith's AST mutations): single-site edits of a Python source.

Each operator proposes ``Mutation``s: a byte span of the file and its replacement text. Only the
span changes (the rest of the file keeps its formatting), so the gold patch is a small unified
diff. Only statements inside function bodies are mutated: whether a test can notice such a bug
is then decided by whether the test runs the mutated line, which is what lets the validation
rerun only the tests covering that line (see ``stages.agent.validate``).

Operators: flip_comparison, change_arith, change_boolop, off_by_one (integer constants, slice
bounds, range() bounds), negate_condition, remove_statement, remove_branch, remove_return,
swap_arguments, swap_variable (another local of the same function), change_literal.
The same rewrite rules, applied in reverse, are the scripted policy's candidate fixes
(``candidate_fixes``); it never sees which operator made a bug.
"""
from __future__ import annotations

import ast
import difflib
import random
import textwrap
from dataclasses import dataclass
from pathlib import Path

OPERATORS = ("flip_comparison", "change_arith", "change_boolop", "off_by_one",
             "negate_condition", "remove_statement", "remove_branch", "remove_return",
             "swap_arguments", "swap_variable", "change_literal")

# Each swap is its own inverse, so a fix is always one rule away from a bug it undoes.
COMPARE_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
                ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
                ast.In: ast.NotIn, ast.NotIn: ast.In}
ARITH_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
              ast.FloorDiv: ast.Mod, ast.Mod: ast.FloorDiv, ast.LShift: ast.RShift,
              ast.RShift: ast.LShift, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd}
SEPARATORS = ("", " ", "_", "-", ",", ".", ":")


@dataclass(frozen=True)
class Mutation:
    operator: str
    line: int           # first line of the span (1-based)
    start: int          # byte offsets in the UTF-8 source
    end: int
    replacement: str

    def apply(self, source: str) -> str:
        b = source.encode("utf-8")
        return (b[:self.start] + self.replacement.encode("utf-8") + b[self.end:]).decode("utf-8")


def read_source(path: Path) -> str:
    """A package file's text with its line ends as they are (CRLF stays CRLF): mutation
    offsets are taken in this text and applied to it, so the buggy tree differs from the
    original only in the mutated span. (Text mode would turn CRLF into LF: every line of the
    buggy file would differ.) The sandbox side keeps them too and cannot import this:
    runner/cwtest.py's ``_write`` and runner/cwtools.py open with ``newline=""`` as well."""
    with open(path, encoding="utf-8", newline="") as fh:
        return fh.read()


def _offsets(source: str) -> list[int]:
    """Byte offset of the start of each line (index 0 = line 1)."""
    offs, pos = [], 0
    for line in source.encode("utf-8").splitlines(keepends=True):
        offs.append(pos)
        pos += len(line)
    offs.append(pos)
    return offs


def _span(node: ast.AST, offs: list[int]) -> tuple[int, int]:
    return offs[node.lineno - 1] + node.col_offset, offs[node.end_lineno - 1] + node.end_col_offset


def _stmt_span(node: ast.stmt, offs: list[int], source_b: bytes) -> tuple[int, int]:
    """Whole lines of a statement (its indentation up to its last newline). Only for a
    statement that owns its lines (``_owns_lines``): else the span takes its neighbours."""
    start = offs[node.lineno - 1]
    end = offs[node.end_lineno] if node.end_lineno < len(offs) else len(source_b)
    return start, end


def _owns_lines(node: ast.stmt, offs: list[int], source_b: bytes) -> bool:
    """Nothing but blanks before the statement on its first line and nothing but blanks or a
    comment after it on its last: no other statement (``a = 1; b = 2``) nor its parent's
    header (``try: x = 1``, ``def v(self): return 1``) shares its lines, so replacing the
    whole lines touches this statement only."""
    first = source_b[offs[node.lineno - 1]:offs[node.lineno - 1] + node.col_offset]
    last_end = offs[node.end_lineno] if node.end_lineno < len(offs) else len(source_b)
    after = source_b[offs[node.end_lineno - 1] + node.end_col_offset:last_end].strip()
    return not first.strip() and (not after or after.startswith(b"#"))


def _indent(node: ast.stmt, source_b: bytes, offs: list[int]) -> str:
    line = source_b[offs[node.lineno - 1]:offs[node.lineno]].decode("utf-8")
    return line[:len(line) - len(line.lstrip())]


def _function_locals(fn: ast.AST) -> list[str]:
    names = {a.arg for a in (*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs)}
    names |= {a.arg for a in (fn.args.vararg, fn.args.kwarg) if a is not None}
    for n in ast.walk(fn):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            names.add(n.id)
    return sorted(names - {"self", "cls"})


def _in_fstring(tree: ast.AST) -> set[int]:
    """ids of nodes inside f-strings: their positions are unreliable before Python 3.12."""
    inside = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.JoinedStr):
            inside |= {id(c) for c in ast.walk(n)}
    return inside


def _is_docstring(parent: ast.AST, stmt: ast.stmt) -> bool:
    body = getattr(parent, "body", None)
    return (bool(body) and body[0] is stmt and isinstance(stmt, ast.Expr)
            and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str))


def _body_lists(fn: ast.AST):
    """(owner, statement list) of every block inside a function, nested functions excluded."""
    todo = [fn]
    while todo:
        node = todo.pop()
        for fld in ("body", "orelse", "finalbody"):
            stmts = getattr(node, fld, None)
            if isinstance(stmts, list) and stmts and isinstance(stmts[0], ast.stmt):
                yield node, stmts
                todo.extend(s for s in stmts if not isinstance(
                    s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))
        for h in getattr(node, "handlers", []) or []:
            yield h, h.body
            todo.extend(h.body)


def _functions(tree: ast.Module):
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield n


OP_TEXT = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==",
           ast.NotEq: "!=", ast.Is: "is", ast.IsNot: "is not", ast.In: "in",
           ast.NotIn: "not in", ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/",
           ast.FloorDiv: "//", ast.Mod: "%", ast.LShift: "<<", ast.RShift: ">>",
           ast.BitAnd: "&", ast.BitOr: "|", ast.And: "and", ast.Or: "or"}


def _expr_mutations(fn, src_b, offs, skip, fn_locals) -> list[Mutation]:
    """Expression-level mutations, written as text edits of the original span (an operator
    token swapped in place, an operand wrapped) so quoting and layout stay as they were."""
    out: list[Mutation] = []
    own = set()
    for n in ast.walk(fn):  # nodes of nested functions are visited with those functions
        if n is not fn and isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            own |= {id(c) for c in ast.walk(n) if c is not n}

    def text(node) -> str:
        a, b = _span(node, offs)
        return src_b[a:b].decode("utf-8")

    def add(op, node, replacement: str):
        a, b = _span(node, offs)
        out.append(Mutation(op, node.lineno, a, b, replacement))

    def swap_gap(op, node, left, right, old, new):
        """Swap the operator token between two operands; False when the gap holds more than
        the token (comments, line continuations): then the caller skips the site."""
        a, _ = _span(node, offs)
        _, la = _span(left, offs)
        ra, _ = _span(right, offs)
        gap = src_b[la:ra].decode("utf-8")
        core = gap.strip(" ()\t\r\n")  # a line break before the token stays
        if " ".join(core.split()) != OP_TEXT[old]:
            return
        i = gap.index(core)
        whole = text(node)
        rel = la - a
        add(op, node, whole[:rel] + gap[:i] + OP_TEXT[new] + gap[i + len(core):]
            + whole[rel + len(gap):])

    # the body only: defaults and decorators run at import time, not when a test calls fn
    body_nodes = [n for stmt in fn.body for n in ast.walk(stmt)]
    for n in body_nodes:
        if id(n) in skip or id(n) in own or not hasattr(n, "lineno") or n is fn \
                or isinstance(n, ast.stmt):
            continue
        if isinstance(n, ast.Compare) and len(n.ops) == 1 and type(n.ops[0]) in COMPARE_SWAP:
            t = type(n.ops[0])
            swap_gap("flip_comparison", n, n.left, n.comparators[0], t, COMPARE_SWAP[t])
        elif isinstance(n, ast.BinOp) and type(n.op) in ARITH_SWAP:
            swap_gap("change_arith", n, n.left, n.right, type(n.op), ARITH_SWAP[type(n.op)])
        elif isinstance(n, ast.BoolOp) and len(n.values) == 2:
            t = type(n.op)
            swap_gap("change_boolop", n, n.values[0], n.values[1], t,
                     ast.Or if t is ast.And else ast.And)
        elif isinstance(n, ast.Constant) and type(n.value) is int and n.value >= 0 \
                and text(n).isdigit():
            add("off_by_one", n, str(n.value + 1))
            if n.value > 0:
                add("off_by_one", n, str(n.value - 1))
        elif isinstance(n, ast.Constant) and type(n.value) is bool:
            add("change_literal", n, str(not n.value))
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in SEPARATORS \
                and text(n) in (repr(n.value), f'"{n.value}"'):
            q = text(n)[0]
            for s in SEPARATORS:
                if s != n.value:
                    add("change_literal", n, f"{q}{s}{q}")
        elif isinstance(n, ast.Slice):
            for bound in (n.lower, n.upper):
                if bound is not None and not isinstance(bound, ast.Constant):
                    for sign in ("+", "-"):
                        add("off_by_one", bound, f"{text(bound)} {sign} 1")
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "range" \
                and n.args and not isinstance(n.args[-1], (ast.Constant, ast.Starred)):
            bound = n.args[-1] if len(n.args) <= 2 else n.args[1]
            for sign in ("+", "-"):
                add("off_by_one", bound, f"{text(bound)} {sign} 1")
        if isinstance(n, ast.Call) and len(n.args) >= 2 and not any(
                isinstance(a, ast.Starred) for a in n.args[:2]) \
                and text(n.args[0]) != text(n.args[1]):
            # swap the two texts inside the call's own span
            a, _ = _span(n, offs)
            (a0, b0), (a1, b1) = _span(n.args[0], offs), _span(n.args[1], offs)
            whole = src_b[a:_span(n, offs)[1]]
            new = (whole[:a0 - a] + src_b[a1:b1] + whole[b0 - a:a1 - a] + src_b[a0:b0]
                   + whole[b1 - a:])
            add("swap_arguments", n, new.decode("utf-8"))
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id in fn_locals:
            for other in fn_locals:
                if other != n.id:
                    add("swap_variable", n, other)
    return out


def mutations(source: str) -> list[Mutation]:
    """Every single-site mutation of the function bodies of ``source`` (in source order).
    A source that does not parse has none."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    src_b = source.encode("utf-8")
    offs = _offsets(source)
    skip = _in_fstring(tree)
    out: list[Mutation] = []
    made_in: dict[int, ast.AST] = {}  # id(mutation) -> the function it was made in
    for fn in _functions(tree):
        first = len(out)
        locals_ = _function_locals(fn)
        out += _expr_mutations(fn, src_b, offs, skip, locals_)
        for owner, stmts in _body_lists(fn):
            for i, s in enumerate(stmts):
                if _is_docstring(owner, s):
                    continue
                a, b = _stmt_span(s, offs, src_b)
                pad = _indent(s, src_b, offs)
                if isinstance(s, (ast.If, ast.While)) and id(s.test) not in skip:
                    t = s.test
                    ta, tb = _span(t, offs)
                    if isinstance(t, ast.UnaryOp) and isinstance(t.op, ast.Not):
                        oa, ob = _span(t.operand, offs)
                        new = src_b[oa:ob].decode("utf-8")
                    else:
                        inner = src_b[ta:tb].decode("utf-8")
                        simple = isinstance(t, (ast.Name, ast.Call, ast.Attribute, ast.Subscript))
                        new = f"not {inner}" if simple else f"not ({inner})"
                    out.append(Mutation("negate_condition", t.lineno, ta, tb, new))
                if not _owns_lines(s, offs, src_b):
                    continue  # a whole-line edit would take the lines' other statements
                if isinstance(s, ast.Return):
                    out.append(Mutation("remove_return", s.lineno, a, b, f"{pad}pass\n"))
                elif isinstance(s, ast.If) and not s.orelse and len(stmts) > 1:
                    out.append(Mutation("remove_branch", s.lineno, a, b, ""))
                elif isinstance(s, ast.If) and s.orelse and not (
                        len(s.orelse) == 1 and isinstance(s.orelse[0], ast.If)):
                    # drop the else block: from its "else:" line to the end of the if
                    ea = offs[s.orelse[0].lineno - 2] if s.orelse[0].lineno >= 2 else a
                    line = src_b[ea:offs[s.orelse[0].lineno - 1]].decode("utf-8").strip()
                    if line == "else:":
                        out.append(Mutation("remove_branch", s.lineno, ea, b, ""))
                elif isinstance(s, (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign)) \
                        and len(stmts) > 1:
                    out.append(Mutation("remove_statement", s.lineno, a, b, ""))
        made_in.update((id(m), fn) for m in out[first:])
    out.sort(key=lambda m: (m.start, m.end, m.operator, m.replacement))
    return _distinct_valid(out, made_in, src_b, offs)


def _block(fn: ast.AST, offs: list[int], src_b: bytes) -> tuple[int, int]:
    """The whole lines of ``fn``, decorators included."""
    first = min([fn.lineno, *(d.lineno for d in fn.decorator_list)])
    return offs[first - 1], _stmt_span(fn, offs, src_b)[1]


def _regions(fn: ast.AST, offs: list[int], src_b: bytes) -> list[tuple[int, int]]:
    """Spans (whole lines) that parse on their own, smallest first: ``fn`` and each statement
    inside it that owns its lines, but an ``elif`` (its line is no statement alone)."""
    out = [_block(fn, offs, src_b)]
    for n in ast.walk(fn):
        if n is fn or not isinstance(n, ast.stmt) or not _owns_lines(n, offs, src_b):
            continue
        a, b = _stmt_span(n, offs, src_b)
        if isinstance(n, ast.If) and src_b[a:b].lstrip().startswith(b"elif"):
            continue
        out.append((a, b))
    return sorted(set(out), key=lambda r: (r[1] - r[0], r[0]))


def _parses(text: bytes) -> bool:
    """Whole lines of a function parse alone; indented ones under ``if 1:`` (a block may
    open at any indentation, and the lines are not touched, so strings keep their text)."""
    prefix = b"if 1:\n" if text[:1] in (b" ", b"\t") else b""
    try:
        ast.parse((prefix + text).decode("utf-8"))
        return True
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return False


def _distinct_valid(muts: list[Mutation], made_in: dict[int, ast.AST], src_b: bytes,
                    offs: list[int]) -> list[Mutation]:
    """``muts`` less those whose result does not parse (a span edit can still break the
    syntax somewhere no rule foresaw), leaves the source as it was, or equals an earlier
    mutation's result (two rules writing the same text: one bug, drawn once).

    Not the whole file is parsed again per mutation (a large module would cost minutes): a
    body edit can break the grammar only inside the smallest statement (or function) that
    holds it, and a whole-line removal inside the one around it; ast.parse checks the
    grammar only, so that piece parsing alone is the file parsing. Sameness is decided on
    the function's text: mutations of different functions never give the same file."""
    regions: dict[int, list[tuple[int, int]]] = {}  # id(function) -> its _regions
    seen: set[tuple[int, bytes]] = set()
    kept = []
    for m in muts:
        fn = made_in[id(m)]
        if id(fn) not in regions:
            regions[id(fn)] = _regions(fn, offs, src_b)
        fa, fb = _block(fn, offs, src_b)
        new = m.replacement.encode("utf-8")
        whole = src_b[fa:m.start] + new + src_b[m.end:fb]
        if whole == src_b[fa:fb] or (fa, whole) in seen:
            continue
        ra, rb = next(r for r in regions[id(fn)]
                      if r[0] <= m.start and m.end <= r[1] and r != (m.start, m.end))
        if not _parses(src_b[ra:m.start] + new + src_b[m.end:rb]):
            continue
        seen.add((fa, whole))
        kept.append(m)
    return kept


def sample(muts: list[Mutation], covered: set[int], seed: int, limit: int) -> list[Mutation]:
    """Up to ``limit`` mutations on covered lines, deterministic for ``seed``; operators take
    turns (round robin in a seeded order) so a rare operator is tried as often as a common one
    allows."""
    rng = random.Random(seed)
    by_op: dict[str, list[Mutation]] = {}
    for m in muts:
        if m.line in covered:
            by_op.setdefault(m.operator, []).append(m)
    for ms in by_op.values():
        rng.shuffle(ms)
    ops = [o for o in OPERATORS if o in by_op]
    rng.shuffle(ops)
    picked: list[Mutation] = []
    while len(picked) < limit and any(by_op[o] for o in ops):
        for o in ops:
            if by_op[o] and len(picked) < limit:
                picked.append(by_op[o].pop())
    return picked


def unified_diff(before: str, after: str, path: str) -> str:
    return "".join(difflib.unified_diff(before.splitlines(keepends=True),
                                        after.splitlines(keepends=True),
                                        f"a/{path}", f"b/{path}"))


def candidate_fixes(snippet: str) -> list[tuple[int, str, str]]:
    """(line, replacement text of that line, rule) for every single-rule rewrite of the one-line
    statements of ``snippet``, a piece of code as an agent sees it (not necessarily a whole
    file). Lines that do not parse alone (e.g. ``if x:``) are completed with a body first.
    Rewrites are the operators' rules, which are their own inverses, plus removing a ``not``
    and a ``+ 1``/``- 1``: the inverses of negate_condition and off_by_one."""
    out: list[tuple[int, str]] = []
    # the locals of the viewed function (when it parses) make swap_variable's inverse possible
    try:
        tree = ast.parse(textwrap.dedent(snippet))
        fn = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
        names = _function_locals(fn) if fn is not None else []
    except SyntaxError:
        names = []
    preamble = f"    {' = '.join(names)} = None\n" if names else ""
    target = 3 if names else 2  # the line of the fake function that holds the viewed line
    for no, line in enumerate(snippet.splitlines(), 1):
        body = line.strip()
        if not body or body.startswith(("#", "def ", "class ", "@")):
            continue
        pad = line[:len(line) - len(body)]
        opener = body.endswith(":")
        text = body + (" pass" if opener else "")
        if body.startswith(("elif ", "else")):
            text = "if " + text[5:] if body.startswith("elif ") else None
        if text is None:
            continue
        fake = "def _f():\n" + preamble + "    " + text + "\n"
        seen = {line}
        for m in mutations(fake):
            if m.operator.startswith("remove_") or m.line != target:
                continue  # removing code is never a fix for missing code
            new = m.apply(fake).split("\n")[target - 1]
            new_body = new[4:]
            if opener:
                if not new_body.endswith(" pass"):
                    continue
                new_body = new_body[:-len(" pass")]
            if body.startswith("elif "):
                new_body = "elif " + new_body[3:]
            cand = pad + new_body
            if cand not in seen:
                seen.add(cand)
                out.append((no, cand, m.operator))
        for pat in (" + 1", " - 1"):  # inverse of off_by_one on a non-constant bound
            if pat in body:
                cand = pad + body.replace(pat, "", 1)
                if cand not in seen:
                    seen.add(cand)
                    out.append((no, cand, "off_by_one"))
    return out
