"""Reward: the task's hidden FAIL_TO_PASS and PASS_TO_PASS tests, run after submit in a fresh
copy of the buggy tree that takes only the agent's version of the *package* files (the files
that are neither tests nor build scripts). Everything else the agent changed (test files, new
conftest.py, config files, new modules, symlinks) is dropped, so editing the hidden tests, or
skipping them through pytest's configuration, cannot earn a reward. Reward is 1.0 when every
FAIL_TO_PASS and PASS_TO_PASS test passes, else 0.0.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from stages.agent.envs import Env, run_tests
from stages.agent.mutate import Mutation


def materialise(task: dict, env: Env, dest: Path) -> Path:
    """The buggy tree of ``task`` at ``dest`` (a copy of the pinned tree with the bug in)."""
    shutil.copytree(env.tree, dest, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    m = task["mutation"]
    mut = Mutation(task["operator"], task["line"], m["start"], m["end"], m["replacement"])
    path = env.tree / task["file"]
    (dest / task["file"]).write_text(mut.apply(path.read_text(encoding="utf-8")), encoding="utf-8")
    return dest


def evaluate(task: dict, env: Env, buggy: Path, work: Path, *, wall_seconds: float) -> dict:
    fresh = buggy.parent / "fresh"
    if fresh.exists():
        shutil.rmtree(fresh)
    shutil.copytree(buggy, fresh, symlinks=True)
    for rel in env.pkg_files:
        src, dst = work / rel, fresh / rel
        if src.is_file() and not src.is_symlink():
            shutil.copyfile(src, dst)
        elif dst.exists():
            os.unlink(dst)  # the agent deleted (or replaced by a link) a package file
    hidden = list(task["FAIL_TO_PASS"]) + list(task["PASS_TO_PASS"])
    run = run_tests(fresh, env, hidden, wall_seconds=wall_seconds)
    f2p_ok = sum(run.outcomes.get(t) == "pass" for t in task["FAIL_TO_PASS"])
    p2p_ok = sum(run.outcomes.get(t) == "pass" for t in task["PASS_TO_PASS"])
    ok = f2p_ok == len(task["FAIL_TO_PASS"]) and p2p_ok == len(task["PASS_TO_PASS"])
    return {"reward": 1.0 if ok else 0.0,
            "summary": {"fail_to_pass_passed": f2p_ok, "fail_to_pass": len(task["FAIL_TO_PASS"]),
                        "pass_to_pass_passed": p2p_ok, "pass_to_pass": len(task["PASS_TO_PASS"]),
                        "timed_out": run.timed_out}}
