"""What sandboxed code prints is untrusted: a line nested deeper than the JSON parser recurses,
or a record of another shape, is malformed output, never an exception on the host (it
stopped the traces stage, and an agent's package stopped RL's reward run)."""
from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest

from codeworld.config import TraceLimitsConfig
from codeworld.sandbox.output import json_or_none
from stages.agent.envs import run_tests
from stages.trace_runner import trace_requests
from tests.test_agent_validity import _env

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None and not os.environ.get("CI"),
                                reason="bubblewrap not installed")

DEEP = b"[" * 200000 + b"]" * 200000

# writes to every pipe it holds but stderr: the handler's response pipe (tracer), the runner's
# result pipe (tests)
WRITE_PIPES = '''\
import os, stat
_err = os.fstat(2).st_ino
for _fd in range(3, 64):
    try:
        _st = os.fstat(_fd)
    except OSError:
        continue
    if stat.S_ISFIFO(_st.st_mode) and _st.st_ino != _err:
        for _line in LINES:
            os.write(_fd, _line + b"\\n")
'''


def test_deep_json_is_malformed_not_a_recursion_error():
    assert json_or_none(DEEP) is None and json_or_none(b'{"ok": 1}') == {"ok": 1}
    with pytest.raises(RecursionError):   # why: json.loads raises no ValueError for it
        __import__("json").loads(DEEP)


def test_a_program_printing_deep_json_on_the_response_pipe_fails_alone():
    evil = (f"LINES = [b'{{\"ok\": ' + {DEEP[:1]!r} * 200000 + {DEEP[-1:]!r} * 200000 + b'}}']\n"
            + WRITE_PIPES + "os._exit(0)\n\ndef f(x):\n    return x\n")
    reqs = [{"id": "0", "code": "def f(x):\n    return x + 1\n", "call": "f(1)"},
            {"id": "1", "code": evil, "call": "f(1)"}]
    for batch in (1, 2):
        good, bad = trace_requests(reqs, TraceLimitsConfig(), workers=1, batch_size=batch)
        assert good["status"] == "ok" and good["result"] == "2", batch
        assert bad["status"] not in ("ok", "exception"), (batch, bad)


def test_a_package_printing_deep_or_misshapen_records_cannot_stop_the_test_run(tmp_path):
    lines = [DEEP, b'{"test": "tests/test_mod.py::test_x", "outcome": ["pass"]}',
             b'{"test": "tests/test_mod.py::test_y", "outcome": "pass", "message": 5}',
             b'{"summary": 7}']
    env = _env(tmp_path / "evil", "evil", "mod", f"LINES = {lines!r}\n" + WRITE_PIPES
               + "\n\ndef add(a, b):\n    return a + b\n",
               "from pkg.mod import add\n\n\ndef test_add():\n    assert add(1, 2) == 3\n")
    run = run_tests(env.tree, env, None, wall_seconds=60)
    assert run.outcomes["tests/test_mod.py::test_add"] == "pass"
    assert run.outcomes["tests/test_mod.py::test_y"] == "pass"   # forged, but well-formed
    assert "tests/test_mod.py::test_x" not in run.outcomes
    assert run.messages.get("tests/test_mod.py::test_y") is None and run.summary["exit"] == 0


FORGER = '''\
import json, os, stat
for _fd in range(3, 64):
    try:
        if not stat.S_ISFIFO(os.fstat(_fd).st_mode):
            continue
        for _i, _r in ((0, "0"), (1, "'forged'"), (2, "'forged'")):
            os.write(_fd, json.dumps({"ok": {"id": str(_i), "trace": "FORGED", "result": _r,
                                             "error": None, "status": "ok", "events": 1,
                                             "prompt": None}}).encode() + b"\\n")
    except OSError:
        continue
os._exit(0)

def f(x):
    return x
'''


def test_a_program_cannot_write_its_neighbours_responses():
    # the programs of a batch shared one process and its response pipe: the first wrote the
    # others' records, and the host took them
    good = "def f(x):\n    return x + 1\n"
    reqs = [{"id": "0", "code": FORGER, "call": "f(1)"},
            {"id": "1", "code": good, "call": "f(1)"}, {"id": "2", "code": good, "call": "f(41)"}]
    out = trace_requests(reqs, TraceLimitsConfig(), workers=1, batch_size=3)   # "process"
    assert out[0]["status"] not in ("ok", "exception")
    assert [(r["status"], r["result"]) for r in out[1:]] == [("ok", "2"), ("ok", "42")]
    # traces.isolation "shared" is the measured trade-off: there the forgery goes through
    shared = trace_requests(reqs, TraceLimitsConfig(), workers=1, batch_size=3,
                            isolation="shared")
    assert [r["trace"] for r in shared[1:]] == ["FORGED", "FORGED"]


def test_a_program_cannot_change_its_neighbours_state():
    # decimal's context and the environment carried over to the next program of a batch
    first = ("import decimal, os\n\ndef f(x):\n    decimal.getcontext().prec = x\n"
             "    os.environ['TZ'] = 'X'\n    os.chdir('/')\n    return x\n")
    second = ("import decimal, os\n\ndef f(x):\n"
              "    return str(decimal.Decimal(1) / decimal.Decimal(x)), os.environ.get('TZ'), "
              "os.getcwd()\n")
    reqs = [{"id": "a", "code": first, "call": "f(3)"}, {"id": "b", "code": second, "call": "f(7)"}]
    alone, batched = (trace_requests(reqs, TraceLimitsConfig(), workers=1, batch_size=n)
                      for n in (1, 2))
    assert batched == alone
    assert alone[1]["result"].startswith("('0.1428571428571428571428571429', None, ")
    shared = trace_requests(reqs, TraceLimitsConfig(), workers=1, batch_size=2,
                            isolation="shared")
    assert shared[1]["result"].startswith("('0.143', 'X', '/')")   # carried over


MISSHAPEN = '''\
import json, os, stat
for _fd in range(3, 64):
    try:
        if stat.S_ISFIFO(os.fstat(_fd).st_mode):
            os.write(_fd, json.dumps({"ok": RESPONSE}).encode() + b"\\n")
    except OSError:
        continue
os._exit(0)

def f(x):
    return x
'''


@pytest.mark.parametrize("isolation", ["process", "shared"])
def test_a_response_of_the_wrong_shape_is_an_invalid_record_not_a_crash(isolation):
    # the stage read status and trace as str: a program writing its own response with other
    # types (well-formed JSON) stopped the traces stage with AttributeError, again on resume
    responses = [{"id": "0", "status": 7, "trace": 5, "events": 1},
                 {"id": "0", "status": "ok", "trace": ["x"], "events": 1},
                 {"id": "0", "status": "ok", "trace": "", "events": "1"},
                 {"id": "other", "status": "ok", "trace": "", "events": 1}]
    reqs = [{"id": "0", "code": MISSHAPEN.replace("RESPONSE", repr(r)), "call": "f(1)"}
            for r in responses]
    for req, rec in zip(reqs, [trace_requests([r], TraceLimitsConfig(), workers=1,
                                              isolation=isolation)[0] for r in reqs]):
        assert rec["status"] == "invalid", rec
        assert rec["error"].startswith("Invalid: the sandbox's response "), rec
    good = trace_requests([{"id": "0", "code": "def f(x):\n    return x\n", "call": "f(1)"}],
                          TraceLimitsConfig(), workers=1, isolation=isolation)[0]
    assert good["status"] == "ok" and good["result"] == "1"


def test_a_program_whose_text_holds_a_token_of_the_format_is_refused_before_it_runs():
    # its source lines (the trace's actions) would carry the token as text
    reqs = [{"id": "a", "code": "def f(x):\n    return x + '<|frame_sep|>'\n", "call": "f('')"},
            {"id": "b", "code": "def f(x):\n    return x\n", "call": "f('</tool>')"},
            {"id": "c", "code": "def f(x):\n    return x\n", "call": "f('tool')"}]
    a, b, c = trace_requests(reqs, TraceLimitsConfig(), workers=1)
    assert (a["status"], a["error"]) == (
        "invalid", "Invalid: the program holds <|frame_sep|>, a token of the trace format")
    assert b["status"] == "invalid" and "</tool>" in b["error"]
    assert c["status"] == "ok" and c["result"] == "'tool'"


# -- output as bytes, read lazily: a flood of short lines costs no str and no parse per line --
# A test writing b"\xff\n" * 32M to the runner's stdout (and stderr) made the host build a
# str per line and parse each: 205 s and 3.3 GiB at the 64 MiB cap (bench/junk_output.py).

class _Parses:
    """Counts json.loads calls (wherever the host reads from)."""

    def __init__(self, monkeypatch):
        import json
        self.calls, real = [], json.loads

        def loads(s, *a, **kw):
            self.calls.append(s if isinstance(s, str) else s.decode("utf-8", "replace"))
            return real(s, *a, **kw)

        monkeypatch.setattr(json, "loads", loads)


def _fake_result(stdout: bytes, stderr: bytes = b"", truncated: bool = False):
    from types import SimpleNamespace
    return SimpleNamespace(stdout_bytes=stdout, stdout=stdout.decode("utf-8", "replace"),
                           stderr_bytes=stderr, stderr=stderr.decode("utf-8", "replace"),
                           stdout_truncated=truncated, stderr_truncated=False, timed_out=False,
                           returncode=0, killed_by_signal=None, memory_limit_hit=False,
                           workdir_error=None, workdir_free_bytes=None)


def test_json_lines_parse_only_lines_that_start_with_a_brace(monkeypatch):
    from codeworld.sandbox.output import JsonLines
    parses = _Parses(monkeypatch)
    data = b"\xff\n" * 5000 + b'{"a": 1}\n' + b"plain\n" * 10 + b"{bad\n" + b"[1]\n" \
        + b'{"b": "' + b"x" * 100 + b'"}\n' + b'{"cut'
    lines = JsonLines(data, max_line_bytes=50)
    assert list(lines) == [{"a": 1}, None, None, None]   # the long line: None, never decoded
    assert parses.calls == ['{"a": 1}', "{bad", '{"cut'] and lines.lines == 5015
    assert lines.last() is None
    cut = JsonLines(data, cut=True)    # at the cap: the text after the last line break is no line
    assert cut.lines == 5014 and cut.last() == {"b": "x" * 100}
    assert [v for v in cut if v is not None] == [{"a": 1}, {"b": "x" * 100}]


def test_json_lines_parse_only_lines_that_start_as_records_do_within_a_budget(monkeypatch):
    """A line that starts with "{" but not as the runner's records do is passed over unparsed;
    the lines that do are parsed up to a budget, then only the last line (the summary)."""
    from codeworld.sandbox.output import JsonLines
    parses = _Parses(monkeypatch)
    data = (b"{\n" * 5000 + b'{"r": 1}\n' + b'{"rx": 0}\n' + b'{"s": 0}\n' + b'{"r": \n' * 3
            + b'{"r": 2}\n' + b'{"s": 9}\n')
    lines = JsonLines(data, starts=(b'{"r": ', b'{"s": '))
    assert list(lines) == [{"r": 1}, {"s": 0}, None, None, None, {"r": 2}, {"s": 9}]
    assert lines.lines == 5008 and len(parses.calls) == 7
    parses.calls.clear()
    assert list(lines.read(3, last_starts=(b'{"s": ',))) == [{"r": 1}, {"s": 0}, None, {"s": 9}]
    assert len(parses.calls) == 4
    assert list(lines.read(3)) == [{"r": 1}, {"s": 0}, None]
    assert list(lines.read(3, last_starts=(b'{"r": ',))) == [{"r": 1}, {"s": 0}, None, None]
    assert list(JsonLines(b'{"r": 1}', starts=(b'{"r": ',))) == [{"r": 1}]   # the first line
    assert list(JsonLines(b'{"r": 1}\n{"r', cut=True, starts=(b'{"r": ',))) == [{"r": 1}]
    with pytest.raises(ValueError, match="starts"):
        JsonLines(b"", starts=(b"",))


def test_repo_traces_reads_its_output_lazily_and_parses_no_more_than_its_cap(monkeypatch,
                                                                               tmp_path):
    import stages.repo_traces as rt
    tree = tmp_path / "r"
    (tree / "pkg").mkdir(parents=True)
    (tree / "pkg" / "__init__.py").write_text("")
    rec = (b'{"test": "t.T.test_a", "seq": %d, "status": "invalid", "trace": null, '
           b'"module": "pkg", "function": "f"}\n')
    summary = b'{"summary": {"tests_run": 1}}\n'
    junk_braces = rt.READ_SLACK + 500
    # "{" lines do not crowd out the record after them; lines that start as records do do,
    # past the parse budget
    forged = rt.READ_SLACK + 500
    out = (rec % 0 + b"\xff\n" * 20000 + b"{\n" * junk_braces + rec % 1
           + (rt.RECORD_START + b"\n") * forged + rec % 2 + summary)
    calls = []

    def fake_run(argv, **kw):
        calls.append(kw)
        return _fake_result(out, b"E" * 100 + b"END")

    monkeypatch.setattr(rt, "run_command", fake_run)
    parses = _Parses(monkeypatch)
    records, stats = rt.trace_repository(tree, max_traces=2)
    # the runner's stderr: only its tail is kept (all that is read of it)
    assert calls[0]["stderr_tail_bytes"] == rt.STDERR_TAIL_BYTES
    # no line of the \xff flood nor of the "{" ones is parsed; of the lines that start as a
    # record, max_traces + 1 + READ_SLACK, then the last (the summary)
    assert len(parses.calls) == 2 + 1 + rt.READ_SLACK + 1
    assert all(c.startswith((rt.RECORD_START.decode(), rt.SUMMARY_START.decode()))
               for c in parses.calls)
    assert stats["completed"] and stats["tests_run"] == 1
    ids = [rt._record_id("r", None, {"test": "t.T.test_a", "seq": n, "module": "pkg",
                                      "function": "f"}) for n in range(3)]
    assert [r["id"] for r in records] == ids[:2]   # (the third: past the budget)
    # every line not taken is a bad line, parsed or not
    assert stats["bad_lines"] == 20000 + junk_braces + forged + 1
    assert stats["malformed_traces"] == 0


M1 = {"id": "m1", "file": "pkg/mod.py", "source": "", "tests": None}   # a mutant to run


def test_agent_runs_read_their_output_lazily_and_keep_stderrs_tail(monkeypatch):
    from types import SimpleNamespace
    import stages.agent.envs as envs
    out = (b"\xff\n" * 20000 + b'{"test": "t::a", "outcome": "pass"}\n'
           + b'{"mutant": "m1", "outcomes": {}, "messages": {}}\n' + b'{"summary": {"exit": 0}}\n')
    calls = []

    def fake_run(argv, **kw):
        calls.append(kw)
        return _fake_result(out)

    monkeypatch.setattr(envs, "run_command", fake_run)
    parses = _Parses(monkeypatch)
    env = SimpleNamespace(pythonpath="/work", sys_path=["/work"], pkg_files=[])
    run = envs.run_tests(Path("/nonexistent"), env)
    assert run.outcomes == {"t::a": "pass"} and run.summary == {"exit": 0}
    assert list(envs.run_mutants(Path("/nonexistent"), env, [M1], timeout=1, wall_seconds=1)) \
        == ["m1"]
    assert [kw["stderr_tail_bytes"] for kw in calls] == [envs.STDERR_TAIL_BYTES] * 2
    # of each run, the lines that start as its records do (a test run: its record and
    # summary; a mutants run: its mutant), none of the flood
    assert len(parses.calls) == 2 + 1


def test_agent_runs_parse_within_a_budget_and_keep_records_after_junk(monkeypatch):
    """A test run's output: "{" junk before the records is passed over unparsed (8M such
    lines, the 16 MiB cap, took the host 53 s to parse: bench/junk_output.py --stage agent);
    lines that start as records do are parsed up to READ_BUDGET, then only the summary."""
    from types import SimpleNamespace
    import stages.agent.envs as envs
    record = b'{"test": "t::%d", "outcome": "pass"}\n'
    out = (b"{\n" * 50000 + record % 1 + (envs.TEST_START + b"\n") * 20 + record % 2
           + b'{"summary": {"exit": 0}}\n')
    monkeypatch.setattr(envs, "run_command", lambda argv, **kw: _fake_result(out))
    monkeypatch.setattr(envs, "READ_BUDGET", 10)
    parses = _Parses(monkeypatch)
    env = SimpleNamespace(pythonpath="/work", sys_path=["/work"], pkg_files=[])
    run = envs.run_tests(Path("/nonexistent"), env)
    assert run.outcomes == {"t::1": "pass"} and run.summary == {"exit": 0}
    assert len(parses.calls) == 10 + 1
    mutants = b"{\n" * 50000 + b'{"mutant": "m1", "outcomes": {}, "messages": {}}\n'
    monkeypatch.setattr(envs, "run_command", lambda argv, **kw: _fake_result(mutants))
    parses.calls.clear()
    assert list(envs.run_mutants(Path("/nonexistent"), env, [M1], timeout=1,
                                 wall_seconds=1)) == ["m1"]
    assert len(parses.calls) == 1


def test_a_suite_flooding_the_runners_output_leaves_its_records_and_summary(tmp_path):
    """The same in the sandbox: after a test traced, the next writes junk lines to the
    runner's stdout pipe (more "{" lines than are parsed) and to stderr; the record before and
    the summary after them are still taken."""
    from stages.repo_traces import READ_SLACK, trace_repository
    tree = tmp_path / "flood"
    (tree / "fpkg").mkdir(parents=True)
    (tree / "fpkg" / "__init__.py").write_text("def one():\n    return 1\n")
    (tree / "test_flood.py").write_text(textwrap.dedent(f"""\
        import os, stat, sys, unittest
        import fpkg

        class T(unittest.TestCase):
            def test_a(self):
                self.assertEqual(fpkg.one(), 1)

            def test_b(self):
                sys.stderr.write("e" * 100000)
                err = os.fstat(2).st_ino
                for fd in range(3, 64):
                    try:
                        st = os.fstat(fd)
                    except OSError:
                        continue
                    if stat.S_ISFIFO(st.st_mode) and st.st_ino != err:
                        os.write(fd, b"\\xff\\n" * 100000 + b"{{\\n" * {READ_SLACK + 100})
        """))
    for p in [tmp_path, *tmp_path.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    records, stats = trace_repository(tree, max_traces=10)
    assert stats["completed"] and stats["tests_run"] == 2, stats
    assert [(r["function"], r["status"]) for r in records] == [("one", "ok")]
    assert stats["bad_lines"] == 100000 + READ_SLACK + 100


def test_a_record_line_of_another_shape_is_a_bad_line_not_a_crash(monkeypatch, tmp_path):
    """A line the suite forges with the record's keys but other values (a missing module, an
    int error) was kept: trace_repository raised KeyError building its id, and the traces
    stage (error.split, HARNESS_PATH in result) would have on others; a summary of other
    types raised in len(functions_seen), or in the traces stage's int(tests_run)."""
    import stages.repo_traces as rt
    tree = tmp_path / "r"
    (tree / "pkg").mkdir(parents=True)
    (tree / "pkg" / "__init__.py").write_text("")
    good = {"test": "t.T.test_a", "seq": 0, "status": "invalid", "trace": None, "module": "pkg",
            "function": "f", "result": None, "error": "untraceable: x", "events": 0}
    forged = [{k: v for k, v in good.items() if k != "module"}, {**good, "function": 7},
              {**good, "error": 5}, {**good, "result": 5}, {**good, "events": "many"},
              {**good, "module": None}]
    # and summaries (the runner's comes first here; one written later replaced it)
    summaries = [{"summary": {"tests_run": 1, "tests_untraced": {"clock": 1},
                              "functions_seen": ["pkg.f"], "load_errors": []}},
                 {"summary": {"functions_seen": 5}}, {"summary": {"tests_run": "many"}},
                 {"summary": {"tests_untraced": ["clock"]}},
                 {"summary": {"tests_untraced": {"clock": "1"}}}, {"summary": {"load_errors": 3}}]
    out = b"".join(json.dumps(r).encode() + b"\n" for r in [good, *forged, *summaries])
    monkeypatch.setattr(rt, "run_command", lambda argv, **kw: _fake_result(out))
    records, stats = rt.trace_repository(tree, max_traces=10)
    assert [(r["module"], r["function"], r["error"]) for r in records] == \
        [("pkg", "f", "untraceable: x")]
    assert stats["bad_lines"] == len(forged) + len(summaries) - 1 and stats["completed"]
    assert (stats["tests_run"], stats["tests_untraced"], stats["functions_seen"]) == \
        (1, {"clock": 1}, 1)
