"""Reward: the task's hidden FAIL_TO_PASS and PASS_TO_PASS tests, run after submit in a fresh
copy of the buggy tree that takes only the agent's version of the *package* files (the files
that are neither tests nor build scripts). Everything else the agent changed (test files, new
conftest.py, config files, new modules, symlinks) is dropped, so editing the hidden tests, or
skipping them through pytest's configuration, cannot earn a reward. Reward is 1.0 when every
FAIL_TO_PASS and PASS_TO_PASS test passes, else 0.0. The hidden tests run in the suite's own
collection order (``task["test_order"]``), as they ran when the task was validated.

A package file is taken only where its path inside the working copy is a real file: not a
link, and under no linked folder (the host reads the working copy, and a link there could reach
any file of the host). The package code runs in the pytest process that reports the outcomes,
so it could forge them (write "pass" records itself, or patch pytest): two canary tests the
host writes for the run, one that must pass and one that must fail, go with the hidden tests;
a run where either is not reported as it must be is `tampered` and earns nothing. The
canaries run whatever names the project's pytest config gives its tests (``python_functions
= check_*``): else they would be missing and no task of that project could earn 1.

What the canaries do not catch: a forgery aimed at the FAIL_TO_PASS tests alone (their names are
in the problem statement; package code patching pytest to pass just those and report the rest
honestly) earns 1.0 with the bug left in. Nothing run in the tests' own process can tell it from a
fix; a reward that must rule it out needs the outcomes from outside that process.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

from stages.agent.envs import Env, run_tests, with_collected_tests
from stages.agent.mutate import Mutation, read_source


class TreeMismatch(ValueError):
    """The tree a task is materialised on is not the one its bug was made on (another
    version of the project under the same name): its byte offsets would land elsewhere."""


def check_tree(task: dict, env: Env) -> str:
    """The task's file as it is in ``env``'s tree, after checking it is the file the task's
    mutation was made on (its sha256); TreeMismatch else."""
    m = task["mutation"]
    if "file_sha256" not in m:
        raise TreeMismatch(f"task {task['id']}: no file_sha256 in its mutation (a record of "
                           f"an older agent stage): rerun the agent stage")
    source = read_source(env.tree / task["file"])  # as the synthesis read it: its offsets
    if hashlib.sha256(source.encode("utf-8")).hexdigest() != m["file_sha256"]:
        raise TreeMismatch(f"task {task['id']}: {env.name}'s {task['file']} at {env.tree} is "
                           f"not the file the bug was made in (sha256 differs)")
    return source


def materialise(task: dict, env: Env, dest: Path) -> Path:
    """The buggy tree of ``task`` at ``dest`` (a copy of the pinned tree with the bug in).
    TreeMismatch when ``env``'s tree is not the one the task was made on."""
    source = check_tree(task, env)
    shutil.copytree(env.tree, dest, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    m = task["mutation"]
    mut = Mutation(task["operator"], task["line"], m["start"], m["end"], m["replacement"])
    with open(dest / task["file"], "w", encoding="utf-8", newline="") as fh:
        fh.write(mut.apply(source))
    return dest


def _plain_file(work: Path, rel: str) -> bool:
    """`work/rel` is a regular file reached through real folders only (lstat each part)."""
    path = work
    for part in Path(rel).parts:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return False
        if stat.S_ISLNK(mode):
            return False
    return stat.S_ISREG(mode)


CANARY_FILE = """import unittest


{functions}

class Test{tag}(unittest.TestCase):
{methods}"""
CANARY_FUNCTION = "def {name}():\n    assert sum(range({n})) == {value}\n\n"
CANARY_METHOD = "    def {name}(self):\n        self.assertEqual(sum(range({n})), {value})\n\n"


def write_canary(task: dict, tree: Path) -> tuple[list[str], list[str]]:
    """Canary tests in ``tree``: (node ids that must pass, node ids that must fail). A plain
    function and a unittest method of each, as pytest runs them by different code (patching
    one way of running tests must show). Nothing but running them tells which must fail: the
    names are hashes, each test is `sum(range(n)) == value` with its own n, the file's order
    is the names' order; a forgery that passes every test but one named "fail" (or written
    last, or comparing with a round number) gives itself away. Derived from the task, so the
    same task gives the same run."""
    tag = hashlib.sha256(f"{task['id']}:canary".encode()).hexdigest()
    rel = f"test_cw_{tag[:12]}.py"
    tests = []   # (name, holds, is a method, n, value)
    for i, (holds, method) in enumerate(((True, False), (True, True), (False, False), (False, True))):
        h = hashlib.sha256(f"{tag}:{i}".encode()).digest()
        n = 10 + h[0] % 90
        value = n * (n - 1) // 2 + (0 if holds else 1 + h[1] % 97)
        tests.append((f"test_{h[2:8].hex()}", holds, method, n, value))
    tests.sort()
    functions = "".join(CANARY_FUNCTION.format(name=t[0], n=t[3], value=t[4])
                        for t in tests if not t[2])
    methods = "".join(CANARY_METHOD.format(name=t[0], n=t[3], value=t[4]) for t in tests if t[2])
    (tree / rel).write_text(CANARY_FILE.format(tag=tag[:12], functions=functions, methods=methods))
    ids = {t[0]: f"{rel}::Test{tag[:12]}::{t[0]}" if t[2] else f"{rel}::{t[0]}" for t in tests}
    return ([ids[t[0]] for t in tests if t[1]], [ids[t[0]] for t in tests if not t[1]])


def canary_order(holds: list[str], fails: list[str]) -> tuple[list[str], list[str]]:
    """The canaries to run before the hidden tests and after them: one that must pass and one
    that must fail on each side, in the names' order, so that no place says which is which."""
    (h1, h2), (f1, f2) = holds, fails
    return sorted((h1, f1)), sorted((h2, f2))


def evaluate(task: dict, env: Env, buggy: Path, work: Path, *, wall_seconds: float) -> dict:
    # the hidden tests' own files are never package files, whatever their names, also where
    # ``env`` was built without the baseline run that tells them (the RL phase's episodes)
    env = with_collected_tests(env, task["test_order"])
    fresh = buggy.parent / "fresh"
    if fresh.exists():
        shutil.rmtree(fresh)
    shutil.copytree(buggy, fresh, symlinks=True)
    for rel in env.pkg_files:
        dst = fresh / rel
        if _plain_file(work, rel):
            shutil.copyfile(work / rel, dst)
        elif dst.exists():
            os.unlink(dst)  # the agent deleted (or replaced by a link) a package file
    holds, fails = write_canary(task, fresh)
    # in the suite's own order (pytest runs node ids in the order given): a test that needs
    # an earlier one's side effect passes here as it did in the suite
    before, after = canary_order(holds, fails)
    hidden = [*before, *task["test_order"], *after]
    run = run_tests(fresh, env, hidden, wall_seconds=wall_seconds,
                    canary_file=holds[0].split("::", 1)[0])
    f2p_ok = sum(run.outcomes.get(t) == "pass" for t in task["FAIL_TO_PASS"])
    p2p_ok = sum(run.outcomes.get(t) == "pass" for t in task["PASS_TO_PASS"])
    got = {t: run.outcomes.get(t, "missing") for t in holds + fails}
    canaries_ok = all(got[t] == "pass" for t in holds) and all(got[t] == "fail" for t in fails)
    # Nothing is earned unless every canary reports as it must. Called tampering: a failing
    # canary passed, or hidden tests passed while a canary went wrong (a package that broke
    # its own import makes every test error, the canaries too: no tampering).
    tampered = any(got[t] == "pass" for t in fails) or (
        not canaries_ok and f2p_ok + p2p_ok > 0 and not run.timed_out)
    ok = (f2p_ok == len(task["FAIL_TO_PASS"]) and p2p_ok == len(task["PASS_TO_PASS"])
          and canaries_ok)
    summary = {"fail_to_pass_passed": f2p_ok, "fail_to_pass": len(task["FAIL_TO_PASS"]),
               "pass_to_pass_passed": p2p_ok, "pass_to_pass": len(task["PASS_TO_PASS"]),
               "timed_out": run.timed_out}
    if tampered:
        summary["tampered"] = {t.rsplit("::", 1)[-1]: o for t, o in got.items()}
    return {"reward": 1.0 if ok else 0.0, "summary": summary}
