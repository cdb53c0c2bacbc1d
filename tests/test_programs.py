"""stages/programs: standalone-function extraction, input generation, harvesting, doctests,
fuzzing and the corpus driver, on real standard-library sources and small hand-written modules.

Nothing here runs the extracted programs: like the stage itself, the tests only parse and
compile them (the tracer runs them, in its sandbox)."""

from __future__ import annotations

import ast
import random
import sysconfig
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from stages.programs import (FunctionCandidate, InputCase, ProgramCase, call_expression,
                             doctest_calls, extract_doctests, extract_functions, generate_inputs,
                             harvest_calls, harvest_corpus, iter_programs, mutate)
from stages.programs.fuzz import parse_args
from stages.programs.values import render, sample, spec_from_annotation

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_source(name: str) -> str:
    return (STDLIB / f"{name}.py").read_text(encoding="utf-8")


def by_name(cands: list[FunctionCandidate]) -> dict[str, FunctionCandidate]:
    return {c.qualname: c for c in cands}


def compiles(code: str) -> bool:
    compile(code, "<program>", "exec", dont_inherit=True)
    return True


def literal_args(args_source: str):
    """The values of an argument list; fails unless every argument is a Python literal."""
    call = ast.parse(f"f({args_source})", mode="eval").body
    return ([ast.literal_eval(a) for a in call.args],
            {k.arg: ast.literal_eval(k.value) for k in call.keywords})


MODULE = textwrap.dedent('''\
    """A hand-written module: one function per rule."""
    from __future__ import annotations
    import os
    import re
    import numpy as np
    from collections import deque
    from .sibling import helper
    from os import system

    LIMIT = 10
    SCALE = 1.0 / 3.0
    NAMES = ("a", "b")
    PATTERN = re.compile(r"[0-9]+")
    CONFIG = load_config()
    TWICE = 1
    TWICE = 2


    class Box:
        pass


    BOX = Box()


    def uses_builtins(x):
        return abs(x) + len(str(x))


    def uses_literal_constant(x, y=LIMIT):
        return x < LIMIT and y in NAMES


    def uses_computed_constant(x):
        return x * SCALE


    def uses_regex(s):
        return PATTERN.findall(s)


    def uses_deque(xs, n: int = 2):
        return list(deque(xs, maxlen=n))


    def uses_nonliteral_global(key):
        return CONFIG[key]


    def uses_class_instance(x):
        return BOX


    def uses_rebound_global(x):
        return x + TWICE


    def uses_numpy(xs):
        return np.sum(xs)


    def uses_relative_import(x):
        return helper(x)


    def calls_numpy_user(xs):
        return uses_numpy(xs)


    def _double(x):
        return x * 2


    def _inc_double(x):
        return _double(x) + 1


    def chain(x):
        return _inc_double(x) - LIMIT


    def even(n):
        return n == 0 or odd(n - 1)


    def odd(n):
        return n != 0 and even(n - 1)


    def reads_file(path):
        with open(path) as f:
            return f.read()


    def runs_command(cmd):
        return os.system(cmd)


    def runs_imported_system(cmd):
        return system(cmd)


    def sleeps(t):
        import time
        time.sleep(t)


    def evaluates(s):
        return eval(s)


    def reads_env(name):
        return os.environ.get(name)


    def module_as_value(name):
        return getattr(os, name)


    def joins(a, b):
        return os.path.join(a, b)


    @staticmethod
    def decorated(x):
        return x


    def writes_global(x):
        global LIMIT
        LIMIT = x


    def generator(n):
        yield n


    def main():
        return 0


    def signature(a, /, b: int, c="x", *rest: str, d, e: list[int] | None = None, **kw):
        return a


    def with_doctest(a, b=1):
        """Add.

        >>> with_doctest(1, 2)
        3
        >>> with_doctest(a=5)
        6
        >>> mod.with_doctest([1], [2])
        [1, 2]
        >>> x = 4
        >>> with_doctest(x)
        5
        >>> with_doctest(len("ab"), abs(-1))
        3
        """
        return a + b
    ''')


@pytest.fixture(scope="module")
def hand() -> dict[str, FunctionCandidate]:
    return by_name(extract_functions(MODULE, "pkg/hand.py"))


# ---- extraction ----

def test_colorsys_functions_are_standalone_with_their_constants():
    cands = by_name(extract_functions(stdlib_source("colorsys"), "colorsys"))
    assert {"rgb_to_hsv", "hsv_to_rgb", "rgb_to_hls", "hls_to_rgb", "rgb_to_yiq"} <= set(cands)
    c = cands["rgb_to_hsv"]
    assert c.module_id == "colorsys" and c.params[0].name == "r" and len(c.params) == 3
    assert c.program.lstrip().startswith("def rgb_to_hsv(r, g, b):") and compiles(c.program)
    hls = cands["hls_to_rgb"]  # ONE_THIRD = 1.0/3.0 and the helper _v come with it
    assert "ONE_THIRD = 1.0/3.0" in hls.program and "def _v(" in hls.program
    # source order (``_v`` follows ``hls_to_rgb`` in colorsys.py)
    assert hls.program.index("ONE_THIRD") < hls.program.index("def hls_to_rgb(") \
        < hls.program.index("def _v(")
    assert {"ONE_THIRD", "_v"} <= set(hls.deps) and compiles(hls.program)


def test_standalone_detection_on_a_hand_written_module(hand):
    standalone = {"uses_builtins", "uses_literal_constant", "uses_computed_constant", "uses_regex",
                  "uses_deque", "_double", "_inc_double", "chain", "even", "odd", "joins",
                  "signature", "with_doctest"}
    not_standalone = {"uses_nonliteral_global", "uses_class_instance", "uses_rebound_global",
                      "uses_numpy", "uses_relative_import", "calls_numpy_user", "reads_file",
                      "runs_command", "runs_imported_system", "sleeps", "evaluates", "reads_env",
                      "module_as_value", "decorated", "writes_global", "generator", "main"}
    assert standalone <= set(hand)
    assert not (not_standalone & set(hand))
    assert set(hand) == standalone  # nothing else sneaks in
    for c in hand.values():
        assert compiles(c.program), c.qualname
        assert c.program.startswith("from __future__ import annotations\n")


def test_program_layout_imports_and_transitive_dependencies(hand):
    c = hand["chain"]
    assert c.deps == ["LIMIT", "_double", "_inc_double"]
    body = c.program
    for piece in ("LIMIT = 10", "def _double(x):", "def _inc_double(x):", "def chain(x):"):
        assert piece in body
    # original order, and nothing unneeded
    assert body.index("LIMIT = 10") < body.index("def _double") < body.index("def _inc_double") \
        < body.index("def chain")
    assert "import" not in body.replace("from __future__ import annotations", "")
    assert "uses_builtins" not in body
    assert hand["uses_regex"].program.splitlines()[1] == "import re"
    assert "PATTERN = re.compile" in hand["uses_regex"].program
    assert "from collections import deque" in hand["uses_deque"].program
    assert "import numpy" not in hand["uses_deque"].program
    assert "def odd(" in hand["even"].program and "def even(" in hand["odd"].program


def test_parameters_are_reported_with_kinds_annotations_and_defaults(hand):
    params = [tuple(p) for p in hand["signature"].params]
    assert params == [
        ("a", "POSITIONAL_ONLY", None, None),
        ("b", "POSITIONAL_OR_KEYWORD", "int", None),
        ("c", "POSITIONAL_OR_KEYWORD", None, "'x'"),
        ("rest", "VAR_POSITIONAL", "str", None),
        ("d", "KEYWORD_ONLY", None, None),
        ("e", "KEYWORD_ONLY", "list[int] | None", "None"),
        ("kw", "VAR_KEYWORD", None, None),
    ]
    assert hand["signature"].lineno == MODULE.splitlines().index(
        next(l for l in MODULE.splitlines() if l.startswith("def signature("))) + 1


def test_extraction_is_deterministic_and_rejects_python2():
    src = stdlib_source("textwrap")
    a, b = extract_functions(src, "textwrap"), extract_functions(src, "textwrap")
    assert [c.qualname for c in a] == ["dedent", "indent"]
    assert a == b
    with pytest.raises(SyntaxError):
        extract_functions("def f(x):\n    print x\n", "py2")


# ---- harvesting ----

def test_harvest_calls_keeps_literal_arguments_only():
    src = textwrap.dedent("""\
        import posixpath
        f(1, 'a')
        f(1, 'a')
        f(x)
        f(*args)
        posixpath.join('a', 'b', sep='/')
        self.assertEqual(g([1, 2], {'k': (3, None)}), 0)
        h()
        g(-1.5)
        """)
    got = harvest_calls(src)
    assert got["f"] == ["1, 'a'"]
    assert got["join"] == ["'a', 'b', sep='/'"]
    assert got["g"] == ["[1, 2], {'k': (3, None)}", "-1.5"]
    assert "h" not in got
    assert "assertEqual" not in got  # its first argument is a call, not a literal


def test_harvest_corpus_caps_and_skips_unparseable():
    calls = "\n".join(f"f({i})" for i in range(40)) + "\nf('" + "x" * 300 + "')\n"
    records = [{"id": "a", "text": calls}, {"id": "py2", "text": "print 'hi'\n"},
               {"id": "b", "text": "f(1000)\nbisect_left([1, 2], 1)\n"}]
    got = harvest_corpus(records)
    assert got["f"] == [str(i) for i in range(16)]
    assert all(len(a) <= 200 for args in got.values() for a in args)
    assert got["bisect_left"] == ["[1, 2], 1"]


def test_harvest_on_real_stdlib_source():
    got = harvest_calls(stdlib_source("textwrap"))
    assert "'Hello there.\\n  This is indented.'" in got["dedent"]  # from its __main__ block
    assert got["ord"] == ["' '"]
    for args in (a for v in got.values() for a in v):
        literal_args(args)


# ---- doctests ----

def test_extract_doctests_uses_the_doctest_parser(hand):
    cases = extract_doctests(MODULE, "pkg/hand.py")
    assert [d.qualname for d in cases] == ["with_doctest"]
    d = cases[0]
    assert d.program == hand["with_doctest"].program
    assert d.examples[0] == ("with_doctest(1, 2)\n", "3\n")
    assert len(d.examples) == 6
    # literal calls feed the function's inputs ...
    assert hand["with_doctest"].doctest_inputs == ["1, 2", "a=5", "[1], [2]"]
    # ... and every call that can run against the program becomes a call expression:
    # ``mod.f`` is rewritten, names bound by earlier examples are not available
    assert doctest_calls(d) == ["with_doctest(1, 2)", "with_doctest(a=5)",
                                "with_doctest([1], [2])", "with_doctest(len('ab'), abs(-1))"]


def test_doctests_of_a_stdlib_module():
    cases = by_name(extract_doctests(stdlib_source("statistics"), "statistics"))
    assert "multimode" in cases and cases["multimode"].program is not None
    calls = doctest_calls(cases["multimode"])
    assert "multimode('aabbbbbbbbcc')" in calls
    assert cases["mean"].examples and cases["mean"].program is None  # needs classes: not standalone


# ---- inputs ----

def test_generate_inputs_is_deterministic_and_seed_dependent():
    c = by_name(extract_functions(stdlib_source("colorsys"), "colorsys"))["rgb_to_hsv"]
    a = generate_inputs(c, [], seed=1, max_inputs=8)
    assert a == generate_inputs(c, [], seed=1, max_inputs=8)
    assert a != generate_inputs(c, [], seed=2, max_inputs=8)
    assert len(a) == 8 and len({x.args_source for x in a}) == 8
    assert {x.generator for x in a} <= {"annotation", "fuzz"}
    for x in a:
        pos, kw = literal_args(x.args_source)
        assert len(pos) == 3 and not kw and all(isinstance(v, float) for v in pos)
        assert compiles(c.program + "\n" + call_expression(c, x))


def test_generate_inputs_order_sources_and_cap(hand):
    c = hand["with_doctest"]
    harvested = ["7, 8", "1, 2", "1, 2, 3, 4", "'s', 't'", "b=2"]  # 3 args / no `a`: do not bind
    got = generate_inputs(c, harvested, seed=0, max_inputs=10)
    gens = [x.generator for x in got]
    order = ["doctest", "harvested", "default", "annotation", "fuzz"]
    assert gens == sorted(gens, key=order.index)
    assert [x.args_source for x in got if x.generator == "doctest"] == ["1, 2", "a=5", "[1], [2]"]
    assert [x.args_source for x in got if x.generator == "harvested"] == ["7, 8", "'s', 't'"]
    assert "fuzz" in gens and "annotation" in gens
    assert len(got) == 10 and len({x.args_source for x in got}) == 10
    for x in got:
        literal_args(x.args_source)
    few = generate_inputs(c, harvested, seed=0, max_inputs=3)  # up to half from examples
    assert [x.generator for x in few] == ["doctest", "doctest", "annotation"]
    assert generate_inputs(c, harvested, seed=0, max_inputs=0) == []


def test_generate_inputs_follow_annotations_and_signature(hand):
    got = generate_inputs(hand["signature"], [], seed=5, max_inputs=16)
    assert got
    for x in got:
        pos, kw = literal_args(x.args_source)
        assert "d" in kw and "a" not in kw  # keyword-only required, positional-only by position
        if x.generator == "annotation":
            assert isinstance(pos[1] if len(pos) > 1 else kw.get("b"), int)
            assert all(isinstance(v, str) for v in pos[3:])  # *rest: str
            assert kw.get("e") is None or all(isinstance(v, int) for v in kw["e"])
    defaults = generate_inputs(hand["uses_deque"], [], seed=0, max_inputs=8)
    assert all(x.generator != "default" for x in defaults)  # xs has no default
    only_defaults = extract_functions("def f(a=1, *, b='x'):\n    return a\n", "m")[0]
    assert InputCase("", "default") in generate_inputs(only_defaults, [], seed=0, max_inputs=4)
    assert call_expression(only_defaults, InputCase("", "default")) == "f()"


def test_annotation_specs_and_sampler_render_literals():
    assert spec_from_annotation("int") == ("int",)
    assert spec_from_annotation("Optional[list[str]]") == ("union", (("none",), ("list", ("str",))))
    assert spec_from_annotation("dict[str, tuple[int, ...]]") == \
        ("dict", ("str",), ("tuplev", ("int",)))
    assert spec_from_annotation("Literal['a', 1]") == ("union", (("const", "'a'"), ("const", "1")))
    assert spec_from_annotation("SomeClass") is None
    rng = random.Random(0)
    for ann in ("int", "float", "str", "bytes", "bool", "set[int]", "dict[str, list[float]]",
                "tuple[int, str]", "int | None", "complex", None):
        spec = spec_from_annotation(ann)
        for _ in range(30):
            v = sample(spec, rng)
            assert ast.literal_eval(render(v)) == v
    assert render({3, 1, 2}) == "{1, 2, 3}" and render(set()) == "set()" and render((1,)) == "(1,)"


# ---- fuzzing ----

def test_mutate_is_deterministic_and_literal():
    seeds = ["5", "'hello'", "[1, 2, 3]", "True, None", "{'a': [1, 2]}, b'xy'", "(1.5, 'x'), k=[]",
             "{1, 2}", "1j", ""]
    for s in seeds:
        out = [mutate(s, random.Random(i)) for i in range(50)]
        assert out == [mutate(s, random.Random(i)) for i in range(50)]
        for m in out:
            literal_args(m)
    assert mutate("", random.Random(0)) == ""
    ints = {mutate("5", random.Random(i)) for i in range(200)}
    assert {"6", "4", "0", "-1"} <= ints
    assert {mutate("True", random.Random(i)) for i in range(50)} >= {"False"}
    assert "None" in {mutate("7", random.Random(i)) for i in range(400)}
    lists = {mutate("[1, 2, 3]", random.Random(i)) for i in range(300)}
    appended = [v for v in (literal_args(m)[0][0] for m in lists) if isinstance(v, list)]
    assert {"[1, 3]", "[1, 2, 2, 3]", "[]"} <= lists and any(len(v) == 4 for v in appended)
    strs = {mutate("'abc'", random.Random(i)) for i in range(300)}
    assert {"'ab'", "''", "'ABC'"} <= strs
    with pytest.raises(ValueError):
        mutate("f(x)", random.Random(0))


# ---- corpus driver ----

STDLIB_MODULES = ["colorsys", "textwrap", "heapq", "bisect", "fnmatch", "posixpath", "ntpath",
                  "genericpath", "keyword", "string", "base64", "quopri", "calendar", "shlex",
                  "statistics", "fractions", "difflib", "copy", "stringprep", "gettext"]


@pytest.fixture(scope="module")
def stdlib_records() -> list[dict]:
    return [{"id": name, "text": stdlib_source(name)} for name in STDLIB_MODULES]


def test_iter_programs_on_stdlib_modules(stdlib_records):
    records = stdlib_records + [{"id": "py2", "text": "def f(x):\n    print x\n"},
                                {"id": "hand", "text": MODULE}]
    harvested = harvest_corpus(records)
    stats = Counter()
    cases = list(iter_programs(records, harvested=harvested, seed=0, stats=stats))
    assert stats["modules"] == len(records) and stats["syntax_error"] == 1
    assert stats["standalone"] >= 100 and len(cases) >= 600
    assert stats["cases_function"] + stats["cases_doctest"] == len(cases)
    ids = [c.id for c in cases]
    assert len(set(ids)) == len(ids)
    per_function = Counter((c.provenance["corpus_id"], c.provenance["qualname"]) for c in cases)
    assert max(per_function.values()) <= 8 + 8  # inputs + doctest calls
    assert len({m for m, _ in per_function}) >= 15
    for c in cases:
        assert isinstance(c, ProgramCase)
        module_id, qualname, k = c.id.rsplit(":", 2)
        assert (module_id, qualname) == (c.provenance["corpus_id"], c.provenance["qualname"])
        assert int(k) >= 0
        assert c.provenance["generator"] in ("function", "doctest")
        assert c.provenance["input_source"] in ("annotation", "default", "harvested", "doctest",
                                                "fuzz")
        assert c.call.startswith(qualname + "(")
        compile(c.call, c.id, "eval")
    for code in {c.code for c in cases}:  # as the tracer will run it
        compile(code + "\n\ndef main():\n    return 0\n", "<program>", "exec")
    gens = Counter(c.provenance["input_source"] for c in cases)
    assert gens["annotation"] and gens["fuzz"] and gens["harvested"] and gens["doctest"]
    doctest_cases = [c for c in cases if c.provenance["generator"] == "doctest"]
    assert "multimode('aabbbbbbbbcc')" in {c.call for c in doctest_cases}
    assert "with_doctest(len('ab'), abs(-1))" in {c.call for c in doctest_cases}
    # deterministic, and only the chosen inputs depend on the seed
    some = records[:4]
    first = [(c.id, c.code, c.call) for c in cases
             if c.provenance["corpus_id"] in STDLIB_MODULES[:4]]
    assert [(c.id, c.code, c.call) for c in iter_programs(some, harvested=harvested, seed=0)] \
        == first
    other = [(c.id, c.code, c.call) for c in iter_programs(some, harvested=harvested, seed=1)]
    assert {c[1] for c in other} == {c[1] for c in first} and other != first


def test_iter_programs_caps_and_harvests_itself(stdlib_records):
    stats = Counter()
    records = iter(stdlib_records[:3])  # a one-shot iterator: harvested internally
    cases = list(iter_programs(records, seed=0, max_inputs_per_function=2,
                               max_functions_per_module=1, stats=stats))
    assert stats["modules"] == 3
    assert len({(c.provenance["corpus_id"], c.provenance["qualname"]) for c in cases}) == 3
    assert all(int(c.id.rsplit(":", 1)[1]) < 4 for c in cases)
    assert stats["over_module_cap"] > 0


def test_iter_programs_in_parallel_gives_the_same_cases_and_stats(stdlib_records):
    import itertools

    from stages.programs import parallel

    records = stdlib_records + [{"id": "py2", "text": "def f(x):\n    print x\n"}]
    harvested = harvest_corpus(records)
    # the harvest in groups (the stage's shards) on two processes: the same lists, same order
    groups = [records[i:i + 4] for i in range(0, len(records), 4)]
    assert parallel.parallel_harvest(groups, 2) == harvested
    assert parallel.parallel_harvest(groups, 1) == harvested
    one, many = Counter(), Counter()
    serial = [c.to_dict() for c in iter_programs(records, harvested=harvested, seed=3, stats=one)]
    spread = [c.to_dict() for c in iter_programs(records, harvested=harvested, seed=3, stats=many,
                                                 workers=2)]
    assert spread == serial and many == one and len(serial) > 600
    # a consumer that stops early (the stage's max_programs) counts what it consumed, as before
    one, many = Counter(), Counter()
    head = list(itertools.islice(iter_programs(records, harvested=harvested, seed=3, stats=one), 250))
    gen = iter_programs(records, harvested=harvested, seed=3, stats=many, workers=2)
    assert list(itertools.islice(gen, 250)) == head and many == one
    gen.close()
    # chunks smaller than the corpus, more jobs than workers: still in corpus order
    chunks = list(parallel.parallel_modules(records, harvested, {"seed": 3}, 2, chunk=3))
    from stages.programs.driver import module_programs
    assert chunks == [module_programs(r, harvested=harvested, seed=3) for r in records]


# ---- property tests (Hypothesis, when installed) ----

def test_render_roundtrips_and_mutations_stay_literal(tmp_path):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from hypothesis.configuration import set_hypothesis_home_dir

    # a fixed alphabet (quotes, escapes, non-ASCII, a surrogate): no unicode tables to build
    text = st.text(alphabet="aZ0 _'\"\\\n\t\x00é€😀\ud800", max_size=8)
    scalars = (st.none() | st.booleans() | st.integers() | text | st.binary(max_size=8)
               | st.floats(allow_nan=False, allow_infinity=False))
    values = st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
        | st.dictionaries(text | st.integers(), inner, max_size=3)
        | st.frozensets(st.integers() | text, max_size=3).map(set),
        max_leaves=8)

    @settings(max_examples=100, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(values, min_size=1, max_size=3), st.integers(0, 2**32))
    def check(vals, seed):
        args = ", ".join(render(v) for v in vals)
        assert parse_args(args)[0] == vals
        a = mutate(args, random.Random(seed))
        assert a == mutate(args, random.Random(seed))
        literal_args(a)

    set_hypothesis_home_dir(tmp_path / ".hypothesis")  # its caches stay out of the checkout
    try:
        check()
    finally:
        set_hypothesis_home_dir(None)
    assert hypothesis.__version__


def test_doctest_becomes_a_program_of_its_examples():
    from stages.programs.doctests import doctest_program, extract_doctests
    src = '''
def double(x):
    """
    >>> y = double(2)
    >>> double(y) + 1
    9
    >>> open('/etc/passwd')
    """
    return 2 * x
'''
    (case,) = extract_doctests(src, "m")
    code, call = doctest_program(case)
    assert call == "doctest_double()"
    generated = code.split("def doctest_double():")[1]
    assert generated == "\n    y = double(2)\n    return double(y) + 1\n"  # stops before open()
    compile(code + "\n" + call, "<t>", "exec")
    ns: dict = {}
    exec(code, ns)  # our own source, not corpus code
    assert ns["doctest_double"]() == 9
