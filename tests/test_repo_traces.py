"""Repository-level traces (stages.repo_traces): a tiny real repository's unittest suite run in
the sandbox under the tracer. The PyPI fetch needs the network: CODEWORLD_NETWORK_TESTS=1."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stages.repo_traces import DEFAULT_REPOS, fetch_pypi_sdist, repo_layout, trace_repository
from stages.tracer import TraceLimits

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None and not os.environ.get("CI"),
                                reason="bubblewrap not installed")

F = "<|frame_sep|>"
SECRET = "top-secret-4242"

CORE = '''\
def helper(x):
    return x * 2


def add(a, b):
    s = a + b
    return helper(s)


def safe_div(a, b):
    if b == 0:
        raise ZeroDivisionError("b is zero")
    return a / b


def probe_read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return "blocked"


def probe_write(path):
    try:
        with open(path, "w") as f:
            f.write("pwned")
        return "written"
    except OSError:
        return "blocked"


def gen(n):
    for i in range(n):
        yield i * 10


def str_hash(s):
    return hash(s)


class Acc:
    def __init__(self):
        self.items = []

    def push(self, x):
        self.items.append(helper(x))
        return len(self.items)
'''

TESTS = '''\
import json
import unittest

from mypkg import core

SECRET_PATH = {secret!r}


class CoreTests(unittest.TestCase):
    def test_add(self):
        self.assertEqual(core.add(1, 2), 6)

    def test_div(self):
        with self.assertRaises(ZeroDivisionError):
            core.safe_div(1, 0)
        self.assertEqual(core.safe_div(4, 2), 2.0)

    def test_div_error(self):
        core.safe_div(1, 0)  # raises: the test errors

    def test_gen(self):
        self.assertEqual(list(core.gen(3)), [0, 10, 20])

    def test_gen_abandoned(self):
        self.assertEqual(next(core.gen(3)), 0)

    def test_methods(self):
        acc = core.Acc()
        self.assertEqual(acc.push(5), 1)

    def test_sandbox(self):
        self.assertEqual(core.probe_read(SECRET_PATH), "blocked")
        self.assertEqual(core.probe_write("/work/pwned.txt"), "blocked")
        self.assertEqual(core.probe_write("/work/mypkg/core.py"), "blocked")

    def test_hash(self):
        self.assertIsInstance(core.str_hash("codeworld"), int)

    def test_stdlib_only(self):
        self.assertEqual(json.loads(json.dumps([1, 2])), [1, 2])
'''

PLAIN_TESTS = '''\
from mypkg.core import add


def test_plain_add():
    assert add(0, 1) == 2
'''


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("repo_traces")
    secret = base / "secret.txt"
    secret.write_text(SECRET)
    tree = base / "tinyrepo"
    (tree / "mypkg").mkdir(parents=True)
    (tree / "tests").mkdir()
    (tree / "mypkg" / "__init__.py").write_text("from . import core\n")
    (tree / "mypkg" / "core.py").write_text(CORE)
    (tree / "tests" / "__init__.py").write_text("")
    (tree / "tests" / "test_core.py").write_text(TESTS.format(secret=str(secret)))
    (tree / "tests" / "test_plain.py").write_text(PLAIN_TESTS)
    (tree / "setup.py").write_text("raise SystemExit('never run')\n")
    for p in [base, *base.rglob("*")]:  # the sandbox runs as an unprivileged uid
        p.chmod(0o755 if p.is_dir() else 0o644)
    return tree


@pytest.fixture(scope="module")
def traced(repo):
    return trace_repository(repo, max_traces=100, max_per_function=5)


def frames_of(text: str) -> list[str]:
    assert text.endswith(F)
    return [p + F for p in text.split(F)[:-1]]


def action(frame: str) -> str:
    return frame.split("<|action_sep|>", 1)[1].split("<|arg_sep|>")[0].removesuffix(F)


def by(records, function, test=None):
    return [r for r in records if r["function"] == function and (test is None or
                                                                  r["test"].endswith(test))]


def test_layout(repo):
    lay = repo_layout(repo)
    assert lay["pkg_files"] == ["mypkg/__init__.py", "mypkg/core.py"]
    assert lay["test_files"] == ["tests/__init__.py", "tests/test_core.py", "tests/test_plain.py"]


def test_stats(traced):
    records, stats = traced
    assert stats["completed"] and not stats["timed_out"]
    assert stats["tests_run"] == 10  # 9 unittest methods + 1 pytest-style function
    assert stats["tests_errors"] == 1 and stats["tests_failed"] == 0
    assert stats["tests_passed"] == 9
    assert stats["traces"] == len(records)
    assert sum(stats["traces_by_status"].values()) == len(records)
    # only the package's functions, never the tests' nor the standard library's
    assert {(r["module"], r["function"]) for r in records} == {
        ("mypkg.core", f) for f in ("add", "safe_div", "gen", "probe_read", "probe_write",
                                    "Acc.__init__", "Acc.push", "str_hash")}
    assert not by(records, "helper")  # only ever called by package code: nested, not a root
    assert not [r for r in records if r["test"].endswith("test_stdlib_only")]


def test_record_shape_and_frames(traced, repo):
    records, _ = traced
    pkg_lines = set((repo / "mypkg" / "core.py").read_text().splitlines(keepends=True))
    for r in records:
        assert set(r) >= {"id", "repo", "function", "test", "trace", "result", "error",
                          "status", "events", "provenance"}
        assert r["repo"] == "tinyrepo"
        assert r["provenance"] == {"repo": "tinyrepo", "version": None, "sha256": None,
                                   "generator": "repository"}
        frames = frames_of(r["trace"])
        assert len(frames) == r["events"]
        # every frame is a line of the package: no test code, no stdlib (open, json...)
        assert all(action(f) in pkg_lines for f in frames), r["function"]
        name = r["function"].split(".")[-1]
        assert frames[0].startswith("<|call_sep|>") and re.search(
            rf"<\|action_sep\|>\s*def {re.escape(name)}\(", frames[0])
        if r["status"] in ("ok", "exception"):
            assert frames[-1].startswith("<|return_sep|>" if r["status"] == "ok"
                                         else "<|exception_sep|>")
        assert " at 0x" not in r["trace"]


def test_nested_call_and_result(traced):
    records, _ = traced
    (add,) = by(records, "add", "CoreTests.test_add")
    assert add["status"] == "ok" and add["result"] == "6" and add["error"] is None
    frames = frames_of(add["trace"])
    assert frames[0] == '<|call_sep|>{"a": "1", "b": "2"}<|action_sep|>def add(a, b):\n' + F
    assert frames[1] == '<|line_sep|>{"a": "..", "b": ".."}<|action_sep|>    s = a + b\n' + F
    assert '<|call_sep|>{"x": "3"}<|action_sep|>def helper(x):\n' + F in frames
    assert frames[-1] == '<|return_sep|><|action_sep|>    return helper(s)\n<|arg_sep|>"6"' + F
    (plain,) = by(records, "add", "test_plain_add")
    assert plain["test"] == "tests.test_plain.test_plain_add" and plain["result"] == "2"


def test_exception_traces(traced):
    records, _ = traced
    div = by(records, "safe_div", "CoreTests.test_div")
    assert [r["status"] for r in div] == ["exception", "ok"]
    assert div[0]["error"] == "ZeroDivisionError: b is zero" and div[0]["result"] is None
    last = frames_of(div[0]["trace"])[-1]
    assert last == ('<|exception_sep|><|action_sep|>        raise ZeroDivisionError("b is zero")\n'
                    '<|arg_sep|>"ZeroDivisionError(\'b is zero\')"' + F)
    assert div[1]["result"] == "2.0"
    (err,) = by(records, "safe_div", "test_div_error")
    assert err["status"] == "exception"


def test_generators_and_methods(traced):
    records, _ = traced
    (g,) = by(records, "gen", "test_gen")
    assert g["status"] == "ok"
    assert g["trace"].count("<|return_sep|>") == 4  # three yields and the final return
    (abandoned,) = by(records, "gen", "test_gen_abandoned")
    assert abandoned["status"] == "invalid" and "unfinished" in abandoned["error"]
    assert abandoned["trace"].count("<|return_sep|>") == 1  # the first yield
    (push,) = by(records, "Acc.push")
    assert push["result"] == "1" and "def helper(x):" in push["trace"]
    assert '"self": "<mypkg.core.Acc object>"' in push["trace"]


def test_sandboxed(traced, repo):
    records, _ = traced
    reads = by(records, "probe_read")
    assert reads and all(r["result"] == "'blocked'" for r in reads)
    writes = by(records, "probe_write")
    assert len(writes) == 2 and all(r["result"] == "'blocked'" for r in writes)
    assert not (repo / "pwned.txt").exists()
    assert (repo / "mypkg" / "core.py").read_text() == CORE
    assert all(SECRET not in json.dumps(r) for r in records)


def test_deterministic(traced, repo):
    again = trace_repository(repo, max_traces=100, max_per_function=5)
    assert again[0] == traced[0]
    strip = lambda s: {k: v for k, v in s.items() if k != "seconds"}  # noqa: E731
    assert strip(again[1]) == strip(traced[1])
    ids = [r["id"] for r in again[0]]
    assert len(set(ids)) == len(ids)
    assert [(r["test"]) for r in again[0]] == sorted(r["test"] for r in again[0])


def test_hash_seed_fixed(traced):
    """str hashes (hence set and dict orders in the traces) are those of PYTHONHASHSEED=0."""
    (h,) = by(traced[0], "str_hash")
    want = subprocess.run([sys.executable, "-c", "print(hash('codeworld'))"], text=True,
                          capture_output=True, env={**os.environ, "PYTHONHASHSEED": "0"},
                          check=True).stdout.strip()
    assert h["result"] == want


def test_caps_and_limits(repo):
    records, stats = trace_repository(repo, max_traces=3, max_per_function=1)
    assert len(records) == 3 and stats["tests_run"] == 10
    assert len({r["function"] for r in records}) == 3
    records, _ = trace_repository(repo, max_per_function=1,
                                  limits=TraceLimits(max_events=3))
    assert {r["status"] for r in records} >= {"too_long"}
    for r in records:
        assert r["events"] <= 3
        if r["status"] == "too_long":
            assert r["result"] is None and "max_events=3" in r["error"]


def test_time_limit(tmp_path):
    tree = tmp_path / "slow"
    (tree / "slowpkg").mkdir(parents=True)
    (tree / "slowpkg" / "__init__.py").write_text(
        "def quick(x):\n    return x + 1\n\n\ndef spin():\n    while True:\n        pass\n")
    (tree / "test_slow.py").write_text(textwrap.dedent("""\
        import unittest
        import slowpkg

        class A(unittest.TestCase):
            def test_a_quick(self):
                self.assertEqual(slowpkg.quick(1), 2)

            def test_b_spin(self):
                slowpkg.spin()
        """))
    for p in [tmp_path, *tmp_path.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    records, stats = trace_repository(tree, wall_seconds=3,
                                      limits=TraceLimits(max_events=1000))
    assert not stats["completed"] and (stats["timed_out"] or stats["returncode"] != 0)
    # the trace finished before the limit is kept; the endless one is too_long, then killed
    assert [(r["function"], r["status"]) for r in records][:1] == [("quick", "ok")]


def test_lines_a_test_forges_are_not_kept_as_traces(tmp_path):
    """The suite shares the process that writes the records: a line it writes itself, on any
    descriptor, is not a trace unless it is well-formed CWM format."""
    tree = tmp_path / "forger"
    (tree / "fpkg").mkdir(parents=True)
    (tree / "fpkg" / "__init__.py").write_text("def one():\n    return 1\n")
    (tree / "test_forge.py").write_text(textwrap.dedent("""\
        import json, os, unittest
        import fpkg

        class T(unittest.TestCase):
            def test_forged(self):
                line = json.dumps({"test": "tests.test_x.T.test_forged", "seq": 0, "status": "ok",
                                   "function": "one", "module": "fpkg",
                                   "trace": "<|call_sep|>FORGED", "result": "1", "events": 1})
                for fd in range(1, 10):
                    try:
                        os.write(fd, (line + "\\n").encode())
                    except OSError:
                        pass

            def test_real(self):
                self.assertEqual(fpkg.one(), 1)
        """))
    for p in [tmp_path, *tmp_path.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    records, stats = trace_repository(tree, max_traces=10)
    assert [r["test"] for r in records] == ["test_forge.T.test_real"]
    assert "FORGED" not in json.dumps(records) and stats["malformed_traces"] >= 1


def test_traces_whose_source_spells_a_special_token_are_not_kept(tmp_path):
    """A repository line that spells a special token (a chat template's "<|user|>") would be
    read by the tokenizer as the token: that trace is dropped and counted, the others kept."""
    tree = tmp_path / "chat"
    (tree / "cpkg").mkdir(parents=True)
    (tree / "cpkg" / "__init__.py").write_text(
        "def turn(text):\n    return '<|user|>' + text\n\n"
        "def plain(x):\n    return x + 1\n")
    (tree / "test_chat.py").write_text(textwrap.dedent("""\
        import unittest
        import cpkg

        class T(unittest.TestCase):
            def test_both(self):
                self.assertEqual(cpkg.plain(1), 2)
                self.assertTrue(cpkg.turn("hi").endswith("hi"))
        """))
    for p in [tmp_path, *tmp_path.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    records, stats = trace_repository(tree, max_traces=10)
    assert [r["function"] for r in records] == ["plain"]
    assert stats["reserved_token_traces"] == 1 and "<|user|>" not in json.dumps(records)


@pytest.mark.network
@pytest.mark.skipif(os.environ.get("CODEWORLD_NETWORK_TESTS") != "1",
                    reason="needs the network (CODEWORLD_NETWORK_TESTS=1)")
def test_default_repository(tmp_path):
    pin = DEFAULT_REPOS[0]
    tree = fetch_pypi_sdist(pin.name, pin.version, pin.sha256, tmp_path / "repos")
    assert fetch_pypi_sdist(pin.name, pin.version, pin.sha256, tmp_path / "repos") == tree
    records, stats = trace_repository(tree, repo=pin.name, version=pin.version,
                                      sha256=pin.sha256, max_traces=200)
    assert stats["completed"] and stats["tests_run"] > 100
    assert stats["traces_by_status"]["ok"] > 50
    assert records[0]["provenance"] == {"repo": pin.name, "version": pin.version,
                                        "sha256": pin.sha256, "generator": "repository"}
    with pytest.raises(ValueError, match="sha256"):
        fetch_pypi_sdist(pin.name, pin.version, "0" * 64, tmp_path / "bad")


def test_tests_reading_the_clock_trace_nothing_and_count_towards_no_cap(tmp_path):
    """Values and even call counts of a test that reads the clock, sleeps, starts a thread or
    reads os.urandom may change from run to run: such a test gives no traces, and the calls
    it made leave the caps as they were (max_per_function=1 still traces test_b's add)."""
    tree = tmp_path / "clocky"
    (tree / "clk").mkdir(parents=True)
    (tree / "clk" / "__init__.py").write_text(textwrap.dedent("""\
        import os
        import threading
        import time
        from time import perf_counter


        def add(a, b):
            return a + b


        def stamp(x):
            return x, perf_counter() > 0


        def nap(x):
            time.sleep(0)
            return x


        def in_thread(x):
            t = threading.Thread(target=lambda: None)
            t.start()
            t.join()
            return x


        def salt(n):
            return len(os.urandom(n))
        """))
    (tree / "test_clk.py").write_text(textwrap.dedent("""\
        import time
        import unittest
        import clk

        class A(unittest.TestCase):
            def test_a_clock(self):
                self.assertEqual(clk.add(1, 1), 2)   # traced, then dropped with the test
                self.assertEqual(clk.stamp(3)[0], 3)

            def test_b_plain(self):
                self.assertEqual(clk.add(2, 2), 4)

            def test_c_sleep(self):
                self.assertEqual(clk.nap(5), 5)

            def test_d_thread(self):
                self.assertEqual(clk.in_thread(6), 6)

            def test_e_urandom(self):
                self.assertEqual(clk.salt(4), 4)

            def test_f_own_clock(self):
                time.monotonic()                      # the test itself reads the clock
                self.assertEqual(clk.add(7, 7), 14)
        """))
    for p in [tmp_path, *tmp_path.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    records, stats = trace_repository(tree, max_per_function=1)
    assert stats["completed"] and stats["tests_run"] == 6 and stats["tests_failed"] == 0
    assert [(r["test"].rsplit(".", 1)[1], r["function"], r["result"]) for r in records] == \
        [("test_b_plain", "add", "4")]
    assert stats["tests_untraced"] == {"clock": 2, "sleep": 1, "thread": 1, "urandom": 1}


def test_tests_see_no_tracer_and_cannot_remove_it(tmp_path):
    """The repository tracer installed sys.settrace its own way: the code under test saw it
    through sys.gettrace() (the harness, in the trace's locals) and a sys.settrace(None) ran the
    next lines untraced (a gap in a trace kept as ok). Now, as in the program tracer, gettrace()
    is None and settrace(None) removes nothing; a test installing a trace function of its own
    gives no traces (it would see the events), counted as "settrace"."""
    tree = tmp_path / "tracey"
    (tree / "trc").mkdir(parents=True)
    (tree / "trc" / "__init__.py").write_text(textwrap.dedent("""\
        import sys


        def hide(a, b):
            t = sys.gettrace()
            sys.settrace(None)
            x = a + b
            sys.settrace(t)
            return x, t is None


        def add(a, b):
            return a + b
        """))
    (tree / "test_trc.py").write_text(textwrap.dedent("""\
        import sys
        import unittest
        import trc


        class A(unittest.TestCase):
            def test_a_hide(self):
                self.assertEqual(trc.hide(1, 2)[0], 3)

            def test_b_own_tracer(self):
                sys.settrace(lambda *args: None)
                try:
                    self.assertEqual(trc.add(7, 7), 14)
                finally:
                    sys.settrace(None)

            def test_c_plain(self):
                self.assertEqual(trc.add(2, 2), 4)
        """))
    for p in [tmp_path, *tmp_path.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    records, stats = trace_repository(tree)
    assert stats["completed"] and stats["tests_run"] == 3 and stats["tests_failed"] == 0
    assert [(r["test"].rsplit(".", 1)[1], r["function"], r["result"]) for r in records] == \
        [("test_a_hide", "hide", "(3, True)"), ("test_c_plain", "add", "4")]
    hide = records[0]["trace"]
    assert "x = a + b" in hide and "sys.settrace(t)" in hide and "glob" not in hide
    assert stats["tests_untraced"] == {"settrace": 1}
