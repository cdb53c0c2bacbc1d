"""Agent stage, labels of a bug through the sandbox on toy repositories: a test skipped on the
buggy tree is no FAIL_TO_PASS, one mutant's leftovers do not label the next, problem
statements are reproducible and name the agent's paths, an interrupted suite is no valid
environment."""
from __future__ import annotations

import os
import shutil

import pytest

from stages.agent.validate import baseline, reward_check
from tests.test_agent_validity import _check, _env, _mutant

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None and not os.environ.get("CI"),
                                reason="bubblewrap not installed")

SKIPPING = "def has_feature():\n    return True\n\n\ndef double(x):\n    return x * 2\n"
SKIPPING_TESTS = '''\
import pytest
from pkg.core import double, has_feature


def test_feature():
    if not has_feature():
        pytest.skip("feature off")
    assert double(1) == 2


def test_double():
    assert double(2) == 4
'''


def test_a_test_skipped_on_the_buggy_tree_is_not_fail_to_pass(tmp_path):
    env = _env(tmp_path / "skip", "skip", "core", SKIPPING, SKIPPING_TESTS)
    tasks, stats = _check(env, "pkg/core.py", [_mutant(SKIPPING, "change_literal", "return False")])
    assert tasks == [] and stats["rejected"] == {"no_fail_to_pass": 1}, stats


CACHING = '''\
import json
import os

CACHE = os.path.join(os.path.expanduser("~"), ".pkg-cache.json")


def compute(x):
    try:
        with open(CACHE) as f:
            memo = json.load(f)
    except (OSError, ValueError):
        memo = {}
    if str(x) in memo:
        return memo[str(x)]
    r = x * 2
    memo[str(x)] = r
    with open(CACHE, "w") as f:
        json.dump(memo, f)
    return r


def other(x):
    return x + 1


def triple(x):
    return 3 * x
'''
CACHING_TESTS = '''\
from pkg.core import compute, other, triple


def test_compute():
    assert compute(3) == 6


def test_other():
    assert other(1) == 2


def test_triple():
    assert triple(2) == 6
'''


def test_a_mutants_leftovers_do_not_label_the_next_one(tmp_path):
    # the first mutant's run writes a wrong cache into the home folder: the second (in another
    # function) saw test_compute fail too when they shared it
    env = _env(tmp_path / "leak", "leak", "core", CACHING, CACHING_TESTS)
    t = "tests/test_core.py::"
    tasks, stats = _check(env, "pkg/core.py", [_mutant(CACHING, "change_arith", "r = x / 2"),
                                               _mutant(CACHING, "change_arith", "return x - 1")])
    labels = {task["line"]: (task["FAIL_TO_PASS"], task["PASS_TO_PASS"]) for task in tasks}
    assert labels[23] == ([t + "test_other"], [t + "test_compute", t + "test_triple"]), stats
    # labels the buggy tree does not give when run alone are refused, though its reward is 0
    task = next(task for task in tasks if task["line"] == 23)
    wrong = {**task, "FAIL_TO_PASS": [t + "test_compute", t + "test_other"],
             "PASS_TO_PASS": [t + "test_triple"]}
    assert reward_check(task, env, wall_seconds=60) is None
    assert reward_check(wrong, env, wall_seconds=60) == "reward_check_buggy_labels"


OBJECTS = '''\
import os


class Box:
    def __init__(self, v):
        self.v = v


def make(v):
    if v > 0:
        return Box(v)
    return None


def data_file():
    return os.path.join(os.path.dirname(__file__), "data.txt")
'''
OBJECTS_TESTS = '''\
import os

from pkg.core import data_file, make


def test_make_none():
    assert make(0) is None


def test_make_box():
    assert make(-1) is None, make(-1)


def test_data_file():
    assert os.path.basename(data_file()) == "data.txt", data_file()
'''


def test_problem_statements_are_reproducible_and_name_the_agents_paths(tmp_path):
    env = _env(tmp_path / "objs", "objs", "core", OBJECTS, OBJECTS_TESTS)
    flip = _mutant(OBJECTS, "flip_comparison", "if v >= 0:")
    statements = {_check(env, "pkg/core.py", [flip])[0][0]["problem_statement"] for _ in range(2)}
    assert len(statements) == 1 and "0x?" in statements.pop()   # the Box's address masked
    swap = _mutant(OBJECTS, "swap_arguments",
                   'return os.path.join("data.txt", os.path.dirname(__file__))')
    text = _check(env, "pkg/core.py", [swap])[0][0]["problem_statement"]
    assert "/work/pkg" in text and "/tmp/w" not in text, text


def test_a_suite_that_stops_half_way_is_no_valid_environment(tmp_path):
    tests = ("from pkg.core import inc\n\n\ndef test_a():\n    assert inc(1) == 2\n\n\n"
             "def test_b():\n    raise KeyboardInterrupt\n\n\n"
             "def test_c():\n    assert inc(2) == 3\n")
    env = _env(tmp_path / "stop", "stop", "core", "def inc(x):\n    return x + 1\n", tests)
    validation, base = baseline(env, 60)
    assert not validation["valid"] and "exit status 2" in validation["reason"], validation
    assert base.outcomes["tests/test_core.py::test_b"] == "error"   # its call never reported


UNSTABLE_TESTS = '''\
import sys

from pkg.core import double, inc


def test_double():
    assert double(2) == 4


def test_inc():
    assert inc(1) == 2


def test_inc_traced():
    # passes in the coverage run only (its tracer is on): an outcome that changes run to run
    assert inc(2) == 3 and sys.gettrace() is not None
'''


def test_a_test_whose_outcome_changes_between_runs_is_never_a_label(tmp_path):
    """A flaky test in FAIL_TO_PASS or PASS_TO_PASS makes a task that the right fix passes
    only sometimes: the baseline runs the suite more than once and sets such tests aside."""
    src = "def double(x):\n    return x * 2\n\n\ndef inc(x):\n    return x + 1\n"
    env = _env(tmp_path / "unstable", "unstable", "core", src, UNSTABLE_TESTS)
    validation, _ = baseline(env, 60)
    t = "tests/test_core.py::"
    assert validation["valid"] and validation["flaky"] == [t + "test_inc_traced"], validation
    tasks, stats = _check(env, "pkg/core.py", [_mutant(src, "change_arith", "return x / 2")])
    assert len(tasks) == 1, stats
    assert tasks[0]["FAIL_TO_PASS"] == [t + "test_double"]
    assert tasks[0]["PASS_TO_PASS"] == [t + "test_inc"]
    assert reward_check(tasks[0], env, wall_seconds=60) is None
