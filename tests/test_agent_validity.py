"""Agent stage, bug validity through the sandbox on toy repositories built here: the
PASS_TO_PASS tests are measured on the buggy tree (not assumed), the reward runs the hidden
tests in the suite's order and gives the original tree 1.0, and a task's stored offsets are
applied only to the file they were taken from."""
from __future__ import annotations

import hashlib
import os
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from stages.agent.envs import build_env
from stages.agent.mutate import mutations, read_source
from stages.agent.reward import TreeMismatch, materialise
from stages.agent.validate import baseline, check_mutants, coverage_map, reward_check

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None and not os.environ.get("CI"),
                                reason="bubblewrap not installed")

# a table built at import time by a function, and a cached function: a mutation of either
# shows in tests that never execute the mutated line while they run
CACHED = '''\
import functools


def build(n):
    out = {}
    for k in range(n):
        out[k] = k * 2
    return out


TABLE = build(4)


def lookup(k):
    return TABLE[k]


@functools.lru_cache(maxsize=None)
def scale():
    factor = 3
    return factor


def apply(x):
    return x * scale()
'''
CACHED_TESTS = '''\
from pkg.mod import apply, build, lookup


def test_a_build():
    assert build(3) == {0: 0, 1: 2, 2: 4}


def test_b_lookup():
    assert lookup(3) == 6


def test_c_apply_first():
    assert apply(2) == 6


def test_d_apply_second():
    assert apply(5) == 15
'''

# the second test needs the first one's side effect, and sorts before it
ORDERED = '''\
REGISTRY = {}


def register(name):
    REGISTRY[name] = len(name)


def lookup(name):
    return REGISTRY[name]


def double(x):
    return x * 2
'''
ORDERED_TESTS = '''\
from pkg.core import double, lookup, register


def test_register():
    register("abc")


def test_a_lookup_after_register():
    assert lookup("abc") == 3


def test_double():
    assert double(4) == 8
'''


def _env(root: Path, name: str, module: str, source: str, tests: str):
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / f"{module}.py").write_text(source)
    (root / "tests").mkdir()
    (root / "tests" / f"test_{module}.py").write_text(tests)
    repo = SimpleNamespace(name=name, path=str(root), version=None, sha256=None, commit=None)
    return build_env(repo, root.parent / f"{name}-cache")


def _mutant(source: str, operator: str, line_text: str):
    return next(m for m in mutations(source) if m.operator == operator
                and m.apply(source).splitlines()[m.line - 1].strip() == line_text)


def _check(env, file: str, muts):
    """check_mutants on hand-picked mutants, as the stage runs it: (tasks, stats)."""
    validation, base = baseline(env, 60)
    assert validation["valid"], validation
    stats = {"tried": Counter(), "kept": Counter(), "rejected": Counter()}
    source = read_source(env.tree / file)   # as the stage reads it
    tasks = check_mutants(env, base, coverage_map(base), {file: source},
                          [(file, m) for m in muts], seed=0, max_tasks=len(muts),
                          batch=len(muts), mutant_timeout=30, wall_seconds=60, stats=stats)
    return tasks, stats


def test_pass_to_pass_is_measured_on_the_buggy_tree(tmp_path):
    env = _env(tmp_path / "cached", "cached", "mod", CACHED, CACHED_TESTS)
    t = "tests/test_mod.py::"
    muts = [_mutant(CACHED, "change_arith", "out[k] = k / 2"),   # TABLE is built with it
            _mutant(CACHED, "off_by_one", "factor = 4")]         # the first call caches it
    tasks, stats = _check(env, "pkg/mod.py", muts)
    by_line = {task["line"]: task for task in tasks}
    assert sorted(by_line) == [7, 20], stats
    # only test_a_build runs line 7 while it runs, and only test_c_apply_first line 20; the
    # tests that see the bug through the table or the cache fail on the buggy tree too
    assert by_line[7]["FAIL_TO_PASS"] == [t + "test_a_build", t + "test_b_lookup"]
    assert by_line[7]["PASS_TO_PASS"] == [t + "test_c_apply_first", t + "test_d_apply_second"]
    assert by_line[20]["FAIL_TO_PASS"] == [t + "test_c_apply_first", t + "test_d_apply_second"]
    assert by_line[20]["PASS_TO_PASS"] == [t + "test_a_build", t + "test_b_lookup"]
    assert stats["kept"] == {"change_arith": 1, "off_by_one": 1}


def test_hidden_tests_run_in_the_suites_order_and_the_reward_is_checked(tmp_path):
    env = _env(tmp_path / "ordered", "ordered", "core", ORDERED, ORDERED_TESTS)
    t = "tests/test_core.py::"
    tasks, stats = _check(env, "pkg/core.py", [_mutant(ORDERED, "change_arith", "return x / 2")])
    assert len(tasks) == 1, stats
    task = tasks[0]
    assert task["test_order"] == [t + "test_register", t + "test_a_lookup_after_register",
                                    t + "test_double"]
    assert task["PASS_TO_PASS"] == [t + "test_a_lookup_after_register", t + "test_register"]
    # the reward gives the original tree 1 and the buggy one 0 (the check kept the task)
    assert reward_check(task, env, wall_seconds=60) is None
    # run in another order the lookup fails on the original tree: such a task is dropped
    shuffled = {**task, "test_order": sorted(task["test_order"])}
    assert reward_check(shuffled, env, wall_seconds=60) == "reward_check_original_not_1"


def test_a_task_is_materialised_only_on_its_own_tree(tmp_path):
    env = _env(tmp_path / "ordered", "ordered", "core", ORDERED, ORDERED_TESTS)
    m = _mutant(ORDERED, "change_arith", "return x / 2")
    task = {"id": "t1", "file": "pkg/core.py", "operator": m.operator, "line": m.line,
            "mutation": {"start": m.start, "end": m.end, "replacement": m.replacement,
                         "file_sha256": hashlib.sha256(ORDERED.encode()).hexdigest()}}
    buggy = materialise(task, env, tmp_path / "buggy")
    assert "return x / 2" in (buggy / "pkg/core.py").read_text()
    # the same name, another version of the file: the offsets would land elsewhere
    (env.tree / "pkg/core.py").write_text("# v2\n" + ORDERED)
    with pytest.raises(TreeMismatch, match="not the file the bug was made in"):
        materialise(task, env, tmp_path / "buggy2")
    assert not (tmp_path / "buggy2").exists()


def test_a_crlf_file_keeps_its_line_ends_in_the_buggy_tree(tmp_path):
    crlf = ORDERED.replace("\n", "\r\n")
    env = _env(tmp_path / "crlf", "crlf", "core", crlf, ORDERED_TESTS)
    assert (env.tree / "pkg/core.py").read_bytes() == crlf.encode()
    m = _mutant(crlf, "change_arith", "return x / 2")
    tasks, stats = _check(env, "pkg/core.py", [m])
    assert len(tasks) == 1, stats
    buggy = materialise(tasks[0], env, tmp_path / "buggy")
    # the buggy file is the original with the one span replaced: every CRLF kept
    assert (buggy / "pkg/core.py").read_bytes() == m.apply(crlf).encode()
    assert m.apply(crlf).count("\r\n") == crlf.count("\r\n")


def test_file_tools_keep_bytes_and_cut_output_says_so(tmp_path):
    from stages.agent.tools import ToolCall, execute, format_edit

    env = _env(tmp_path / "ordered", "ordered", "core", ORDERED, ORDERED_TESTS)
    work = tmp_path / "work"
    shutil.copytree(env.tree, work)
    (work / "crlf.py").write_bytes(b"a = 1\r\nb = 2\r\n")
    (work / "aaa.txt").write_text("aaa\n")

    def run(name, body):
        return execute(ToolCall(name, body), work, env, wall_seconds=30)

    # the line break before </tool> ends the file's last line (the call syntax takes it)
    assert run("create", "one.py\nprint(1)") == "created one.py (1 line)"
    assert (work / "one.py").read_text() == "print(1)\n"
    assert run("edit", format_edit("crlf.py", "a = 1", "a = 3")).startswith("edited crlf.py")
    assert (work / "crlf.py").read_bytes() == b"a = 3\r\nb = 2\r\n"  # CRLF kept
    # "aa" starts twice in "aaa": not unique
    assert "found 2 times" in run("edit", format_edit("aaa.txt", "aa", "b"))
    assert (work / "aaa.txt").read_text() == "aaa\n"
    out = run("bash", "head -c 1100000 /dev/zero | tr '\\0' a; echo; echo END")
    assert "END" not in out and "[output cut: the command wrote more than 1 MiB" in out
    assert out.endswith("[exit code 0]")


def test_an_edit_written_with_lf_line_ends_applies_to_a_crlf_file(tmp_path):
    """An observation's lines reach an agent without their \r (the scripted policy splits
    them, a model writes \n): a SEARCH block of several lines must still find them in a
    CRLF file, and the edit keep the file's CRLF."""
    from stages.agent.tools import ToolCall, execute, format_edit

    env = _env(tmp_path / "ordered", "ordered", "core", ORDERED, ORDERED_TESTS)
    work = tmp_path / "work"
    shutil.copytree(env.tree, work)
    (work / "crlf.py").write_bytes(b"def g():\r\n    a = 1\r\n    return a\r\n")

    def run(name, body):
        return execute(ToolCall(name, body), work, env, wall_seconds=30)

    out = run("edit", format_edit("crlf.py", "    a = 1\n    return a", "    a = 2\n    b = a\n    return b"))
    assert out == "edited crlf.py: replaced lines 2-3", out
    assert (work / "crlf.py").read_bytes() == b"def g():\r\n    a = 2\r\n    b = a\r\n    return b\r\n"
    # an exact match (its \r typed) is taken as it is; text that is not there is still not found
    assert run("edit", format_edit("crlf.py", "a = 2\r\n    b = a", "a = 3\r\n    b = a")).startswith("edited")
    assert (work / "crlf.py").read_bytes() == b"def g():\r\n    a = 3\r\n    b = a\r\n    return b\r\n"
    assert "not found" in run("edit", format_edit("crlf.py", "a = 3\n    c = a", "x"))


def test_file_tools_refuse_paths_outside_the_copy_and_name_the_lines_replaced(tmp_path):
    """A file written outside /work (the sandbox's /tmp) is gone after the call: saying
    "created" there misleads the agent. And a SEARCH text that ends with its line's end
    replaces that line only."""
    from stages.agent.tools import ToolCall, execute, format_edit

    env = _env(tmp_path / "ordered", "ordered", "core", ORDERED, ORDERED_TESTS)
    work = tmp_path / "work"
    shutil.copytree(env.tree, work)

    def run(name, body):
        return execute(ToolCall(name, body), work, env, wall_seconds=30)

    for path in ("/tmp/helper.py", "../helper.py", "/work/../tmp/helper.py"):
        out = run("create", f"{path}\nprint(1)")
        assert out.startswith(f"error: {path}: outside the working copy"), out
        out = run("edit", format_edit(path, "a", "b"))
        assert out.startswith(f"error: {path}: outside the working copy"), out
    assert run("create", "sub/helper.py\nprint(1)") == "created sub/helper.py (1 line)"
    (work / "three.py").write_text("a = 1\nb = 2\nc = 3\n")
    assert run("edit", format_edit("three.py", "b = 2\n", "")) == "edited three.py: replaced lines 2-2"
    assert run("edit", format_edit("three.py", "a = 1\nc = 3", "x")) == "edited three.py: replaced lines 1-2"
    assert (work / "three.py").read_text() == "x\n"


def test_an_edit_copied_from_an_observation_with_a_masked_address_applies(tmp_path):
    """cat shows an address in a file's text as 0x? (observations mask them): a SEARCH text
    copied from it must still find the line, and the file keep its own address."""
    from stages.agent.tools import ToolCall, execute, format_edit

    env = _env(tmp_path / "ordered", "ordered", "core", ORDERED, ORDERED_TESTS)
    work = tmp_path / "work"
    shutil.copytree(env.tree, work)
    (work / "box.py").write_text('def make():\n    """>>> make()\n    <box.Box object at 0x7f3a2b1c9d40>\n'
                                 '    """\n    return Box()\n')

    def run(name, body):
        return execute(ToolCall(name, body), work, env, wall_seconds=30)

    seen = run("bash", "cat box.py").splitlines()
    assert seen[2] == "    <box.Box object at 0x?>"
    out = run("edit", format_edit("box.py", "\n".join(seen[1:3]), ">>> make()  # a Box\n" + seen[2]))
    assert out == "edited box.py: replaced lines 2-3", out
    assert (work / "box.py").read_text().splitlines()[1:3] == [
        ">>> make()  # a Box", "    <box.Box object at 0x7f3a2b1c9d40>"]


# a suite whose pytest config collects files not named test_*: its tests live in check_mod.py
CHECKED = '''\
def double(x):
    return x * 2


def inc(x):
    return x + 1
'''
CHECKED_TESTS = '''\
from pkg.mod import double, inc


def test_double():
    assert double(4) == 8


def test_inc():
    assert inc(1) == 2
'''


def _checked_env(root: Path):
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "mod.py").write_text(CHECKED)
    (root / "check_mod.py").write_text(CHECKED_TESTS)
    (root / "pytest.ini").write_text("[pytest]\npython_files = check_*.py\n")
    repo = SimpleNamespace(name="checked", path=str(root), version=None, sha256=None, commit=None)
    env = build_env(repo, root.parent / "checked-cache")
    assert "check_mod.py" in env.pkg_files   # by its name alone it looks like package code
    return env


def test_files_of_collected_tests_are_never_mutated(tmp_path, monkeypatch):
    from stages.agent import validate

    env = _checked_env(tmp_path / "checked")
    seen = {}

    def check_mutants(env, base, covering, sources, picked, **kwargs):
        seen.update(env=env, sources=set(sources), picked={f for f, _ in picked})
        return []
    monkeypatch.setattr(validate, "check_mutants", check_mutants)
    syn = validate.synthesize(env, seed=0, max_mutants=50, max_tasks=1, batch=4,
                              mutant_timeout=30, wall_seconds=60)
    assert syn.stats["validation"]["valid"] and syn.stats["validation"]["tests"] == 2, syn.stats
    assert seen["sources"] == {"pkg/mod.py"} == seen["picked"], seen
    # the environment the episodes and the reward get: check_mod.py is a test file there
    assert syn.env is seen["env"] and "check_mod.py" not in syn.env.pkg_files
    assert "check_mod.py" in syn.env.test_files and "pkg/mod.py" in syn.env.pkg_files


def test_a_suite_with_its_own_test_function_names_gets_its_bugs_checked(tmp_path):
    """pytest.ini's python_functions = check_*: the reward's canary functions (test_*) must
    still run, else every bug of such a project is rejected reward_check_original_not_1."""
    root = tmp_path / "named"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "mod.py").write_text(CHECKED)
    (root / "tests").mkdir()
    (root / "tests" / "test_mod.py").write_text(CHECKED_TESTS.replace("def test_", "def check_"))
    (root / "pytest.ini").write_text("[pytest]\npython_functions = check_*\n")
    env = build_env(SimpleNamespace(name="named", path=str(root), version=None, sha256=None,
                                    commit=None), tmp_path / "named-cache")
    tasks, stats = _check(env, "pkg/mod.py", [_mutant(CHECKED, "change_arith", "return x / 2")])
    assert len(tasks) == 1 and not stats["rejected"], stats
    assert tasks[0]["FAIL_TO_PASS"] == ["tests/test_mod.py::check_double"]


def test_the_agent_cannot_rewrite_a_hidden_test_of_any_name(tmp_path):
    from stages.agent.reward import evaluate

    env = _checked_env(tmp_path / "checked")
    tasks, stats = _check(env, "pkg/mod.py", [_mutant(CHECKED, "change_arith", "return x / 2")])
    assert len(tasks) == 1, stats
    task = tasks[0]
    assert task["FAIL_TO_PASS"] == ["check_mod.py::test_double"]
    buggy = materialise(task, env, tmp_path / "buggy")
    work = tmp_path / "work"
    shutil.copytree(buggy, work)
    # the failing test rewritten to pass, the bug left in: nothing earned, with the stage's
    # environment (after the baseline run) and with one built from the names alone (RL's)
    (work / "check_mod.py").write_text("def test_double():\n    pass\n\n\ndef test_inc():\n"
                                       "    pass\n")
    assert evaluate(task, env, buggy, work, wall_seconds=60)["reward"] == 0.0
    from stages.agent.envs import with_collected_tests

    _, base = baseline(env, 60)
    staged = with_collected_tests(env, base.outcomes)
    assert evaluate(task, staged, buggy, work, wall_seconds=60)["reward"] == 0.0
    # the package file is still the agent's to fix
    (work / "pkg" / "mod.py").write_text(CHECKED)
    assert evaluate(task, env, buggy, work, wall_seconds=60)["reward"] == 1.0


# each run of the test finds what it finds, then leaves a daemon (setsid, double-forked: out
# of the run's process group), a file in the working copy and one in /tmp
LEAVES = "def add(a, b):\n    return a + b\n"
LEAVES_TESTS = '''\
import os
import time

from pkg.mod import add


def _strangers():
    """The sandbox's processes that are neither this one nor one of its ancestors."""
    mine, pid = set(), os.getpid()
    while pid:
        mine.add(pid)
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in mine)


def test_add():
    found = [_strangers(), os.path.exists("pkg/left.txt"), os.path.exists("/tmp/left.txt")]
    open("pkg/left.txt", "w").close()
    open("/tmp/left.txt", "w").close()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.closerange(0, 1024)
            while True:
                time.sleep(1)
        os._exit(0)
    os.wait()
    assert add(1, 2) == 3
    assert found == [[], False, False]
'''


def test_a_mutants_run_starts_with_nothing_left_by_the_one_before(tmp_path):
    """Mutants run one after the other in one sandbox, on one working copy (/tmp/w). A daemon
    of one mutant's tests lived on (only the run's process group was killed) and the working
    copy kept what the tests wrote (only the mutated file was put back): "mutants" identical
    to the original passed, then failed (2026 audit: a daemon rewriting the package). Every
    process a run left is now killed, and the next run gets a fresh copy and /tmp."""
    from stages.agent.envs import run_mutants

    env = _env(tmp_path / "leaves", "leaves", "mod", LEAVES, LEAVES_TESTS)
    reqs = [{"id": str(i), "file": "pkg/mod.py", "source": LEAVES,
             "tests": ["tests/test_mod.py::test_add"]} for i in range(3)]
    res = run_mutants(env.tree, env, reqs, timeout=30, wall_seconds=120)
    assert {k: (v["status"], v["outcomes"], v["messages"]) for k, v in res.items()} == {
        str(i): ("ok", {"tests/test_mod.py::test_add": "pass"}, {}) for i in range(3)}


HOLDS_TESTS = '''\
import os
import time

from pkg.mod import HOLD


def test_hold():
    if HOLD and os.fork() == 0:   # a daemon that keeps the run's stdout and stderr open
        os.setsid()
        if os.fork() == 0:
            while True:
                time.sleep(1)
        os._exit(0)
'''


def test_a_daemon_holding_a_runs_output_times_out_that_mutant_only(tmp_path):
    """The run's output never ends while a process that left its group holds the pipes: that
    mutant times out, and the rest go on (after the timeout, reading the rest of its output
    waited for the daemon: the whole sandbox ran to its wall clock, every mutant lost)."""
    from stages.agent.envs import run_mutants

    env = _env(tmp_path / "holds", "holds", "mod", "HOLD = False\n", HOLDS_TESTS)
    reqs = [{"id": str(i), "file": "pkg/mod.py", "source": f"HOLD = {hold}\n",
             "tests": ["tests/test_mod.py::test_hold"]} for i, hold in enumerate([True, False])]
    res = run_mutants(env.tree, env, reqs, timeout=3, wall_seconds=30)
    assert {k: (v["status"], v["outcomes"]) for k, v in res.items()} == {
        "0": ("timeout", {}), "1": ("ok", {"tests/test_mod.py::test_hold": "pass"})}


ORPHANS_TESTS = '''\
import subprocess


def test_background_jobs():
    for _ in range(48):   # each an orphan once its shell exits; the sandbox allows 32 processes
        subprocess.run(["sh", "-c", "true &"], check=True)
'''


def test_orphans_of_a_mutants_run_are_reaped_as_they_exit(tmp_path):
    """The mutants' process is a subreaper (what a run leaves stays its own, to be killed):
    the orphans it inherits are reaped as they exit, as the sandbox's pid 1 reaps them in a
    plain run; zombies would count against the sandbox's process limit (max_processes 32)."""
    from stages.agent.envs import run_mutants

    env = _env(tmp_path / "orphans", "orphans", "mod", "X = 1\n", ORPHANS_TESTS)
    res = run_mutants(env.tree, env, [{"id": "0", "file": "pkg/mod.py", "source": "X = 2\n",
                                       "tests": None}], timeout=30, wall_seconds=60)
    assert res["0"]["outcomes"] == {"tests/test_mod.py::test_background_jobs": "pass"}, res


SIGNALS_TESTS = '''\
import os

from pkg.mod import SIG


def test_signal_the_parent():
    if SIG:   # the parent: the mutants' runner (the same uid as the tests)
        os.kill(os.getppid(), SIG)
'''


def test_a_mutant_whose_tests_signal_the_runner_costs_that_mutant_only(tmp_path):
    """The mutants' runner (cwtest.py) runs as the tests' uid: a test could stop or kill it
    (SIGTERM, SIGKILL, SIGSTOP to its parent), and every later mutant of the batch was lost
    without a word. The runner now survives what it can catch (a mutant whose test sent
    SIGTERM runs to its end); one killed or stopped costs the mutant that ran at the time
    ("runner_killed"), and the others are run again in a fresh sandbox."""
    import signal

    from stages.agent.envs import run_mutants

    env = _env(tmp_path / "signals", "signals", "mod", "SIG = 0\n", SIGNALS_TESTS)
    sigs = [0, signal.SIGTERM, signal.SIGKILL, 0, signal.SIGSTOP, 0]
    reqs = [{"id": str(i), "file": "pkg/mod.py", "source": f"SIG = {int(sig)}\n",
             "tests": ["tests/test_mod.py::test_signal_the_parent"]} for i, sig in enumerate(sigs)]
    res = run_mutants(env.tree, env, reqs, timeout=10, wall_seconds=20)
    passed = ("ok", {"tests/test_mod.py::test_signal_the_parent": "pass"})
    assert {k: (v["status"], v["outcomes"]) for k, v in res.items()} == {
        "0": passed, "1": passed, "2": ("runner_killed", {}), "3": passed,
        "4": ("runner_killed", {}), "5": passed}, res
    assert "killed or stopped" in res["2"]["error"] and "timed out" in res["4"]["error"]
