"""Types we can make inputs for, and Python values rendered as literal source.

A *type spec* is a small tuple language, read from annotation source or inferred (``infer.py``):
``("int",) ("float",) ("complex",) ("str",) ("bytes",) ("bool",) ("none",) ("any",)
("list", T) ("set", T) ("tuplev", T) ("tuple", (T1, T2, ...)) ("dict", K, V) ("union", (T1, ...))``.

Only values that have a literal spelling are ever produced: nan/inf are excluded, frozensets are
given as sets, and sets are rendered with their elements sorted by their rendering so the text
does not depend on PYTHONHASHSEED.
"""

from __future__ import annotations

import ast
import math

INT, FLOAT, STR, BYTES, BOOL, NONE, ANY = (("int",), ("float",), ("str",), ("bytes",),
                                           ("bool",), ("none",), ("any",))

_SCALARS = {
    "int": INT, "float": FLOAT, "complex": ("complex",), "str": STR, "bytes": BYTES,
    "bool": BOOL, "None": NONE, "NoneType": NONE, "Any": ANY, "object": ANY, "AnyStr": STR,
    "Text": STR, "SupportsInt": INT, "SupportsFloat": FLOAT, "SupportsIndex": INT,
    "LiteralString": STR, "Hashable": INT, "bytearray": BYTES,
}
_SEQ = {"list", "List", "Sequence", "MutableSequence", "Iterable", "Collection", "Reversible",
        "Container", "Sized"}
_SET = {"set", "Set", "frozenset", "FrozenSet", "AbstractSet", "MutableSet"}
_MAP = {"dict", "Dict", "Mapping", "MutableMapping", "OrderedDict", "defaultdict"}
_TUP = {"tuple", "Tuple"}


def _tail(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def spec_from_annotation(annotation: str | None, depth: int = 0):
    """Type spec of an annotation's source, or None if we cannot make values for it."""
    if annotation is None or depth > 4:
        return None
    try:
        node = ast.parse(annotation, mode="eval").body
    except SyntaxError:
        return None
    return _spec(node, depth)


def _spec(node: ast.expr, depth: int):
    if isinstance(node, ast.Constant):
        if node.value is None:
            return NONE
        if isinstance(node.value, str):  # forward reference / string annotation
            return spec_from_annotation(node.value, depth + 1)
        return None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        parts = [_spec(node.left, depth), _spec(node.right, depth)]
        return None if None in parts else ("union", tuple(parts))
    name = _tail(node)
    if name is not None:
        if name in _SCALARS:
            return _SCALARS[name]
        if name in _SEQ:
            return ("list", ANY)
        if name in _SET:
            return ("set", INT)
        if name in _MAP:
            return ("dict", STR, ANY)
        if name in _TUP:
            return ("tuplev", ANY)
        return None
    if not isinstance(node, ast.Subscript):
        return None
    base = _tail(node.value)
    sl = node.slice
    args = list(sl.elts) if isinstance(sl, ast.Tuple) else [sl]
    sub = [_spec(a, depth + 1) for a in args]
    if base == "Optional" and len(sub) == 1 and sub[0] is not None:
        return ("union", (NONE, sub[0]))
    if base == "Union" and None not in sub:
        return ("union", tuple(sub))
    if base == "Literal":
        return _literal_union(args)
    if base == "Annotated" and sub and sub[0] is not None:
        return sub[0]
    if base in _TUP:
        if len(args) == 2 and isinstance(args[1], ast.Constant) and args[1].value is Ellipsis:
            return ("tuplev", sub[0]) if sub[0] is not None else None
        return None if None in sub else ("tuple", tuple(sub))
    if None in sub:
        return None
    if base in _SEQ and len(sub) == 1:
        return ("list", sub[0])
    if base in _SET and len(sub) == 1:
        return ("set", sub[0] if hashable(sub[0]) else INT)
    if base in _MAP and len(sub) == 2:
        return ("dict", sub[0] if hashable(sub[0]) else STR, sub[1])
    return None


def _literal_union(args: list[ast.expr]):
    vals = []
    for a in args:
        try:
            vals.append(("const", render(ast.literal_eval(a))))
        except (ValueError, TypeError, SyntaxError, Unrenderable):
            return None
    return ("union", tuple(vals)) if vals else None


def hashable(spec) -> bool:
    if spec[0] in ("list", "set", "dict", "any", "tuplev"):
        return spec[0] == "tuplev" and hashable(spec[1])
    if spec[0] == "tuple":
        return all(hashable(s) for s in spec[1])
    if spec[0] == "union":
        return all(hashable(s) for s in spec[1])
    return True


def spec_of_value(value, depth: int = 0):
    """Type spec of a literal value (used for defaults and harvested examples)."""
    if isinstance(value, bool):
        return BOOL
    for t, s in ((int, INT), (float, FLOAT), (complex, ("complex",)), (str, STR), (bytes, BYTES)):
        if isinstance(value, t):
            return s
    if value is None:
        return NONE
    if depth > 3:
        return ANY
    if isinstance(value, (list, set, tuple)) and value:
        inner = spec_of_value(next(iter(value)), depth + 1)
        if isinstance(value, tuple):
            return ("tuple", tuple(spec_of_value(v, depth + 1) for v in value))
        return (type(value).__name__, inner if isinstance(value, list) or hashable(inner) else INT)
    if isinstance(value, dict) and value:
        k, v = next(iter(value.items()))
        ks = spec_of_value(k, depth + 1)
        return ("dict", ks if hashable(ks) else STR, spec_of_value(v, depth + 1))
    return {list: ("list", INT), set: ("set", INT), tuple: ("tuplev", INT),
            dict: ("dict", STR, INT)}.get(type(value), ANY)


class Unrenderable(ValueError):
    pass


def render(value) -> str:
    """Literal source of a value; ``ast.literal_eval(render(v)) == v`` (for finite numbers)."""
    if value is None or isinstance(value, (bool, int, str, bytes)):
        return repr(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Unrenderable("non-finite float")
        return repr(value)
    if isinstance(value, complex):
        if not (math.isfinite(value.real) and math.isfinite(value.imag)):
            raise Unrenderable("non-finite complex")
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(render(v) for v in value) + "]"
    if isinstance(value, tuple):
        if len(value) == 1:
            return f"({render(value[0])},)"
        return "(" + ", ".join(render(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{render(k)}: {render(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (set, frozenset)):
        if not value:
            return "set()"
        return "{" + ", ".join(sorted(render(v) for v in value)) + "}"
    raise Unrenderable(type(value).__name__)


# ---- sampling: small, human-looking values from a type spec with a seeded random.Random ----

_WORDS = ("hello", "world", "foo", "bar", "abc", "a b c", "Hello, World!", "x=1, y=2",
          "path/to/file.txt", "CamelCase", "snake_case", "  padded  ", "123", "3.14", "a,b,c",
          "line1\nline2", "tab\tsep", "naïve café", "UPPER", "key: value", "", "a", "ab")
_CHARS = "abcdefghijklmnopqrstuvwxyz" * 3 + "ABCXYZ0123456789" * 2 + " _-.,:/\\'\"()[]*?!\n\té"
_SPECIAL_INTS = (0, 1, -1, 2, 3, 7, 10, 16, 100, 255, 256, 1024, 65535, 2**31 - 1, 2**32, 2**63)
_SPECIAL_FLOATS = (0.0, 1.0, -1.0, 0.5, 0.25, 2.0, 1e-09, 1e10, -0.0, 3.14159, 100.0)


def _sample_int(rng) -> int:
    r = rng.random()
    if r < 0.45:
        return rng.randint(-3, 10)
    if r < 0.75:
        return rng.randint(-1000, 1000)
    if r < 0.9:
        return rng.choice(_SPECIAL_INTS)
    return rng.randint(-(2**40), 2**40)


def _sample_float(rng) -> float:
    r = rng.random()
    if r < 0.35:
        return round(rng.random(), 3)
    if r < 0.7:
        return round(rng.uniform(-100, 100), 2)
    if r < 0.85:
        return rng.choice(_SPECIAL_FLOATS)
    return float(rng.randint(-50, 50))


def _sample_str(rng) -> str:
    if rng.random() < 0.4:
        return rng.choice(_WORDS)
    n = rng.choice((0, 1, 1, 2, 3, 3, 4, 5, 6, 8, 10, 12))
    return "".join(rng.choice(_CHARS) for _ in range(n))


def _sample_bytes(rng) -> bytes:
    if rng.random() < 0.7:
        return _sample_str(rng).encode("utf-8")
    return bytes(rng.randrange(256) for _ in range(rng.randint(0, 8)))


_ANY_SPECS = (INT, INT, STR, STR, ("list", INT), FLOAT, BOOL, NONE, ("list", STR))


def sample(spec, rng, depth: int = 0):
    """A value of type ``spec`` (None = unknown: a mixed pool). Pure in (spec, rng state)."""
    if spec is None or spec[0] == "any":
        spec = rng.choice(_ANY_SPECS) if depth < 3 else INT
    kind = spec[0]
    if kind == "int":
        return _sample_int(rng)
    if kind == "float":
        return _sample_float(rng)
    if kind == "str":
        return _sample_str(rng)
    if kind == "bytes":
        return _sample_bytes(rng)
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "complex":
        return complex(rng.randint(-5, 5), rng.randint(-5, 5))
    if kind == "const":
        return ast.literal_eval(spec[1])
    if kind == "union":
        return sample(rng.choice(spec[1]), rng, depth + 1)
    if kind == "tuple":
        return tuple(sample(s, rng, depth + 1) for s in spec[1])
    n = rng.choice((0, 1, 2, 3, 3, 4, 5)) if depth < 3 else 0
    if kind == "list":
        return [sample(spec[1], rng, depth + 1) for _ in range(n)]
    if kind == "tuplev":
        return tuple(sample(spec[1], rng, depth + 1) for _ in range(n))
    if kind == "set":
        return {sample(spec[1], rng, depth + 1) for _ in range(n)}
    if kind == "dict":
        return {sample(spec[1], rng, depth + 1): sample(spec[2], rng, depth + 1) for _ in range(n)}
    return _sample_int(rng)
