"""Guess a type spec for each parameter of a function, for generating inputs.

Order of evidence: the annotation (when we can make values for it), the type of a literal
default, ``isinstance(p, T)`` checks (a union of the types checked), strong usage votes
(``p.lower()`` -> str, ``range(p)`` -> int, ``p.items()`` -> dict, ``p(...)`` -> CALLABLE),
the parameter's name (``n``/``count`` -> int, ``s``/``text`` -> str), then weak usage votes
(``len(p)``, ``p[i]``, ``for x in p`` -> list; true of strings too, hence after the name).
``None`` when nothing is known (the input generator then draws from a mixed pool). Most of the
standard library is unannotated, so the usage vote carries most of the weight there.
"""

from __future__ import annotations

import ast
from collections import Counter

from .values import ANY, BYTES, FLOAT, INT, STR, spec_from_annotation, spec_of_value

CALLABLE = ("callable",)  # called in the body: no literal fits; left at its default if it has one
_ISINSTANCE = {"str": STR, "int": INT, "float": FLOAT, "bytes": BYTES, "bool": ("bool",),
               "list": ("list", INT), "dict": ("dict", STR, INT), "tuple": ("tuplev", INT),
               "set": ("set", INT), "complex": ("complex",)}

_STR_METHODS = {
    "lower", "upper", "startswith", "endswith", "strip", "lstrip", "rstrip", "split", "rsplit",
    "splitlines", "replace", "find", "rfind", "index", "isdigit", "isalpha", "isspace",
    "isalnum", "isupper", "islower", "isidentifier", "isdecimal", "isnumeric", "encode",
    "format", "partition", "rpartition", "expandtabs", "casefold", "ljust", "rjust", "center",
    "zfill", "title", "capitalize", "swapcase", "translate", "count", "removeprefix",
    "removesuffix", "format_map", "istitle", "isprintable", "isascii",
}
_ONLY_STR = _STR_METHODS - {"index", "count", "find", "rfind", "startswith", "endswith", "split",
                            "strip", "replace", "translate", "partition", "lstrip", "rstrip"}
_LIST_METHODS = {"append", "extend", "insert", "pop", "sort", "reverse", "remove", "clear"}
_DICT_METHODS = {"items", "keys", "values", "get", "setdefault", "popitem", "update"}
_SET_METHODS = {"add", "discard", "union", "intersection", "difference", "issubset",
                "issuperset", "symmetric_difference"}
_INT_FUNCS = {"range", "chr", "bin", "hex", "oct"}
# ``mod.f(p)`` (os.path / re / urllib.parse style helpers) whose arguments are text
_TEXT_ATTR_FUNCS = {"fspath", "fsencode", "fsdecode", "normcase", "normpath", "basename",
                    "dirname", "splitext", "splitdrive", "isabs", "match", "fullmatch", "search",
                    "findall", "finditer", "escape", "quote", "unquote", "dedent"}
_SEQ_FUNCS = {"len", "sorted", "reversed", "enumerate", "list", "tuple", "set", "sum", "max",
              "min", "any", "all", "iter", "zip", "frozenset"}
_NAME_HINTS = [
    (INT, {"n", "i", "j", "k", "m", "count", "num", "number", "size", "length", "width", "height",
           "index", "idx", "pos", "start", "stop", "end", "step", "offset", "level", "depth",
           "base", "year", "month", "day", "hour", "minute", "second", "x", "y",
           "lo", "hi", "nbytes", "bits", "code", "value", "val", "limit", "maxlen"}),
    (FLOAT, {"r", "g", "h", "l", "v", "t", "ratio", "scale", "alpha", "weight", "prob", "rate",
             "f", "angle", "seconds", "timeout"}),
    (STR, {"s", "string", "text", "name", "path", "pattern", "pat", "prefix", "suffix", "word",
           "line", "char", "c", "ch", "sep", "fmt", "format", "key", "url", "filename", "msg",
           "message", "label", "title", "source", "src", "encoding", "errors", "mode", "data",
           "p", "sub", "chars", "tag", "attr", "ident", "token"}),
    (BYTES, {"b", "buf", "buffer", "raw", "payload", "blob"}),
    (("list", INT), {"seq", "lst", "items", "values", "nums", "numbers", "xs", "elements",
                     "array", "arr", "iterable", "sequence", "l", "li", "vals", "data_list"}),
    (("dict", STR, INT), {"d", "mapping", "dct", "dic", "table", "counts", "kwargs_dict"}),
]


class _Votes:
    def __init__(self, names):
        self.strong = {n: Counter() for n in names}
        self.weak = {n: Counter() for n in names}
        self.isinstance = {n: [] for n in names}


def _vote_usage(fn: ast.FunctionDef, names: set[str]) -> _Votes:
    v = _Votes(names)
    is_param = lambda n: isinstance(n, ast.Name) and n.id in names  # noqa: E731
    for node in ast.walk(fn):
        if isinstance(node, ast.Attribute) and is_param(node.value):
            s, m = v.strong[node.value.id], node.attr
            if m == "decode":
                s[BYTES] += 2
            elif m in _ONLY_STR:
                s[STR] += 2
            elif m in _STR_METHODS:
                s[STR] += 1
            elif m in _LIST_METHODS:
                s[("list", INT)] += 2
            elif m in _DICT_METHODS:
                s[("dict", STR, INT)] += 2
            elif m in _SET_METHODS:
                s[("set", INT)] += 2
            elif m in ("real", "imag", "bit_length", "to_bytes", "conjugate"):
                s[INT] += 2
            elif m in ("is_integer", "as_integer_ratio"):
                s[FLOAT] += 1
        elif isinstance(node, ast.Call):
            if is_param(node.func):
                v.strong[node.func.id][CALLABLE] += 3
            if isinstance(node.func, ast.Attribute) and node.func.attr in _TEXT_ATTR_FUNCS:
                for a in node.args:
                    if is_param(a):
                        v.strong[a.id][STR] += 1
            if not isinstance(node.func, ast.Name):
                continue
            f = node.func.id
            if f == "isinstance" and len(node.args) == 2 and is_param(node.args[0]):
                t = node.args[1]
                for e in (t.elts if isinstance(t, ast.Tuple) else [t]):
                    spec = _ISINSTANCE.get(e.id) if isinstance(e, ast.Name) else None
                    if spec and spec not in v.isinstance[node.args[0].id]:
                        v.isinstance[node.args[0].id].append(spec)
                continue
            for a in node.args:
                if not is_param(a):
                    continue
                if f in _INT_FUNCS:
                    v.strong[a.id][INT] += 2
                elif f == "ord":
                    v.strong[a.id][STR] += 2
                elif f in ("float", "abs", "round", "divmod", "pow", "math") or (
                        f in ("max", "min", "sum") and len(node.args) > 1):
                    v.strong[a.id][FLOAT] += 1
                elif f in _SEQ_FUNCS and len(node.args) == 1:
                    v.weak[a.id][("list", INT)] += 1
        elif isinstance(node, (ast.BinOp, ast.Compare, ast.AugAssign)):
            pairs = ([node.left, node.right] if isinstance(node, ast.BinOp)
                     else [node.left, *node.comparators] if isinstance(node, ast.Compare)
                     else [node.target, node.value])
            consts = [p.value for p in pairs if isinstance(p, ast.Constant)]
            for p in pairs:
                if not is_param(p):
                    continue
                for c in consts:
                    s = spec_of_value(c)
                    if s in (INT, FLOAT, STR, BYTES):
                        v.strong[p.id][s] += 1
                if isinstance(node, ast.BinOp) and not consts and isinstance(
                        node.op, (ast.FloorDiv, ast.LShift, ast.RShift, ast.BitAnd, ast.BitXor)):
                    v.strong[p.id][INT] += 1
        elif isinstance(node, (ast.For, ast.comprehension)) and is_param(node.iter):
            v.weak[node.iter.id][("list", INT)] += 1
        elif isinstance(node, ast.Subscript) and is_param(node.value):
            sl = node.slice
            if isinstance(sl, ast.Constant) and isinstance(sl.value, str):
                v.strong[node.value.id][("dict", STR, INT)] += 2
            else:
                v.weak[node.value.id][("list", INT)] += 1
    return v


def _best(votes: Counter):
    if not votes:
        return None
    top = max(votes.values())
    # ties broken by first seen kind (Counter keeps insertion order, ast.walk is fixed)
    return next(s for s, c in votes.items() if c == top)


def infer_param_specs(fn: ast.FunctionDef) -> dict[str, tuple | None]:
    """Type spec (or None) for every named parameter of ``fn`` (varargs excluded)."""
    a = fn.args
    params = a.posonlyargs + a.args + a.kwonlyargs
    positional = a.posonlyargs + a.args
    defaults = dict(zip([p.arg for p in positional[len(positional) - len(a.defaults):]],
                        a.defaults))
    defaults.update({p.arg: d for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None})
    votes = _vote_usage(fn, {p.arg for p in params})
    out: dict[str, tuple | None] = {}
    for p in params:
        spec = spec_from_annotation(ast.unparse(p.annotation)) if p.annotation else None
        if spec is None and p.arg in defaults:
            try:
                value = ast.literal_eval(defaults[p.arg])
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                value = None
            if value is not None:
                spec = spec_of_value(value)
        if spec is None and votes.isinstance[p.arg]:
            found = votes.isinstance[p.arg]
            spec = found[0] if len(found) == 1 else ("union", tuple(found))
        if spec is None:
            spec = _best(votes.strong[p.arg])
        if spec is None:
            spec = next((s for s, ns in _NAME_HINTS if p.arg.lower() in ns), None)
        if spec is None:
            spec = _best(votes.weak[p.arg])
        out[p.arg] = None if spec == ANY else spec
    return out
