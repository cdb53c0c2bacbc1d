"""CWM trace format (BRIEF.md) produced by stages.tracer. Runs on 3.11 (sys.settrace) and on
3.12+ (sys.monitoring; there the settrace backend is also checked to give the same frames)."""

from __future__ import annotations

import builtins
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stages import tracer
from stages.tracer import HAS_MONITORING, TraceLimits, render, safe_repr
from stages.tracer.worker import handle

F = "<|frame_sep|>"
TRACER_DIR = Path(tracer.__file__).parent


def trace_call(code: str, call: str, **kw) -> tracer.TraceResult:
    """``tracer.trace_call``, checking that the text the recorder renders while tracing equals
    ``render`` of its structured frames (two implementations of the ``..`` rule)."""
    r = tracer.trace_call(code, call, **kw)
    if r.frames:
        assert render(r.frames[1:]) == r.text
    return r


def frames_of(text: str) -> list[str]:
    assert text.endswith(F)
    return [p + F for p in text.split(F)[:-1]]


def locals_of(piece: str) -> dict:
    m = re.match(r"<\|(?:call|line)_sep\|>(.*?)<\|action_sep\|>", piece, re.S)
    return json.loads(m.group(1))


def test_brief_example_byte_exact():
    code = "def f(nums, i):\n    nums.pop(i)\n    return nums\n"
    r = trace_call(code, "f([35, 45, 3], 0)")
    assert r.status == "ok" and r.result == "[45, 3]" and r.error is None
    assert r.prompt == ("<|trace_context_start|>def f(nums, i):\n    nums.pop(i)\n    return nums\n"
                        "\ndef main():  # << START_OF_TRACE\n    return f([35, 45, 3], 0)\n"
                        "<|frame_sep|>")
    assert r.text == (
        '<|line_sep|>{}<|action_sep|>    return f([35, 45, 3], 0)\n'
        '<|frame_sep|><|call_sep|>{"nums": "[35, 45, 3]", "i": "0"}<|action_sep|>def f(nums, i):\n'
        '<|frame_sep|><|line_sep|>{"nums": "..", "i": ".."}<|action_sep|>    nums.pop(i)\n'
        '<|frame_sep|><|line_sep|>{"nums": "[45, 3]", "i": ".."}<|action_sep|>    return nums\n'
        '<|frame_sep|><|return_sep|><|action_sep|>    return nums\n'
        '<|arg_sep|>"[45, 3]"<|frame_sep|><|return_sep|><|action_sep|>    return f([35, 45, 3], 0)\n'
        '<|arg_sep|>"[45, 3]"<|frame_sep|>')
    # structured frames: main's call frame first (not in the text), then one per text frame
    main_call = r.frames[0]
    assert (main_call.kind, main_call.scope, main_call.locals) == ("call", 0, {})
    assert main_call.source == "def main():  # << START_OF_TRACE\n"
    assert [f.kind for f in r.frames[1:]] == ["line", "call", "line", "line", "return", "return"]
    assert r.frames[3].locals == {"nums": "[35, 45, 3]", "i": "0"}  # full reprs kept
    assert r.events == len(r.frames) == 7
    assert render(r.frames[1:]) == r.text


def test_loop_uses_dots_for_unchanged_locals():
    r = trace_call("def total(xs):\n    s = 0\n    for x in xs:\n        s += x\n    return s\n",
                   "total([1, 2])")
    assert frames_of(r.text)[2:9] == [
        '<|line_sep|>{"xs": ".."}<|action_sep|>    s = 0\n' + F,
        '<|line_sep|>{"xs": "..", "s": "0"}<|action_sep|>    for x in xs:\n' + F,
        '<|line_sep|>{"xs": "..", "s": "..", "x": "1"}<|action_sep|>        s += x\n' + F,
        '<|line_sep|>{"xs": "..", "s": "1", "x": ".."}<|action_sep|>    for x in xs:\n' + F,
        '<|line_sep|>{"xs": "..", "s": "..", "x": "2"}<|action_sep|>        s += x\n' + F,
        '<|line_sep|>{"xs": "..", "s": "3", "x": ".."}<|action_sep|>    for x in xs:\n' + F,
        '<|line_sep|>{"xs": "..", "s": "..", "x": ".."}<|action_sep|>    return s\n' + F,
    ]
    assert r.result == "3"


def test_one_line_loop_gets_a_line_frame_per_iteration():
    r = trace_call("def f(n):\n    i = 0\n    while i < n: i += 1\n    return i\n", "f(3)")
    loop = [p for p in frames_of(r.text) if "while" in p and "line_sep" in p]
    assert len(loop) == 3  # one per iteration: a line event per backward jump, as on 3.11


def test_full_locals_after_nested_call_returns():
    code = ("def double(a):\n    return a * 2\n\n"
            "def f(x):\n    y = double(x)\n    z = y + 1\n    return z\n")
    r = trace_call(code, "f(3)")
    assert frames_of(r.text)[2:8] == [
        '<|line_sep|>{"x": ".."}<|action_sep|>    y = double(x)\n' + F,
        '<|call_sep|>{"a": "3"}<|action_sep|>def double(a):\n' + F,
        '<|line_sep|>{"a": ".."}<|action_sep|>    return a * 2\n' + F,
        '<|return_sep|><|action_sep|>    return a * 2\n<|arg_sep|>"6"' + F,
        '<|line_sep|>{"x": "3", "y": "6"}<|action_sep|>    z = y + 1\n' + F,  # full again
        '<|line_sep|>{"x": "..", "y": "..", "z": "7"}<|action_sep|>    return z\n' + F,
    ]


def test_recursion_has_one_scope_per_activation():
    code = "def fact(n):\n    if n <= 1:\n        return 1\n    return n * fact(n - 1)\n"
    r = trace_call(code, "fact(3)")
    assert r.status == "ok" and r.result == "6"
    calls = [f for f in r.frames if f.kind == "call"]
    assert [f.locals for f in calls[1:]] == [{"n": "3"}, {"n": "2"}, {"n": "1"}]
    assert len({f.scope for f in calls}) == 4
    returns = [f.value for f in r.frames if f.kind == "return"]
    assert returns == ["1", "2", "6", "6"]
    # each activation's first line frame uses '..' against its own call frame, not its caller's
    assert frames_of(r.text)[-5] == '<|line_sep|>{"n": ".."}<|action_sep|>        return 1\n' + F


def test_list_comprehension_has_its_own_scope():
    r = trace_call("def f(xs):\n    ys = [x * 2 for x in xs]\n    return ys\n", "f([1, 2])")
    line = "    ys = [x * 2 for x in xs]\n"
    assert frames_of(r.text)[3:9] == [
        '<|call_sep|>{".0": "<list_iterator object>"}<|action_sep|>' + line + F,
        '<|line_sep|>{".0": ".."}<|action_sep|>' + line + F,
        '<|line_sep|>{".0": "..", "x": "1"}<|action_sep|>' + line + F,
        '<|line_sep|>{".0": "..", "x": "2"}<|action_sep|>' + line + F,
        '<|return_sep|><|action_sep|>' + line + '<|arg_sep|>"[2, 4]"' + F,
        '<|line_sep|>{"xs": "[1, 2]", "ys": "[2, 4]"}<|action_sep|>    return ys\n' + F,
    ]


def test_set_dict_and_nested_comprehensions():
    code = ("def f(m):\n    s = {c for c in 'ab'}\n    d = {k: 1 for k in range(1)}\n"
            "    return [[y for y in row] for row in m]\n")
    r = trace_call(code, "f([[1], [2]])")
    assert r.result == "[[1], [2]]"
    calls = [f.locals for f in r.frames if f.kind == "call"]
    assert calls[2] == {".0": "<str_iterator object>"}  # not str_ascii_iterator (3.11+)
    assert calls[3] == {".0": "<range_iterator object>"}
    assert calls[4] == {".0": "<list_iterator object>"}  # outer list comprehension
    assert calls[5] == {".0": "<list_iterator object>"}  # inner one, once per row
    assert len(calls) == 7


def test_generator_expression_yields_and_resumes():
    r = trace_call("def f(xs):\n    return sum(x for x in xs)\n", "f([1, 2])")
    line = "    return sum(x for x in xs)\n"
    genexp = [p for p in frames_of(r.text)[3:-2]]
    assert genexp == [
        '<|call_sep|>{".0": "<list_iterator object>"}<|action_sep|>' + line + F,
        '<|line_sep|>{".0": ".."}<|action_sep|>' + line + F,
        '<|return_sep|><|action_sep|>' + line + '<|arg_sep|>"1"' + F,
        '<|call_sep|>{".0": "<list_iterator object>", "x": "1"}<|action_sep|>' + line + F,
        '<|line_sep|>{".0": "..", "x": ".."}<|action_sep|>' + line + F,
        '<|return_sep|><|action_sep|>' + line + '<|arg_sep|>"2"' + F,
        '<|call_sep|>{".0": "<list_iterator object>", "x": "2"}<|action_sep|>' + line + F,
        '<|line_sep|>{".0": "..", "x": ".."}<|action_sep|>' + line + F,
        '<|return_sep|><|action_sep|>' + line + '<|arg_sep|>"None"' + F,
    ]
    assert r.result == "3"


def test_generator_function_yield_is_a_return_and_resume_a_call():
    code = "def count(n):\n    i = 0\n    while i < n:\n        yield i\n        i += 1\n"
    r = trace_call(code, "list(count(2))")
    assert frames_of(r.text)[4:8] == [
        '<|line_sep|>{"n": "..", "i": ".."}<|action_sep|>        yield i\n' + F,
        '<|return_sep|><|action_sep|>        yield i\n<|arg_sep|>"0"' + F,
        '<|call_sep|>{"n": "2", "i": "0"}<|action_sep|>        yield i\n' + F,  # resumes here
        '<|line_sep|>{"n": "..", "i": ".."}<|action_sep|>        i += 1\n' + F,
    ]
    gen_scopes = {f.scope for f in r.frames if f.scope != 0}
    assert len(gen_scopes) == 1  # one generator, one scope across its resumptions
    assert r.frames[-2].kind == "return" and r.frames[-2].value == "None"
    assert r.result == "[0, 1]"


def test_yield_from_and_await_show_no_internal_stop_iteration():
    # 3.11's settrace reports the StopIteration ending a ``yield from``/``await`` as an
    # exception; sys.monitoring does not: dropped so that every version gives the same text
    code = ("def sub():\n    yield 1\n    return 3\n\n"
            "def gen():\n    r = yield from sub()\n    yield r\n")
    r = trace_call(code, "list(gen())")
    assert r.result == "[1, 3]" and "StopIteration" not in r.text
    assert '<|line_sep|>{"r": "3"}<|action_sep|>    yield r\n' in r.text
    code = ("import asyncio\n\nasync def g(x):\n    await asyncio.sleep(0)\n    return x * 2\n\n"
            "async def f(x):\n    y = await g(x)\n    return y\n")
    r = trace_call(code, "asyncio.run(f(2))")
    assert r.result == "4" and "StopIteration" not in r.text and "exception_sep" not in r.text


def test_closed_generator_leaves_no_frames():
    # any() stops early; closing the suspended genexpr runs no line (3.13 does not run it at all)
    r = trace_call("def f(xs):\n    return any(x > 1 for x in xs)\n", "f([1, 2, 3])")
    assert "GeneratorExit" not in r.text
    assert r.text.endswith('<|return_sep|><|action_sep|>    return any(x > 1 for x in xs)\n'
                           '<|arg_sep|>"True"<|frame_sep|><|return_sep|><|action_sep|>'
                           '    return f([1, 2, 3])\n<|arg_sep|>"True"<|frame_sep|>')


def test_exception_caught_inside_function():
    code = ("def safe_div(a, b):\n    try:\n        return a / b\n"
            "    except ZeroDivisionError:\n        return None\n")
    r = trace_call(code, "safe_div(1, 0)")
    assert r.status == "ok" and r.result == "None" and r.error is None
    assert frames_of(r.text)[4:6] == [
        "<|exception_sep|><|action_sep|>        return a / b\n"
        "<|arg_sep|>\"ZeroDivisionError('division by zero')\"" + F,
        '<|line_sep|>{"a": "..", "b": ".."}<|action_sep|>    except ZeroDivisionError:\n' + F,
    ]


def test_exception_propagating_out_of_main():
    code = "def inv(x):\n    return 1 / x\n\ndef f(x):\n    y = inv(x)\n    return y\n"
    r = trace_call(code, "f(0)")
    assert r.status == "exception" and r.result is None
    assert r.error == "ZeroDivisionError: division by zero"
    value = "<|arg_sep|>\"ZeroDivisionError('division by zero')\"" + F
    assert frames_of(r.text)[-3:] == [
        "<|exception_sep|><|action_sep|>    return 1 / x\n" + value,
        "<|exception_sep|><|action_sep|>    y = inv(x)\n" + value,
        "<|exception_sep|><|action_sep|>    return f(0)\n" + value,  # main's: the last frame
    ]
    assert not any(f.kind == "return" for f in r.frames)


def test_reraise_from_finally_and_error_without_message():
    code = ("def g():\n    try:\n        raise KeyError\n    finally:\n        z = 1\n\n"
            "def f():\n    g()\n")
    r = trace_call(code, "f()")
    assert r.status == "exception" and r.error == "KeyError"
    kinds = [(f.kind, f.line) for f in r.frames if f.scope == 2]
    assert kinds == [("call", 1), ("line", 2), ("line", 3), ("exception", 3), ("line", 5)]


def test_callback_from_stdlib_into_program_code():
    code = "def key(p):\n    return -p\n\ndef f(xs):\n    return sorted(xs, key=key)\n"
    r = trace_call(code, "f([1, 2])")
    assert r.result == "[2, 1]"
    assert [f.locals for f in r.frames if f.kind == "call"][2:] == [{"p": "1"}, {"p": "2"}]
    # stdlib internals are not traced: every frame's source is a line of the context
    context = r.prompt[len("<|trace_context_start|>"):-len(F)]
    assert all(f.source in context for f in r.frames)
    r = trace_call("def f(xs):\n    return sorted(xs, key=lambda v: -v)\n", "f([1, 2])")
    lam = [fr for fr in r.frames if fr.kind == "call"][2:]
    assert [(fr.locals, fr.source) for fr in lam] == [
        ({"v": "1"}, "    return sorted(xs, key=lambda v: -v)\n"),
        ({"v": "2"}, "    return sorted(xs, key=lambda v: -v)\n")]
    r = trace_call("import heapq\n\ndef f(xs):\n    return heapq.nsmallest(1, xs)\n", "f([3, 1])")
    assert r.result == "[1]" and {f.scope for f in r.frames} == {0, 1}


def test_reprs_have_no_addresses():
    code = ("class Foo:\n    pass\n\n"
            "def gen():\n    yield 1\n\n"
            "def f():\n    o = Foo()\n    it = iter([1])\n    s = iter('ab')\n    fn = f\n"
            "    g = gen()\n    lam = lambda: 0\n    return o\n")
    r = trace_call(code, "f()")
    last = r.frames[-3].locals
    assert last == {"o": "<__main__.Foo object>", "it": "<list_iterator object>",
                    "s": "<str_iterator object>", "fn": "<function f>",
                    "g": "<generator object gen>", "lam": "<function f.<locals>.<lambda>>"}
    assert r.result == "<__main__.Foo object>"
    assert " at 0x" not in r.text
    # a plain string that happens to look like an address is user data, kept verbatim
    assert safe_repr("<x at 0x1234>") == "'<x at 0x1234>'"


def test_repr_errors_and_user_reprs():
    code = ("class P:\n    def __repr__(self):\n        return 'P!'\n\n"
            "class Bad:\n    def __repr__(self):\n        raise ValueError('no')\n\n"
            "def f():\n    p = P()\n    b = Bad()\n    return 1\n")
    r = trace_call(code, "f()")
    assert r.frames[-3].locals == {"p": "P!", "b": "<repr of Bad raised ValueError>"}
    # the user's __repr__ runs inside the tracer, untraced: no frame from its lines
    assert not any(f.line in (2, 3, 6, 7) for f in r.frames)


def test_long_values_are_truncated_with_marker():
    r = trace_call("def f(n):\n    xs = list(range(n))\n    return len(xs)\n", "f(1000)")
    xs = r.frames[-3].locals["xs"]
    full = repr(list(range(1000)))
    assert xs == full[:200] + "...<truncated>"
    r = trace_call("def f(n):\n    xs = list(range(n))\n    return len(xs)\n", "f(1000)",
                   limits=TraceLimits(max_repr=10))
    assert r.frames[-3].locals["xs"] == full[:10] + "...<truncated>"


def test_infinite_loop_is_too_long():
    r = trace_call("def f():\n    i = 0\n    while True:\n        i += 1\n", "f()",
                   limits=TraceLimits(max_events=100))
    assert r.status == "too_long" and r.events == 100 and r.result is None
    assert len(frames_of(r.text)) == 99  # partial trace kept (main's call frame is not text)
    r = trace_call("def f():\n    s = ''\n    while True:\n        s += 'x'\n", "f()",
                   limits=TraceLimits(max_bytes=5_000))
    assert r.status == "too_long" and 4_000 < len(r.text.encode()) <= 5_000
    assert sys.gettrace() is None


def test_program_swallowing_the_stop_still_ends_too_long():
    code = ("def f():\n    n = 0\n    while n < 1000:\n        try:\n            n += 1\n"
            "        except BaseException:\n            n = 1000\n    return n\n")
    r = trace_call(code, "f()", limits=TraceLimits(max_events=30))
    assert r.status == "too_long"


@pytest.mark.parametrize("code, call", [
    ("def f(:\n    pass\n", "f()"),  # syntax error in the code
    ("def f():\n    return 1\n", "f("),  # call does not parse
    ("def f():\n    return 1\n", "f(); f()"),  # two statements
    ("def f():\n    return 1\n", "x = f()"),  # a statement, not an expression
    ("def f():\n    return 1\n", "  "),
    ("def f():\n    return 1\n", "main()"),  # would recurse into the entry point
    ("def main():\n    return 1\n", "main()"),  # the program's main would be shadowed
    ("import sys\nsys.exit(3)\n", "0"),  # module body fails
])
def test_invalid(code, call):
    r = trace_call(code, call)
    assert r.status == "invalid" and r.error and r.text == "" and r.frames == []


@pytest.mark.parametrize("code, error", [
    ("raise ValueError('boom')\ndef f(x):\n    return x\n", "ValueError: boom"),
    # the compiler drops what follows a top-level raise, the entry point included
    ("def f(x):\n    return x\nraise KeyError(3)\n", "KeyError: 3"),
    ("x = 1 / 0\ndef f(x):\n    return x\n", "ZeroDivisionError: division by zero"),
])
def test_a_module_body_that_raises_is_reported_as_such(code, error):
    for _ in range(2):   # the second time from the cache of compiled programs
        r = trace_call(code, "f(1)")
        assert r.status == "invalid" and r.error == "module body raised " + error


def test_valid_edge_inputs():
    r = trace_call("def f(a):\n    return a\n", "f(\n    [1,\n     2],\n)")  # multi-line call
    assert r.status == "ok" and "    return f([1, 2])\n" in r.prompt
    r = trace_call("class C:\n    def main(self):\n        return 5\n", "C().main()")
    assert r.result == "5"  # a method called main is fine
    r = trace_call("def f(s):\n    return s + ';'\n", "f('a;b')")
    assert r.result == "'a;b;'"
    r = trace_call("", "len([1, 2])")  # no program: only main is traced
    assert r.status == "ok" and r.result == "2" and r.prompt.startswith(
        "<|trace_context_start|>def main():")
    r = trace_call("def f(x):\r\n    return x\r\n", "f(1)")
    assert "\r" not in r.prompt and r.result == "1"


def test_decorated_function_call_frame_shows_def_line():
    code = "import functools\n\n@functools.lru_cache(None)\ndef fib(n):\n    return n\n"
    r = trace_call(code, "fib(4)")
    assert r.frames[2].kind == "call" and r.frames[2].source == "def fib(n):\n"


def test_non_ascii_and_json_locals():
    r = trace_call("def f(s):\n    t = s + 'é'  # café\n    return t\n", "f('\"x')")
    assert "    t = s + 'é'  # café\n" in r.text
    for piece in frames_of(r.text):
        if piece.startswith(("<|call_sep|>", "<|line_sep|>")):
            locals_of(piece)  # valid JSON
    assert r.result == "'\"xé'"


def test_tracer_state_restored_and_reusable():
    def previous(frame, event, arg):
        return None

    before = {t: sys.monitoring.get_tool(t) for t in range(6)} if HAS_MONITORING else {}
    for i in range(500):  # a fork server's parent, or an in-process loop, calls it many times
        assert trace_call("def f(x):\n    return 1 / x\n", "f(0)").status == "exception"
        assert trace_call(f"def f(x):\n    return x + {i}\n", "f(1)").result == str(i + 1)
    for code, call, status in [
            ("def f():\n    while True:\n        pass\n", "f()", "too_long"),
            ("def r(n):\n    return r(n + 1)\n", "r(0)", "invalid"),
            ("def f(:\n", "f()", "invalid")]:
        r = trace_call(code, call, limits=TraceLimits(max_events=3000))
        assert r.status == status
        assert sys.gettrace() is None
    assert sys.gettrace() is None
    if HAS_MONITORING:
        assert {t: sys.monitoring.get_tool(t) for t in range(6)} == before
    else:  # 3.11: a tracer installed before is put back
        sys.settrace(previous)
        try:
            assert trace_call("def f():\n    return 2\n", "f()").result == "2"
            assert sys.gettrace() is previous
        finally:
            sys.settrace(None)


@pytest.mark.skipif(not HAS_MONITORING, reason="sys.monitoring needs Python 3.12+")
def test_monitoring_and_settrace_backends_agree():
    cases = [
        ("def total(xs):\n    s = 0\n    for x in xs: s += x\n    return s\n", "total([1, 2])"),
        ("def f(xs):\n    return [x for x in xs if x], {x: 1 for x in xs}\n", "f([0, 1])"),
        ("def g():\n    yield 1\n    yield 2\n\ndef f():\n    return list(g())\n", "f()"),
        ("def f(a):\n    try:\n        return 1 / a\n    except ZeroDivisionError:\n"
         "        return 0\n", "f(0)"),
        ("def f(x):\n    return sorted(x, key=lambda v: -v)\n", "f([1, 3, 2])"),
        ("def f(x):\n    return 1 / x\n", "f(0)"),
    ]
    for code, call in cases:
        a = trace_call(code, call, backend="monitoring")
        b = trace_call(code, call, backend="settrace")
        assert (a.status, a.text, a.result) == (b.status, b.text, b.result), code
    assert all(sys.monitoring.get_tool(t) != "codeworld-tracer" for t in range(6))


def test_locals_keep_their_place_while_bound():
    # 3.11/3.12 order (one f_locals dict per frame); emulated on 3.13, whose order changed
    code = ("def f(flag):\n    if flag:\n        a = 1\n    b = 2\n    a = 3\n    del b\n"
            "    b = 4\n    return a\n")
    r = trace_call(code, "f(False)")
    orders = [list(f.locals) for f in r.frames if f.kind == "line" and f.scope == 1]
    assert orders == [["flag"], ["flag"], ["flag", "b"], ["flag", "b", "a"], ["flag", "a"],
                      ["flag", "a", "b"]]


def test_recursion_error_is_untraceable():
    # where the limit strikes depends on the tracer's own frames: not the program's behaviour
    for code in ["def r(n):\n    return r(n + 1)\n",
                 "def r(n):\n    try:\n        return r(n + 1)\n    except RecursionError:\n"
                 "        return n\n"]:
        r = trace_call(code, "r(0)")
        assert r.status == "invalid" and r.error.startswith("untraceable: RecursionError")
        assert r.result is None and sys.gettrace() is None


def test_program_sees_no_tracer_and_cannot_remove_it():
    # Untraced, gettrace() is None and settrace(None) removes nothing: so while traced. Before,
    # gettrace() gave the tracer's own function (its name in the trace) and settrace(None)
    # removed it: lines 5-7 ran unrecorded, and once put back the trace, with its gap, was "ok"
    code = ("import sys\n\ndef f():\n    old = sys.gettrace()\n    sys.settrace(None)\n"
            "    x = 1\n    sys.settrace(old)\n    return x, old\n")
    r = trace_call(code, "f()", backend="settrace")
    assert (r.status, r.result) == ("ok", "(1, None)")
    assert [fr.line for fr in r.frames if fr.kind == "line" and fr.scope == 1] == [4, 5, 6, 7, 8]
    assert "_run_settrace" not in r.text
    r = trace_call("import sys\n\ndef f():\n    sys.settrace(None)\n    return 1\n", "f()",
                   backend="settrace")
    assert (r.status, r.result) == ("ok", "1")
    r = trace_call("import sys\n\ndef f():\n    sys.settrace(lambda *a: None)\n    return 1\n",
                   "f()", backend="settrace")
    assert r.status == "invalid" and "sys.settrace" in r.error
    assert sys.settrace.__module__ == "sys" and sys.gettrace() is None   # put back


def test_more_address_free_reprs():
    code = ("import weakref\n\nclass A:\n    def m(self):\n        return 1\n\n"
            "def f():\n    a = A()\n    w = weakref.ref(a)\n    m = a.m\n    p = [].append\n"
            "    return 0\n")
    loc = trace_call(code, "f()").frames[-3].locals
    assert loc["w"] in ("<weakref; to 'A'>", "<weakref; to '__main__.A'>")  # 3.11 / 3.12+
    assert loc["m"] == "<bound method A.m of <__main__.A object>>"
    assert loc["p"] == "<built-in method append of list object>"
    assert "0x" not in "".join(loc.values())


def test_module_reprs_say_no_host_path():
    # <module 'json' from '/usr/lib/python3.11/json/__init__.py'>: the interpreter's install
    # prefix, another on another machine (and "(frozen)" / "(built-in)" follow the build)
    code = ("def f():\n    import json\n    import sys\n    import os\n"
            "    mods = [json, {'s': sys}]\n    return mods\n")
    r = trace_call(code, "f()")
    loc = r.frames[-3].locals
    assert (loc["json"], loc["sys"], loc["os"]) == ("<module 'json'>", "<module 'sys'>",
                                                    "<module 'os'>")
    assert loc["mods"] == "[<module 'json'>, {'s': <module 'sys'>}]"
    assert r.result == "[<module 'json'>, {'s': <module 'sys'>}]"
    assert " from '" not in r.text and "(frozen)" not in r.text
    assert safe_repr(json) == "<module 'json'>"


def test_sets_of_identity_hashed_objects_do_not_follow_addresses():
    # Their iteration order is the objects' addresses: written sorted, the same on any machine
    # (seen: one trace in 2,714 differed between two machines). Other sets keep their order.
    code = ("class A:\n    def __init__(self, n):\n        self.n = n\n"
            "    def __repr__(self):\n        return f'A({self.n})'\n\n"
            "def f():\n    s = {A(3), A(1), A(2)}\n    fs = frozenset(s)\n    t = {'b', 'a'}\n"
            "    return s\n")
    r = trace_call(code, "f()")
    loc = r.frames[-3].locals
    assert loc["s"] == "{A(1), A(2), A(3)}" and loc["fs"] == "frozenset({A(1), A(2), A(3)})"
    assert loc["t"] == repr({"b", "a"})
    assert r.result == "{A(1), A(2), A(3)}"


def test_sets_hashed_by_a_class_of_its_own_are_sorted_too():
    # more-itertools' test_hash_count hashes a str subclass with `super.__hash__(self)`: an
    # address. Its sets came out in one order or another from run to run, so the default run's
    # traces did too. A class's own __hash__ is not trusted; value hashes keep Python's order.
    code = ("class S(str):\n    def __hash__(self):\n        return super.__hash__(self)\n\n"
            "def f():\n    s = {S('c'), S('a'), S('b')}\n    t = {('b', 1), ('a', 2)}\n"
            "    u = {(S('y'), 1), (S('x'), 2)}\n    return s\n")
    r = trace_call(code, "f()")
    loc = r.frames[-3].locals
    assert loc["s"] == "{'a', 'b', 'c'}" and r.result == "{'a', 'b', 'c'}"
    assert loc["t"] == repr({("b", 1), ("a", 2)})
    assert loc["u"] == "{('x', 2), ('y', 1)}"


def test_comprehension_scope_whatever_its_layout():
    # a comprehension whose ``for`` starts a line, and one in the call expression: both get
    # their own scope on every version (3.12+ outlines them, see program.py)
    code = "def f(xs):\n    return [x + 1\n            for x in xs]\n"
    r = trace_call(code, "f([1])")
    assert [f.locals for f in r.frames if f.kind == "call"][2] == {".0": "<list_iterator object>"}
    r = trace_call("def f(xs):\n    return xs\n", "f([y for y in range(2)])")
    assert r.result == "[0, 1]"
    assert r.frames[2].kind == "call" and r.frames[2].locals == {".0": "<range_iterator object>"}
    assert r.frames[2].source == "    return f([y for y in range(2)])\n"


def test_worker_handle_round_trip():
    code = "def f(nums, i):\n    nums.pop(i)\n    return nums\n"
    direct = trace_call(code, "f([35, 45, 3], 0)")
    by_call = handle({"id": 7, "code": code, "call": "f([35, 45, 3], 0)"})
    by_input = handle({"id": "x", "code": code, "input": "[35, 45, 3], 0"})  # entry: f
    assert by_call == {"id": 7, "trace": direct.text, "result": "[45, 3]", "error": None,
                       "status": "ok", "events": 7, "prompt": direct.prompt}
    assert {**by_input, "id": 7} == by_call
    assert json.loads(json.dumps(by_call)) == by_call
    r = handle({"id": 1, "code": "def g(x):\n    return 1 // x\n", "input": "0", "entry": "g"})
    assert r["status"] == "exception"
    assert r["error"] == "ZeroDivisionError: integer division or modulo by zero"
    r = handle({"id": 2, "code": "def f():\n    while True:\n        pass\n", "call": "f()",
                "limits": {"max_events": 20}})
    assert r["status"] == "too_long" and r["events"] == 20 and r["result"] is None
    assert r["trace"].count("<|frame_sep|>") == 19   # the partial trace, unless asked not to:
    cut = handle({"id": 2, "code": "def f():\n    while True:\n        pass\n", "call": "f()",
                  "limits": {"max_events": 20}, "too_long_text": False, "frames": True})
    assert (cut["status"], cut["events"], cut["trace"], cut.get("frames")) == ("too_long", 20, "", None)
    assert cut["error"] == r["error"] and cut["error"]
    for bad in [{"id": 3, "code": "x = 1\n"}, {"id": 3, "code": 5, "call": "f()"},
                {"id": 3, "code": "", "call": "f()", "limits": {"max_events": -1}}]:
        r = handle(bad)
        assert r["id"] == 3 and r["status"] == "invalid" and r["error"].startswith("bad request")


def test_worker_imports_as_a_standalone_package(tmp_path):
    # in the sandbox only stages/tracer is bound, e.g. as top-level ``cwtrace``
    import shutil
    shutil.copytree(TRACER_DIR, tmp_path / "cwtrace", ignore=shutil.ignore_patterns("__pycache__"))
    script = ("import json, sys\n"
              f"sys.path[:0] = [{str(tmp_path)!r}]\n"
              "from cwtrace.worker import handle\n"
              "r = handle({'id': 1, 'code': 'def f(x):\\n    return x * 2\\n', 'input': '21'})\n"
              "assert not any(m == 'stages' or m.startswith('stages.') for m in sys.modules)\n"
              "print(json.dumps(r))\n")
    out = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert (r["status"], r["result"], r["events"]) == ("ok", "42", 6)


def test_program_cache_gives_the_same_traces():
    # first sight: program and entry point compiled as one module; then the cached program
    # with a separately compiled entry point (another call) or the cached whole (same call)
    code = "def inc_cached(x):\n    y = x + 1\n    return y\n"
    first = trace_call(code, "inc_cached(1)")
    other = trace_call(code, "inc_cached(2)")
    again = trace_call(code, "inc_cached(1)")
    fresh = trace_call(code + "\n\n", "inc_cached(2)")  # same context, not cached yet
    assert (first.result, other.result) == ("2", "3")
    assert (again.text, again.prompt) == (first.text, first.prompt)
    assert (fresh.text, fresh.prompt) == (other.text, other.prompt)
    assert trace_call("def g(:\n", "g()").error.startswith("SyntaxError")
    bad_call = trace_call(code, "inc_cached(")
    assert bad_call.status == "invalid" and bad_call.error.startswith("call is not an expression")
    assert trace_call(code, "inc_cached(1)\rimport os").status == "invalid"



@pytest.mark.parametrize("value", [
    list(range(1000)), tuple(x / 7 for x in range(500)), ["é" * 3, None, True, 1e50] * 40,
    [1] * 65, list(range(70)) + [[1]], [b"ab"] * 100, (1,) * 300,
])
def test_long_sequence_shortcut_gives_the_plain_truncated_repr(value):
    from stages.tracer.reprs import long_sequence_repr, safe_repr, truncate
    full = repr(value)
    assert safe_repr(value, 200) == truncate(full, 200)
    short = long_sequence_repr(value, 200)
    assert short is None or short == full[:200] + "...<truncated>"


def test_big_list_local_is_cheap_to_trace():
    code = "def f(n):\n    data = [1e+50, 1, -1e+50] * n\n    t = 0\n    for x in data:\n        t += x\n    return t\n"
    r = trace_call(code, "f(1000)")
    assert r.status == "too_long" or r.status == "ok"
    assert '"data": "[1e+50, 1, -1e+50, 1e+50' in r.text and "...<truncated>" in r.text


# Programs whose locals keep their identity while their repr changes (or not): the repr cache
# (core._entry) must never show a stale value.
CACHE_PROGRAMS = [
    # a short list of scalars mutated in place, also by equal values of other types
    ("def f():\n    xs = [1, 2]\n    xs[0] = 1.0\n    xs[0] = True\n    xs[1] = -0.0\n"
     "    xs[1] = 0.0\n    xs.append(3)\n    xs.pop()\n    return xs\n", "f()"),
    # a long list: its text shows a prefix only; a change past it leaves the text as it was
    ("def f():\n    ys = [0] * 70\n    ys[69] = 5\n    ys[0] = 0.0\n    del ys[1:]\n"
     "    ys.extend(range(100))\n    ys[:] = []\n    return len(ys)\n", "f()"),
    # a list holding a mutable element, a tuple holding one, a dict, a set, an iterator
    ("def f():\n    a = [[1]]\n    t = (a, 2)\n    a[0].append(2)\n    d = {1: 2}\n    d[1] = 3\n"
     "    s = {1}\n    s.add(2)\n    it = iter(a)\n    next(it)\n    return t\n", "f()"),
    # the same object seen from two scopes, mutated by the callee
    ("def g(xs):\n    xs[0] = 'x'\n    return xs\n\ndef f():\n    xs = ['a', 'b']\n    g(xs)\n"
     "    return xs\n", "f()"),
    # a user class whose repr changes with its state, and a str/bytes/int rebound
    ("class C:\n    def __init__(self):\n        self.n = 0\n    def __repr__(self):\n"
     "        return f'C({self.n})'\n\ndef f():\n    c = C()\n    c.n = 1\n    s = 'a' * 300\n"
     "    s = s[:-1] + 'b'\n    b = b'x'\n    b += b'y'\n    n = 10 ** 5\n    n += 1\n    return c\n",
     "f()"),
]


@pytest.mark.parametrize("code,call", CACHE_PROGRAMS)
def test_repr_cache_never_shows_a_stale_value(monkeypatch, code, call):
    from stages.tracer import core
    cached = trace_call(code, call)
    monkeypatch.setattr(core, "_entry", lambda *args: None)  # every repr computed afresh
    fresh = trace_call(code, call)
    assert cached.status == fresh.status == "ok"
    assert cached.text == fresh.text
    assert [f.locals for f in cached.frames] == [f.locals for f in fresh.frames]


def test_repr_cache_follows_in_place_changes():
    r = trace_call(CACHE_PROGRAMS[0][0], "f()")
    seen = [f.locals["xs"] for f in r.frames if f.kind == "line" and "xs" in (f.locals or {})]
    assert seen == ["[1, 2]", "[1.0, 2]", "[True, 2]", "[True, -0.0]", "[True, 0.0]",
                    "[True, 0.0, 3]", "[True, 0.0]"]
    r = trace_call(CACHE_PROGRAMS[1][0], "f()")
    ys = [f.locals["ys"] for f in r.frames if f.kind == "line" and "ys" in (f.locals or {})]
    assert ys[0].endswith("...<truncated>") and ys[1] == ys[0]  # ys[69] = 5 is past the cut
    assert ys[2].startswith("[0.0, 0, 0") and ys[3] == "[0.0]"
    assert ys[4].startswith("[0.0, 0, 1, 2") and ys[5] == "[]"


def test_long_sequence_prefix_names_the_elements_its_text_shows():
    from stages.tracer.reprs import long_sequence_prefix, truncate
    value = list(range(1000))
    text, shown = long_sequence_prefix(value, 200)
    assert text == truncate(repr(value), 200)
    assert truncate(repr(value[:shown]), 200) == text  # the first `shown` elements suffice
    assert truncate(repr(value[:shown - 1]), 200) != text
    assert long_sequence_prefix(list(range(10)), 200) is None  # short: the plain repr


def test_host_rebuilds_the_prompt_the_sandbox_leaves_out():
    from stages.tracer.frames import prompt_for
    from stages.tracer.program import context_of
    cases = [("def f(x):\n    return x\n", "f(1)"), ("def f(x):\r\n    return x\r\n\r\n", " f(2) "),
             ("", "len([1, 2])"), ("def f(*a):\n    return a\n", "f(1,\n  2)")]
    for code, call in cases:
        full = handle({"id": 1, "code": code, "call": call})
        lean = handle({"id": 1, "code": code, "call": call, "prompt": False})
        assert lean["prompt"] is None and full["status"] == "ok"
        assert {**lean, "prompt": full["prompt"]} == full
        assert prompt_for(context_of(code, call)) == full["prompt"]
    bad = handle({"id": 2, "code": "x = 1 / 0\ndef f():\n    return 1\n", "call": "f()",
                  "prompt": False})
    assert bad["status"] == "invalid" and bad["prompt"].startswith("<|trace_context_start|>")


def test_repr_cache_keeps_no_deleted_local_alive():
    # an iterator's repr is cached; once the local is deleted, what it holds must be freed as
    # it is without the tracer's cache (here: at the next line event)
    code = ("import weakref\n\nclass C:\n    pass\n\ndef f():\n    c = C()\n    probe = weakref.ref(c)\n"
            "    it = iter([c])\n    del c\n    del it\n    x = 1\n    return probe() is None\n")
    r = trace_call(code, "f()")
    assert r.status == "ok" and r.result == "True"


def test_sets_nested_in_containers_do_not_follow_addresses():
    # a set of identity-hashed objects is sorted wherever it sits: in a dict's values or keys,
    # in a list or tuple, in a set inside a set; 12 elements, created in reverse order of their
    # reprs, so address order cannot pass for sorted
    code = ("class N:\n    def __init__(self, v):\n        self.v = v\n"
            "    def __repr__(self):\n        return 'N%02d' % self.v\n\n"
            "def f():\n    ns = [N(v) for v in range(11, -1, -1)]\n"
            "    g = {'a': set(ns[:4])}\n    k = {frozenset(ns[:3]): [(1, set(ns[:2]))]}\n"
            "    s = {(0, frozenset(ns[:3]))}\n    d = {'x': [{3, 1, 2}, {'b', 'a'}]}\n"
            "    return [{'deep': set(ns)}]\n")
    r = trace_call(code, "f()")
    loc = r.frames[-3].locals
    assert loc["g"] == "{'a': {N08, N09, N10, N11}}"
    assert loc["k"] == "{frozenset({N09, N10, N11}): [(1, {N10, N11})]}"
    assert loc["s"] == "{(0, frozenset({N09, N10, N11}))}"
    assert loc["d"] == repr({"x": [{3, 1, 2}, {"b", "a"}]})   # value-hashed: Python's order
    assert r.result == "[{'deep': {" + ", ".join("N%02d" % v for v in range(12)) + "}}]"


def test_nested_set_ordering_is_bounded_and_keeps_plain_reprs():
    class N:
        def __init__(self, v):
            self.v = v

        def __repr__(self):
            return f"N{self.v}"

    ns = [N(v) for v in range(9, -1, -1)]
    deep = set(ns)
    for _ in range(9):   # deeper than the search looks: left as it is
        deep = [deep]
    assert safe_repr(deep, 10_000) == repr(deep)
    cyclic = [set(ns[:3])]
    cyclic.append(cyclic)
    assert safe_repr(cyclic) == "[{N7, N8, N9}, [...]]"
    plain = {"t": (1,), "e": [(), {}, []], "f": frozenset(), "x": "{'s'}"}
    assert safe_repr(plain) == repr(plain)
    cut = safe_repr({"a": set(ns), "z": "x" * 500}, 20)
    assert cut == "{'a': {N0, N1, N2, N..." + "<truncated>"


def test_addresses_before_more_words_are_scrubbed():
    code = ("import weakref\n\nclass A:\n    pass\n\nclass Fut:\n    def __repr__(self):\n"
            "        return f'<Fut at {id(self):#x} state=pending>'\n\n"
            "def f():\n    a = A()\n    p = weakref.proxy(a)\n    u = [Fut()]\n    return 0\n")
    loc = trace_call(code, "f()").frames[-3].locals
    assert loc["p"] in ("<weakproxy to A>", "<weakproxy; to 'A'>")   # 3.11-3.12 / 3.13
    assert loc["u"] == "[<Fut state=pending>]"


def test_lambda_on_a_decorator_line_is_called_at_that_line():
    code = ("def deco(key):\n    def wrap(fn):\n        def inner(x):\n"
            "            return fn(key(x))\n        return inner\n    return wrap\n\n"
            "@deco(key=lambda v: v * 10)\ndef f(x):\n    return x\n")
    r = trace_call(code, "f(1)")
    calls = [(fr.locals, fr.source) for fr in r.frames if fr.kind == "call"][1:]
    assert calls == [({"x": "1", "fn": "<function f>", "key": "<function <lambda>>"},
                      "        def inner(x):\n"),
                     ({"v": "1"}, "@deco(key=lambda v: v * 10)\n"),
                     ({"x": "10"}, "def f(x):\n")]


def test_a_call_that_makes_main_a_generator_is_invalid():
    for call in ("(yield f(1))", "(yield)", "(x for x in (yield))"):
        r = trace_call("def f(x):\n    return x\n", call)
        assert r.status == "invalid" and "generator" in r.error and r.text == "", call
    assert trace_call("", "list((lambda: (yield 1))())").result == "[1]"   # its own scope


def test_generator_started_before_main_resumes_at_its_yield():
    code = ("def g():\n    yield 1\n    yield 2\n\nG = g()\nnext(G)\n\n"
            "def f():\n    return next(G)\n")
    r = trace_call(code, "f()")
    assert [(fr.kind, fr.source.strip()) for fr in r.frames if fr.scope == 2] == [
        ("call", "yield 1"), ("line", "yield 2"), ("return", "yield 2")]
    if HAS_MONITORING:
        assert trace_call(code, "f()", backend="settrace").text == r.text


def test_sets_of_stdlib_value_types_keep_their_hash_order():
    # their hashes come from their values (dates': through the bytes hash, pinned like str's
    # by the sandbox's PYTHONHASHSEED): Python's own order, as for ints and strs
    import datetime
    import decimal
    import fractions
    values = [{fractions.Fraction(1, 2), fractions.Fraction(2, 1), fractions.Fraction(1, 3)},
              {decimal.Decimal("1.5"), decimal.Decimal("10"), decimal.Decimal("0.1")},
              {datetime.timedelta(days=d) for d in (3, 1, 2, 40)},
              {datetime.date(2020, 1, d) for d in (3, 1, 2, 9)},
              {datetime.datetime(2020, 1, 1, h) for h in (3, 1, 2, 9)},
              {datetime.time(h) for h in (3, 1, 2, 9)}]
    for v in values:
        assert safe_repr(v, 1000) == repr(v)
        assert safe_repr({"in": v}, 1000) == repr({"in": v})
    nan = {decimal.Decimal("NaN"), decimal.Decimal(2), decimal.Decimal(1)}  # NaN: by identity
    assert safe_repr(nan) == "{Decimal('1'), Decimal('2'), Decimal('NaN')}"


class _N:
    """Prints as N00..N99; made in reverse order of their reprs, so that address order (the
    order of a set of them) cannot pass for sorted."""

    def __init__(self, v):
        self.v = v

    def __repr__(self):
        return "N%02d" % self.v


def test_sorted_sets_carry_no_address_in_any_value():
    # a str made from a default repr, beside a set of objects: the sorted text was not scrubbed
    # on the way to a return value (locals were scrubbed afterwards)
    code = ("class A:\n    pass\n\ndef f():\n    a, b = A(), A()\n    v = [str(a), {a, b}]\n"
            "    w = {str(a), a}\n    return v\n")
    r = trace_call(code, "f()")
    loc = r.frames[-3].locals
    assert r.result == loc["v"] == \
        "['<__main__.A object>', {<__main__.A object>, <__main__.A object>}]"
    assert loc["w"] == "{'<__main__.A object>', <__main__.A object>}"
    assert " at 0x" not in r.text


def test_sets_holding_a_nan_do_not_follow_addresses():
    # a float or complex NaN hashes by its identity (3.10+): such a set iterates in address order
    nans = [float("nan") for _ in range(200)]   # alive together: 200 addresses
    assert {safe_repr({n, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0}) for n in nans} == {
        "{1.0, 2.0, 3.0, 4.0, 5.0, 6.0, nan}"}
    cnans = [complex("nan+0j") for _ in range(200)]
    assert {safe_repr({"k": [{c, 1j, 2j, 3j, 4j}]}) for c in cnans} == {
        "{'k': [{(nan+0j), 1j, 2j, 3j, 4j}]}"}
    assert safe_repr({2.5, 1.5, 7.0}) == repr({2.5, 1.5, 7.0})   # no NaN: Python's order


def test_nested_sets_are_sorted_past_the_search_bound_and_in_defaultdicts():
    from collections import defaultdict

    ns = [_N(v) for v in range(11, -1, -1)]
    first = "{" + ", ".join("N%02d" % v for v in range(12)) + "}"
    # more elements than the search looks at: the visible text is rebuilt set by set
    padded = {"x": [set(ns)], "pad": list(range(5000))}
    assert safe_repr(padded, 1000).startswith("{'x': [" + first + "], 'pad': [0, 1, 2, ")
    graph = {n: set(ns[:3]) for n in ns}
    graph.update({_N(100 + i): {i} for i in range(3000)})
    assert safe_repr(graph).startswith("{N11: {N09, N10, N11}, N10: {N09, N10, N11}, ")
    adjacency = defaultdict(set)
    adjacency["a"] |= set(ns)
    assert safe_repr(adjacency, 1000) == "defaultdict(<class 'set'>, {'a': " + first + "})"
    loops = defaultdict(list, {"x": [set(ns[:2])]})
    loops["x"].append(loops)
    assert safe_repr(loops) == ("defaultdict(<class 'list'>, {'x': [{N10, N11}, "
                                "defaultdict(<class 'list'>, {...})]})")
    plain = defaultdict(list, {"a": [1], "b": {2: {3}}})
    assert safe_repr(plain) == repr(plain) and safe_repr(defaultdict(set)) == repr(defaultdict(set))
    assert trace_call("from collections import defaultdict\n\nclass N:\n    pass\n\n"
                      "def f():\n    g = defaultdict(set)\n    g[1].add(N())\n    return g\n",
                      "f()").result == "defaultdict(<class 'set'>, {1: {<__main__.N object>}})"


def test_a_value_cut_after_scrubbing_keeps_its_marker_rule():
    # the text is cut where the address-free text passes the limit (it was cut where the text
    # with the address did, then scrubbed shorter, without "...<truncated>")
    ns = [_N(v) for v in range(11, -1, -1)]
    k = "x at 0xffffffffffffffff " + "y" * 171
    assert safe_repr({"k": k, "s": set(ns[:2])}) == "{'k': 'x " + "y" * 171 + "', 's': {N10, N11}}"
    assert safe_repr({"k": k + "y" * 30, "s": set(ns[:2])}) == \
        ("{'k': 'x " + "y" * 300)[:200] + "...<truncated>"


def test_packed_frames_take_no_more_room_than_the_text():
    # frames repeat every local in full at every event (here 6 MB of them for 0.8 MB of text):
    # sent packed, they are smaller than the text, and unpack to the full frames
    from stages.tracer.frames import unpack_frames

    limits = TraceLimits()
    out = handle(dict(BIG_FRAMES, limits={"max_events": limits.max_events,
                                          "max_bytes": limits.max_bytes}))
    assert out["status"] == "ok" and len(out["trace"]) > 500_000
    assert len(json.dumps(out["frames"])) < len(out["trace"])
    full = trace_call(BIG_FRAMES["code"], BIG_FRAMES["call"]).frames
    assert unpack_frames(out["frames"]) == [
        {"kind": f.kind, "scope": f.scope, "line": f.line, "locals": f.locals, "value": f.value}
        for f in full]
    for bad in [{}, [[]], [["line", 0, 1, {"a": 0}, None]], [["line", 0, 1, {"a": 1}, None]],
                [["jump", 0, 1, None, None]], [["line", "0", 1, {}, None]],
                [["return", 0, 1, None, 5]]]:
        with pytest.raises(ValueError):
            unpack_frames(bad)


BIG_FRAMES = {"id": 1, "frames": True, "prompt": False, "call": "f(3000)",
              "code": "def f(n):\n    table = [str(i) * 3 for i in range(60)]\n"
                      "    a = 'x' * 150\n    b = 'y' * 150\n    c = 'z' * 150\n"
                      "    total = 0\n    for i in range(n):\n        total += i\n"
                      "    return total\n"}


def test_a_trace_within_the_text_limits_fits_the_response_cap_with_its_frames():
    try:
        from codeworld.config import TraceLimitsConfig
    except ImportError:   # pydantic is built for the project's venv only
        pytest.skip("codeworld.config needs the project's venv")
    from stages.trace_runner import sandbox_limits

    limits = TraceLimitsConfig()
    out = handle(dict(BIG_FRAMES, limits={"max_events": limits.max_events,
                                          "max_bytes": limits.max_bytes}))
    assert out["status"] == "ok"
    size = len(json.dumps(out, ensure_ascii=False).encode())   # as the fork server sends it
    assert size < sandbox_limits(limits, True).response_bytes
    # (unpacked, the frames alone pass the cap that text-only requests get)
    plain = [{"locals": f.locals} for f in trace_call(BIG_FRAMES["code"], "f(3000)").frames]
    assert len(json.dumps(plain).encode()) > sandbox_limits(limits).response_bytes


def test_async_generator_yields_show_the_value():
    # CPython hands the loop an async generator's yielded value in a wrapper of its own
    code = ("import asyncio\n\nasync def ag(n):\n    for i in range(n):\n        yield [i]\n\n"
            "async def g(n):\n    return [x async for x in ag(n)]\n\n"
            "def f(n):\n    return asyncio.run(g(n))\n")
    r = trace_call(code, "f(2)")
    assert r.result == "[[0], [1]]"
    for backend in ("settrace", "monitoring") if HAS_MONITORING else ("settrace",):
        r = trace_call(code, "f(2)", backend=backend)
        yields = [fr.value for fr in r.frames if fr.kind == "return" and fr.line == 5]
        assert yields == ["[0]", "[1]"], backend


def test_a_value_holding_a_token_of_the_format_is_written_without_it():
    # a str local '<|frame_sep|>' went into the frame as is: the parser split the frame there
    # and the tokenizer read the special token (end-of-text mid-document). (A program whose
    # own text holds one is refused before it runs: trace_runner.)
    from codeworld.tokens import END_OF_TEXT, SPECIAL_TOKENS
    from codeworld.trace_metrics import parse

    code = ("def f(n):\n    lt = chr(60)\n    t = lt + '|frame_sep|>' + lt + '|end_of_text|>'\n"
            "    u = [lt + '/tool>', lt + 'tool: bash>'] * n\n    return t\n")
    r = trace_call(code, "f(1)")
    body = r.text
    for sep in ("<|frame_sep|>", "<|line_sep|>", "<|call_sep|>", "<|return_sep|>",
                "<|action_sep|>", "<|arg_sep|>"):
        body = body.replace(sep, "")
    assert not [t for t in SPECIAL_TOKENS if t in body], body
    assert r.frames[-4].locals["t"] == "'<|frame_sep|><|end_of_text|>'"   # the value itself
    assert r.frames[-3].locals["u"] == "['</tool>', '<tool: bash>']"
    assert r.result == "'<|frame_sep|><|end_of_text|>'"
    parsed = parse(r.text + END_OF_TEXT)
    assert parsed.valid and parsed.frames[-1].value == r.result, parsed


# A frame that has returned must not be kept alive by the tracer: its locals would outlive the
# call, and a finaliser or weakref the program observes right after it would show otherwise
# than untraced (the recorder held the last entered frame until the next call: result []).
_FINALISED = """import weakref
log = []
class D:
    def __del__(self):
        log.append("del")
class Node:
    pass
def make():
    n = Node()
    return weakref.ref(n)
def g():
    d = D()
    return 1
def h():
    d = D()
    raise ValueError(len(log))
def gen():
    d = D()
    yield 1
    yield 2
def gen2():
    items = iter([D()])
    yield 1
    yield 2
def f():
    g()
    seen = list(log)
    r = make()
    try:
        h()
    except ValueError:
        pass
    seen.append(list(log))
    it = gen()
    next(it)
    del it
    seen.append(list(log))
    it = gen2()
    next(it)
    del it
    seen.append(len(log))
    return seen, r() is None
"""


def test_a_returned_frame_is_not_kept_alive_by_the_tracer():
    namespace: dict = {}
    exec(_FINALISED, namespace)
    untraced = repr(namespace["f"]())
    assert untraced == "(['del', ['del', 'del'], ['del', 'del', 'del'], 4], True)"
    for backend in ("settrace", "monitoring") if HAS_MONITORING else ("settrace",):
        r = trace_call(_FINALISED, "f()", backend=backend)
        assert (r.status, r.result) == ("ok", untraced), backend


def test_keys_a_program_writes_into_locals_are_written_as_json_dumps_would():
    # locals() is the frame's own dict on 3.11 and a class body's namespace on every version:
    # a key that is no str made the tracer raise inside its own callback (TypeError), which
    # ended tracing and reached the program; the trace was called "the program replaced the
    # tracer"
    code = ("def f():\n    locals()[5] = 'five'\n    x = 1\n    return x\n\n"
            "def g():\n    class A:\n        locals()[(1, 2)] = None\n        y = 2\n"
            "    return A.y\n")
    r = trace_call(code, "f()")
    assert (r.status, r.result) == ("ok", "1")
    if sys.version_info < (3, 13):   # (3.13's locals() is a snapshot: the key goes nowhere)
        assert '<|line_sep|>{"5": "\'five\'"}<|action_sep|>    x = 1\n' in r.text
        assert r.frames[5].locals == {"5": "'five'", "x": "1"}
    r = trace_call(code, "g()")
    assert (r.status, r.result) == ("ok", "2")
    body = [fr.locals for fr in r.frames if fr.kind == "line" and fr.source.strip() == "y = 2"]
    assert len(body) == 1 and body[0]["(1, 2)"] == "None"   # (3.13 adds __firstlineno__)
    assert body[0]["__qualname__"] == "'g.<locals>.A'"
    from stages.tracer.frames import name_text
    assert [name_text(k) for k in (True, False, None, 7, 1.5, float("nan"), -float("inf"))] == \
        ["true", "false", "null", "7", "1.5", "NaN", "-Infinity"]


def test_a_fault_of_the_tracer_is_named_and_never_reaches_the_program(monkeypatch):
    # an exception raised inside a trace callback ended tracing and surfaced in the program,
    # at whatever line was running: this one swallowed it and returned "caught"
    code = "def f():\n    try:\n        x = 1\n    except Exception:\n        return 'caught'\n    return x\n"

    def broken(self, frame, line):
        raise ValueError("tracer bug")

    monkeypatch.setattr(tracer.Recorder, "line", broken)
    for backend in ("settrace", "monitoring") if HAS_MONITORING else ("settrace",):
        r = tracer.trace_call(code, "f()", backend=backend)
        assert (r.status, r.result) == ("invalid", None), backend
        assert r.error == "untraceable: tracer error ValueError: tracer bug"


def test_exceptions_of_any_class_are_the_programs_outcome_or_a_failed_repr():
    # A class of the program's deriving from BaseException escaped trace_call: the sandbox
    # reported the program "killed" (dropped), whether the program raised it or only a
    # __repr__ the tracer called did (the program itself ran fine)
    code = ("class Stop(BaseException):\n    pass\n\nclass R:\n    def __repr__(self):\n"
            "        raise Stop('repr')\n\ndef raises():\n    raise Stop('out')\n\n"
            "def shows():\n    r = R()\n    return 1\n")
    r = trace_call(code, "raises()")
    assert (r.status, r.error) == ("exception", "Stop: out")
    assert r.text.endswith('<|exception_sep|><|action_sep|>    return raises()\n'
                           '<|arg_sep|>"Stop(\'out\')"<|frame_sep|>')
    r = trace_call(code, "shows()")
    assert (r.status, r.result) == ("ok", "1")
    assert r.frames[-3].locals == {"r": "<repr of R raised Stop>"}
    assert safe_repr(R_SYSTEM_EXIT()) == "<repr of R_SYSTEM_EXIT raised SystemExit>"
    r = trace_call("class Stop(BaseException):\n    pass\n\nraise Stop()\n", "len('')")
    assert (r.status, r.error) == ("invalid", "module body raised Stop")
    with pytest.raises(KeyboardInterrupt):   # the in-process caller's own, never swallowed
        trace_call("def f():\n    raise KeyboardInterrupt\n", "f()")


class R_SYSTEM_EXIT:
    def __repr__(self):
        raise SystemExit(3)


class _Counted:
    """An element whose __repr__ counts its calls (and shows an address, scrubbed)."""
    calls = 0

    def __repr__(self):
        type(self).calls += 1
        return f"<C at {id(self):#x}>"


class _Owner:
    """An element whose repr shows the container holding it (a cycle through a user repr)."""

    def __init__(self, owner):
        self.owner = owner

    def __repr__(self):
        return f"Owner({self.owner!r})"


def _values_for_prefix_reprs():
    from collections import Counter, OrderedDict, defaultdict, deque
    from unittest import mock
    loop = [1, "it's"]
    loop.append(loop)
    loop.append(_Owner(loop))
    d = {"k": 'say "hi"'}
    d["self"] = d
    d["owner"] = _Owner(d)
    dd = defaultdict(list, {1: [2]})
    dd[2] = dd
    od = OrderedDict((i, str(i) * i) for i in range(40))
    od.move_to_end(3)
    od["me"] = od
    dq = deque(range(100), maxlen=120)
    dq.append(dq)
    both = "both ' and \" quotes " * 30
    deep = list(range(300))
    for _ in range(30):   # deeper than prefix.py writes itself: the rest is CPython's repr
        deep = [deep]
    return [
        loop, d, dd, od, dq, deque(), deque([], maxlen=2), OrderedDict(), defaultdict(None),
        Counter("abracadabra" * 7), Counter(),
        Counter({"x": 1.5, "y": 1, "z": 2}), {"s": set("abcdefgh" * 9)},
        frozenset(range(300)), set(), frozenset(), {i: (i, [i] * i) for i in range(60)},
        [both, both.encode(), "x at 0x1f, " * 40, b"\x00\xff" * 100, "it's " * 100],
        deep,
        (1,), ((),), [json, sys, iter("ab"), "str_ascii_iterator"] * 30,
        {"a": list(range(100_000))}, tuple({"k": i} for i in range(80)),
        [mock.MagicMock(name=f"m{i}") for i in range(40)],
    ]


@pytest.mark.parametrize("limit", [10, 50, 200, 5000])
def test_prefix_reprs_give_the_plain_truncated_text(limit):
    # prefix.py writes containers as CPython does, only as far as kept: the text must be what
    # safe_repr gave from the whole repr (scrubbed, cut), cycles (also through a user repr
    # reaching the container being written) and each type's own order included
    from stages.tracer.prefix import prefix_repr
    from stages.tracer.reprs import scrub, truncate
    for value in _values_for_prefix_reprs():
        expected = truncate(scrub(repr(value)), limit)
        assert prefix_repr(value, limit) == expected, repr(value)[:200]
        assert safe_repr(value, limit) == expected


def test_large_containers_are_repr_d_only_as_far_as_kept():
    # a container holding 20k elements: the text keeps ~200 characters, yet every element's
    # __repr__ ran at every frame (a local set of 100k ints in a 200-iteration loop: 6.4 s
    # traced, 0.011 s untraced)
    from collections import OrderedDict, deque
    from stages.tracer.reprs import scrub, truncate
    items = [_Counted() for _ in range(20_000)]
    for value in (items, {"a": items}, deque(items), OrderedDict(enumerate(items)),
                  dict(enumerate(items)), [[x] for x in items]):
        expected = truncate(scrub(repr(value)), 200)
        _Counted.calls = 0
        assert safe_repr(value, 200) == expected
        assert _Counted.calls <= 60, type(value)
    # (the count is kept where the program never looks: a count it returned would be a run
    # that never happens, dropped as repr_side_effect, see untraced.py)
    code = ("import builtins\n\n"
            "class C:\n    def __repr__(self):\n        builtins.repr_calls[0] += 1\n"
            "        return 'C'\n\n"
            "def f():\n    d = {'a': [C() for _ in range(5000)]}\n    t = 0\n"
            "    for k in range(100):\n        t += 1\n    return t\n")
    builtins.repr_calls = [0]
    try:
        r = trace_call(code, "f()")
        calls = builtins.repr_calls[0]
    finally:
        del builtins.repr_calls
    # d's first frame reprs all 5000 (nothing says it is long yet), the ~200 after it ~80 each
    # (before: 5000 each, 1e6 in all)
    assert (r.status, r.result) == ("ok", "100") and 5000 < calls < 5000 + 200 * 100
    assert '"d": "{\'a\': [C, C, C' in r.text


def test_long_sequences_of_text_are_scrubbed_as_inside_any_container():
    # the shortcut for long lists of scalars (reprs.long_sequence_prefix) did not scrub: a str
    # in it kept "str_ascii_iterator" or " at 0x1f>", which the whole repr scrubs
    from stages.tracer.reprs import scrub, truncate
    for value in (["str_ascii_iterator"] * 100, ("<x at 0x1f>",) * 70, ["a at 0x1f, "] * 90):
        assert safe_repr(value, 200) == truncate(scrub(repr(value)), 200)


def test_big_locals_change_as_the_program_changes_them(monkeypatch):
    # the per-name hint (core._LONG) makes the next repr of a long local a prefix build: it must
    # show every change the whole repr shows
    from stages.tracer import core
    code = ("def f():\n    d = {'a': list(range(300))}\n    d['a'][0] = 'x'\n    d = {'b': d}\n"
            "    s = set(range(300))\n    s.discard(0)\n    s = {1}\n    q = [[0]] * 100\n"
            "    q[0] = 5\n    return len(d)\n")
    built = trace_call(code, "f()")
    monkeypatch.setattr(core, "prefix_repr", lambda value, limit: None)   # whole reprs only
    whole = trace_call(code, "f()")
    assert built.status == whole.status == "ok"
    assert built.text == whole.text


def test_mock_ids_are_scrubbed_as_addresses_are():
    # unittest.mock writes id='<decimal>' where other reprs write " at 0x<hex>": traces holding
    # a mock differed from run to run and were dropped by the double-run check
    code = ("from unittest import mock\n\ndef f():\n    m = mock.MagicMock()\n"
            "    c = m.conn\n    s = mock.Mock(spec=str)\n    return [m, c, s]\n")
    r = trace_call(code, "f()")
    assert r.status == "ok" and "id='" not in r.text
    assert r.result == "[<MagicMock>, <MagicMock name='mock.conn'>, <Mock spec='str'>]"
    from stages.tracer.reprs import settled_scrub
    assert settled_scrub("[<Mock id='12'>, <Mock id='3") == "[<Mock>, <Mock"   # (may go on)
    assert safe_repr("<Mock id='12'>") == "\"<Mock id='12'>\""   # a str is the user's data


HANGING_REPR = ("class R:\n    def __repr__(self):\n        while True:\n            pass\n\n"
                "class Shown:\n    def __repr__(self):\n        return helper(2)\n\n"
                "def helper(n):\n    return 'S' * n\n\n"
                "def f():\n    r = R()\n    xs = [1, R()]\n    s = Shown()\n    t = 0\n"
                "    for k in range(30):\n        t += k\n    return r\n")


def test_a_repr_that_never_returns_times_out_within_a_budget_of_events():
    # untraced the program never reprs r and ends at once; traced, every frame reprs it: the
    # trace hung until the sandbox killed it (dropped). Now a repr's Python code runs within a
    # budget of trace events (guard.py): deterministic, the same text on every run
    script = ("import json, sys\n"
              f"sys.path[:0] = [{str(Path(__file__).resolve().parents[1])!r}]\n"
              "from stages.tracer import trace_call\n"
              f"code = {HANGING_REPR!r}\n"
              "rs = [trace_call(code, 'f()') for _ in range(2)]\n"
              "print(json.dumps([[r.status, r.result, r.text] for r in rs]))\n")
    out = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    (status, result, text), again = json.loads(out.stdout)
    assert (status, result) == ("ok", "<repr of R timed out>") and again[2] == text
    assert '"r": "<repr of R timed out>"' in text and '"xs": "<repr of list timed out>"' in text
    # a __repr__ calling the program's own function: that call is the tracer's, not a frame
    assert '"s": "SS"' in text and "return 'S' * n" not in text


# __repr__s with side effects: the tracer reprs every local at every frame, the program
# untraced never does (each: the program, its call, what it returns untraced)
SIDE_EFFECT_REPRS = {
    "counter": ("class Probe:\n    def __init__(self):\n        self.n = 0\n\n"
                "    def __repr__(self):\n        self.n += 1\n        return 'Probe()'\n\n"
                "def f(k):\n    p = Probe()\n    total = 0\n    for i in range(k):\n"
                "        total += i\n    return p.n\n", "f(3)", "0"),
    "iterator": ("class Peek:\n    def __init__(self, items):\n        self.it = iter(items)\n\n"
                 "    def __repr__(self):\n        return f'Peek({next(self.it, None)!r})'\n\n"
                 "def f(xs):\n    p = Peek(xs)\n    first = next(p.it, None)\n    return first\n",
                 "f([1, 2, 3, 4])", "1"),
    "printed": ("class Log:\n    seen = []\n\n    def __repr__(self):\n"
                "        Log.seen.append(1)\n        return 'Log'\n\n"
                "def f(k):\n    log = Log()\n    for i in range(k):\n        pass\n"
                "    print(len(Log.seen))\n    return None\n", "f(2)", "None"),
    "raised": ("class Once:\n    used = False\n\n    def __repr__(self):\n"
               "        Once.used = True\n        return 'Once'\n\n"
               "def f():\n    o = Once()\n    if Once.used:\n        raise ValueError('seen')\n"
               "    return 1\n", "f()", "1"),
}


def _traced_in_a_fresh_interpreter(cases: list[tuple[str, str]]) -> tuple[list, str]:
    """[status, result, error] of trace_call(code, call) for each case, traced twice each, in an
    interpreter whose stdout is fd 1 itself (as in the sandbox; pytest's capture replaces it);
    and what the programs wrote there."""
    script = ("import json, sys\n"
              f"sys.path[:0] = [{str(Path(__file__).resolve().parents[1])!r}]\n"
              "from stages.tracer import trace_call\n"
              f"cases = {cases!r}\n"
              "rs = [[[r.status, r.result, r.error] for r in (trace_call(c, k), trace_call(c, k))]"
              " for c, k in cases]\n"
              "print(json.dumps(rs))\n")
    out = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    *written, last = out.stdout.splitlines()
    return json.loads(last), "\n".join(written)


def test_a_repr_with_side_effects_that_change_the_outcome_drops_the_trace():
    names = sorted(SIDE_EFFECT_REPRS)
    for name in names:   # what each program does untraced
        code, call, untraced = SIDE_EFFECT_REPRS[name]
        namespace: dict = {"__name__": "__main__"}
        exec(code, namespace)
        assert repr(eval(call, namespace)) == untraced, name
    runs, written = _traced_in_a_fresh_interpreter([SIDE_EFFECT_REPRS[n][:2] for n in names])
    for name, (first, again) in zip(names, runs):
        # they used to be "ok" with the traced run's outcome (results 9 for 0, 2 for 1,
        # ValueError for 1; the count printed 6 for 0): a run that never happens
        status, result, error = first
        assert (status, result) == ("invalid", None), (name, first)
        assert error.startswith("repr_side_effect: ") and "untraced" in error, (name, error)
        assert again == first   # the same verdict on every run
    assert "repr_side_effect: the tracer's reprs changed what the program writes" in \
        runs[names.index("printed")][0][2]
    assert written.split() == ["6", "6"]   # the traced runs' own output still gets through


def test_reprs_that_change_nothing_the_program_sees_keep_the_trace():
    # pure or caching __repr__s, a program that prints, one that raises: the untraced run ends
    # the same way, and the program's output reaches stdout once a run
    code = ("class P:\n    def __init__(self, x):\n        self.x = x\n        self._text = None\n\n"
            "    def __repr__(self):\n        if self._text is None:\n"
            "            self._text = f'P({self.x})'\n        return self._text\n\n"
            "def f(k):\n    ps = [P(i) for i in range(k)]\n    print('made', len(ps))\n"
            "    return ps\n\n"
            "def g():\n    p = P(1)\n    raise KeyError(p)\n")
    runs, written = _traced_in_a_fresh_interpreter([(code, "f(3)"), (code, "g()")])
    assert runs == [[["ok", "[P(0), P(1), P(2)]", None]] * 2,
                    [["exception", None, "KeyError: P(1)"]] * 2]
    assert written.splitlines() == ["made 3", "made 3"]


def test_the_untraced_run_forks_only_once_a_repr_runs_python_code(monkeypatch):
    from stages.tracer import untraced
    forks = []

    def no_fork():
        forks.append(1)
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(untraced.os, "fork", no_fork)
    stdout = [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (1, 2)]
    # objects of the program's class with object's own repr: no Python code runs, no fork
    plain = "class P:\n    pass\n\ndef f(k):\n    ps = [P() for _ in range(k)]\n    return len(ps)\n"
    assert (trace_call(plain, "f(2)").status, forks) == ("ok", [])
    # a __repr__ of its own: the trace cannot be checked without the fork, so it is not kept
    code, call, _ = SIDE_EFFECT_REPRS["counter"]
    r = trace_call(code, call)
    assert (r.status, forks) == ("invalid", [1])
    assert r.error == ("untraceable: no untraced run to compare with (fork failed: [Errno 11] "
                       "Resource temporarily unavailable)")
    # forked, but no memory file for the output: the fork is ended, the fds are as they were
    monkeypatch.undo()

    def no_memfd(name, flags=0):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(untraced.os, "memfd_create", no_memfd)
    r = trace_call(code, call)
    assert r.error == ("untraceable: no untraced run to compare with (output not captured: "
                       "[Errno 24] Too many open files)")
    assert [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (1, 2)] == stdout
