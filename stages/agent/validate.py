"""Environment validation and bug synthesis (SWE-smith's mutate-and-validate loop).

1. The environment's whole suite runs in the sandbox with line coverage of the package
   files, then ``runs - 1`` times more without: a test whose outcome is not the same in every
   run is flaky, set aside (never a label: the right fix would earn its reward only
   sometimes; listed in the validation record). The others must pass (skips allowed), and
   some must, else the environment is recorded as invalid and skipped. Every file a
   collected test lies in is a test file from then on, whatever its name (a config's
   ``python_files = check_*.py``): no mutation goes there, and the reward never takes the
   agent's version of it.
2. Mutations (``stages.agent.mutate``) are drawn only on covered lines, operators taking turns.
3. Each mutant first reruns only the tests that executed its line (a cheap filter: a mutant
   none of them notices is dropped, ``no_fail_to_pass``). A survivor then runs the whole suite,
   as the base run did: a mutation can also change what runs at import time (a module-level
   table built by the mutated function) or what a cache keeps between tests, so no test's
   outcome is assumed. FAIL_TO_PASS = the tests that passed on the original tree and fail
   (or error, or are missing) on the buggy one, PASS_TO_PASS = those that pass on both (a
   test skipped on the buggy tree is in neither); a bug is valid when both are non-empty
   (rejections of this run are counted ``full_suite_*``). Each mutant's tests run on a fresh
   copy of the tree, with a home and temp folder of their own, and every process they leave
   (daemons too) is killed after them, so one mutant's leftovers do not change the next's
   outcomes (runner/cwtest.py).
4. A valid bug is kept (up to ``max_tasks``) only when the reward itself, run as after an
   episode, gives the original tree 1.0 and the buggy tree 0.0 (``reward_check_*`` counts
   the others): hidden tests that depend on one another, or on the suite's order, must not
   make a task nobody can solve; and run alone the buggy tree must fail every FAIL_TO_PASS
   test and pass every PASS_TO_PASS one (``reward_check_buggy_labels``). ``test_order``
   holds FAIL_TO_PASS and PASS_TO_PASS in the suite's own collection order, the order the
   reward runs them in.
5. The problem statement is written from the failing tests' output: only the frames of test
   files and the error lines, never package frames (they would point at the mutated line), and
   no line of the gold patch.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from codeworld.sandbox import SandboxError, SandboxUnavailable
from stages.agent.envs import WORKDIR_PREFIX, Env, run_mutants, run_tests, with_collected_tests
from stages.agent.mutate import Mutation, mutations, read_source, sample, unified_diff
from stages.agent.reward import evaluate, materialise
from stages.agent.tools import normalise


@dataclass
class Synthesis:
    tasks: list[dict]
    stats: dict
    env: Env    # the environment as the baseline run showed it: its collected tests' files are tests


_FRAME = re.compile(r"^(\S+\.py):(\d+): in (\S+)")


def _is_test_path(path: str, env: Env) -> bool:
    return path in env.test_files or re.search(r"(^|/)(tests?/|test_[^/]*\.py$|[^/]*_test\.py$|conftest\.py$)", path) is not None


FAILED = ("fail", "error")  # outcomes of a test that did not pass (a skip is neither)


def problem_statement(env: Env, f2p: list[str], messages: dict[str, str], gold_patch: str) -> str:
    added = {ln[1:].strip() for ln in gold_patch.splitlines()
             if ln.startswith("+") and not ln.startswith("+++") and ln[1:].strip()}
    shown = f2p[:3]
    parts = [f"Some tests of {env.name} fail. Expected to pass, now failing "
             f"({len(f2p)} test{'s' if len(f2p) > 1 else ''}):", ""]
    parts += [f"- {t}" for t in f2p[:20]] + (["- ..."] if len(f2p) > 20 else [])
    parts += ["", f"Run the tests with: {env.test_command}", ""]
    for t in shown:
        keep, in_test = [], False
        for line in normalise(messages.get(t, "")).splitlines():  # no addresses: reproducible
            m = _FRAME.match(line)
            if m:
                in_test = _is_test_path(m.group(1), env)
                if in_test:
                    keep.append(line)
                continue
            if line.startswith("E ") or (in_test and line.startswith("    ")):
                keep.append(line)
        keep = [ln for ln in keep if ln.strip() not in added]  # nothing of the fix leaks
        if keep:
            parts += [f"Output of {t}:", *keep[-30:], ""]
    return "\n".join(parts).rstrip() + "\n"


def _task_id(env: Env, file: str, m: Mutation) -> str:
    key = repr((env.name, env.version, env.commit, file, m.start, m.end, m.operator, m.replacement))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


FLAKY = "flaky"  # the baseline's outcome of a test that did not give the same one every run
BASELINE_RUNS = 3


def _stopped(run, which: str) -> str | None:
    """Why a whole-suite run says nothing about its tests' outcomes, if it does not."""
    if run.timed_out:
        return f"suite timed out{which}"
    if not run.summary:
        return f"runner gave no summary{which}: {run.stderr_tail[-500:]}"
    return None


def baseline(env: Env, wall_seconds: float, runs: int = BASELINE_RUNS) -> tuple[dict, object]:
    """Validate the environment: (validation record, coverage run of the whole suite, where
    the outcome of a test that changed between the ``runs`` runs is FLAKY)."""
    base = run_tests(env.tree, env, coverage=True, wall_seconds=wall_seconds)
    reason = _stopped(base, "")
    flaky: set[str] = set()
    for i in range(2, runs + 1):
        if reason:
            break
        again = run_tests(env.tree, env, wall_seconds=wall_seconds)
        reason = _stopped(again, f" (run {i} of {runs})")
        flaky |= {t for t in base.outcomes.keys() | again.outcomes.keys()
                  if base.outcomes.get(t) != again.outcomes.get(t)}
    for t in flaky & base.outcomes.keys():
        base.outcomes[t] = FLAKY
    failing = sorted(t for t, o in base.outcomes.items() if o in ("fail", "error"))
    validation = {"repo": env.name, "tests": len(base.outcomes), "passed": len(base.passed),
                  "failed": failing[:20], "collect_errors": base.summary.get("collect_errors", [])[:5],
                  "flaky": sorted(flaky)[:20], "flaky_tests": len(flaky),
                  "timed_out": base.timed_out}
    if reason is None:
        if not base.passed:
            reason = "no passing test"
        elif base.summary.get("exit") not in (0, 1):  # interrupted: its later tests never ran
            reason = f"pytest stopped before the suite's end (exit status {base.summary.get('exit')})"
        elif failing or validation["collect_errors"]:
            reason = f"{len(failing)} failing tests, {len(validation['collect_errors'])} collection errors"
    validation["valid"] = reason is None
    validation["reason"] = reason
    return validation, base


def coverage_map(base) -> dict[tuple[str, int], list[str]]:
    """(file, line) -> the passing tests that executed it, in the suite's order (the order
    they ran in, which a test may depend on)."""
    covering: dict[tuple[str, int], list[str]] = {}
    for test in (t for t, o in base.outcomes.items() if o == "pass"):
        for file, lines in base.lines.get(test, {}).items():
            for ln in lines:
                covering.setdefault((file, ln), []).append(test)
    return covering


def _covering_runs(env: Env, covering: dict, sources: dict[str, str],
                   chunk: list[tuple[str, Mutation]], *, timeout: float,
                   stats: dict) -> list[tuple[str, Mutation, str]]:
    """The pre-filter: each mutant's covering tests only. (file, mutation, buggy source) of
    the mutants where one of them no longer passes; the others are counted rejected."""
    reqs = [{"id": str(i), "file": f, "source": m.apply(sources[f]),
             "tests": covering[(f, m.line)]} for i, (f, m) in enumerate(chunk)]
    results = run_mutants(env.tree, env, reqs, timeout=timeout,
                          wall_seconds=timeout * len(reqs) + 60)
    survivors = []
    for req, (f, m) in zip(reqs, chunk):
        stats["tried"][m.operator] += 1
        res = results.get(req["id"])
        if res is None or res["status"] != "ok":
            stats["rejected"][res["status"] if res else "lost"] += 1
            continue
        # a skipped test is not a failing one (a mutant that breaks an import is a crash:
        # pytest stops the whole session on a collection error)
        if not any(res["outcomes"].get(t, "error") in FAILED for t in req["tests"]):
            stats["rejected"]["no_fail_to_pass"] += 1
            continue
        survivors.append((f, m, req["source"]))
    return survivors


@dataclass
class Bug:
    """A mutant the whole suite confirms: its test lists are in the suite's collection order."""
    file: str
    mutation: Mutation
    source: str                 # the file with the bug in
    fail_to_pass: list[str]
    pass_to_pass: list[str]
    test_order: list[str]       # both together, in the suite's order
    messages: dict[str, str]    # short tracebacks of the failing tests


def _full_runs(env: Env, base, survivors: list[tuple[str, Mutation, str]], *,
               wall_seconds: float, stats: dict) -> list[Bug]:
    """The whole suite on each survivor's buggy tree (each may take as long as the base
    run): the valid bugs; the others are counted rejected."""
    if not survivors:
        return []
    reqs = [{"id": str(i), "file": f, "source": src, "tests": None}
            for i, (f, _, src) in enumerate(survivors)]
    results = run_mutants(env.tree, env, reqs, timeout=wall_seconds,
                          wall_seconds=wall_seconds * len(reqs) + 60)
    order = [t for t in base.outcomes if t in base.passed]  # dicts keep the run's order
    bugs = []
    for req, (f, m, src) in zip(reqs, survivors):
        res = results.get(req["id"])
        if res is None or res["status"] != "ok":
            stats["rejected"][f"full_suite_{res['status'] if res else 'lost'}"] += 1
            continue
        # a test missing from the buggy run did not pass; one skipped there is in neither
        # list (it neither fails nor shows the bug is fixed)
        f2p = [t for t in order if res["outcomes"].get(t, "error") in FAILED]
        p2p = [t for t in order if res["outcomes"].get(t) == "pass"]
        if not f2p:  # the covering tests fail alone but pass in the suite: order-dependent
            stats["rejected"]["full_suite_no_fail_to_pass"] += 1
        elif not p2p:
            stats["rejected"]["full_suite_no_pass_to_pass"] += 1
        else:
            listed = set(f2p) | set(p2p)
            bugs.append(Bug(f, m, src, f2p, p2p, [t for t in order if t in listed],
                            res.get("messages", {})))
    return bugs


def reward_check(task: dict, env: Env, *, wall_seconds: float) -> str | None:
    """None when ``reward.evaluate`` gives the original tree 1.0 and the buggy tree 0.0, as
    a task must; else the rejection to count. (The folder is named like an episode's, so a
    run killed with -9 leaves nothing that the next start does not sweep.)"""
    with tempfile.TemporaryDirectory(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-check-") as tmp:
        try:
            buggy = materialise(task, env, Path(tmp) / "buggy")
            if evaluate(task, env, buggy, env.tree, wall_seconds=wall_seconds)["reward"] != 1.0:
                return "reward_check_original_not_1"
            bug = evaluate(task, env, buggy, buggy, wall_seconds=wall_seconds)
            if bug["reward"] != 0.0:
                return "reward_check_buggy_not_0"
            # run alone, the buggy tree must give the labels the suite gave (a mutant run
            # before it in the same sandbox may have left state behind: a cache file)
            s = bug["summary"]
            if s["fail_to_pass_passed"] or s["pass_to_pass_passed"] != s["pass_to_pass"]:
                return "reward_check_buggy_labels"
        except SandboxUnavailable:   # no sandbox at all: the stage stops, saying how to get one
            raise
        except (OSError, ValueError, SandboxError):  # one task's failure is not the repo's end
            return "reward_check_error"
    return None


def _task(env: Env, bug: Bug, original: str, seed: int) -> dict:
    f, m = bug.file, bug.mutation
    gold = unified_diff(bug.source, original, f)
    return {
        "id": _task_id(env, f, m), **env.meta(), "file": f, "line": m.line,
        "operator": m.operator, "seed": seed,
        # the span's text and the file's hash: materialise checks that the tree it is given
        # is the one the offsets were taken from
        "mutation": {"start": m.start, "end": m.end, "replacement": m.replacement,
                     "original": original.encode("utf-8")[m.start:m.end].decode("utf-8"),
                     "file_sha256": hashlib.sha256(original.encode("utf-8")).hexdigest()},
        "bug_patch": unified_diff(original, bug.source, f), "gold_patch": gold,
        "FAIL_TO_PASS": sorted(bug.fail_to_pass), "PASS_TO_PASS": sorted(bug.pass_to_pass),
        "test_order": bug.test_order,
        "problem_statement": problem_statement(env, sorted(bug.fail_to_pass), bug.messages, gold),
        "test_command": env.test_command,
    }


def check_mutants(env: Env, base, covering: dict, sources: dict[str, str],
                  picked: list[tuple[str, Mutation]], *, seed: int, max_tasks: int, batch: int,
                  mutant_timeout: float, wall_seconds: float, stats: dict) -> list[dict]:
    """Validate each picked mutant (covering tests, then the whole suite, then the reward
    check of the ones the cap lets in); the kept bugs as task records."""
    stats.setdefault("valid", Counter())
    tasks: list[dict] = []
    for start in range(0, len(picked), batch):
        if len(tasks) >= max_tasks:
            break
        survivors = _covering_runs(env, covering, sources, picked[start:start + batch],
                                   timeout=mutant_timeout, stats=stats)
        for bug in _full_runs(env, base, survivors, wall_seconds=wall_seconds, stats=stats):
            op = bug.mutation.operator
            stats["valid"][op] += 1  # a bug, whether or not the cap lets it in
            if len(tasks) >= max_tasks:
                continue  # the reward check is paid for the bugs kept only
            task = _task(env, bug, sources[bug.file], seed)
            why = reward_check(task, env, wall_seconds=wall_seconds)
            if why:
                stats["rejected"][why] += 1
                continue
            stats["kept"][op] += 1
            tasks.append(task)
    return tasks


def synthesize(env: Env, *, seed: int, max_mutants: int, max_tasks: int, batch: int,
               mutant_timeout: float, wall_seconds: float,
               baseline_runs: int = BASELINE_RUNS) -> Synthesis:
    stats = {"tried": Counter(), "valid": Counter(), "kept": Counter(), "rejected": Counter(),
             "pool": 0}
    stats["validation"], base = baseline(env, wall_seconds, baseline_runs)
    # every file pytest collected a test from is a test file, whatever its name: never a
    # mutation source, never taken from the agent's working copy by the reward
    env = with_collected_tests(env, base.outcomes)
    if not stats["validation"]["valid"]:
        return Synthesis([], stats, env)
    covering = coverage_map(base)
    covered_files = {f for f, _ in covering}
    sources = {}
    for f in env.pkg_files:
        if f in covered_files:
            try:
                sources[f] = read_source(env.tree / f)
            except (OSError, UnicodeDecodeError):
                stats["rejected"]["unreadable_file"] += 1  # not mutated, counted
    pool = []
    for f in sorted(sources):
        pool += [(f, m) for m in mutations(sources[f]) if (f, m.line) in covering]
    stats["pool"] = len(pool)
    # sample() draws from one list of mutations; the file of each is looked up by identity
    where = {id(m): f for f, m in pool}
    picked = sample([m for _, m in pool], {m.line for _, m in pool}, seed, max_mutants)
    tasks = check_mutants(env, base, covering, sources, [(where[id(m)], m) for m in picked],
                          seed=seed, max_tasks=max_tasks, batch=batch,
                          mutant_timeout=mutant_timeout, wall_seconds=wall_seconds, stats=stats)
    return Synthesis(tasks, stats, env)
