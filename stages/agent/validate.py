"""Environment validation and bug synthesis (SWE-smith's mutate-and-validate loop).

1. The environment's whole suite runs once in the sandbox with line coverage of the package
   files: it must collect tests and pass all of them (skips allowed), else the environment is
   recorded as invalid and skipped.
2. Mutations (``stages.agent.mutate``) are drawn only on covered lines, operators taking turns.
3. Each mutant reruns only the tests that executed its line: a mutation inside a function body
   cannot change the outcome of a (deterministic) test that never runs that line, so every other
   passing test is a PASS_TO_PASS test by construction. FAIL_TO_PASS = the covering tests that
   now fail; a bug is kept when FAIL_TO_PASS and PASS_TO_PASS are both non-empty.
4. The problem statement is written from the failing tests' output: only the frames of test
   files and the error lines, never package frames (they would point at the mutated line), and
   no line of the gold patch.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass

from stages.agent.envs import Env, run_mutants, run_tests
from stages.agent.mutate import Mutation, mutations, sample, unified_diff


@dataclass
class Synthesis:
    tasks: list[dict]
    stats: dict


_FRAME = re.compile(r"^(\S+\.py):(\d+): in (\S+)")


def _is_test_path(path: str, env: Env) -> bool:
    return path in env.test_files or re.search(r"(^|/)(tests?/|test_[^/]*\.py$|[^/]*_test\.py$|conftest\.py$)", path) is not None


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
        for line in messages.get(t, "").splitlines():
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


def baseline(env: Env, wall_seconds: float) -> tuple[dict, object]:
    """Validate the environment: (validation record, coverage run of the whole suite)."""
    base = run_tests(env.tree, env, coverage=True, wall_seconds=wall_seconds)
    failing = sorted(t for t, o in base.outcomes.items() if o in ("fail", "error"))
    validation = {"repo": env.name, "tests": len(base.outcomes), "passed": len(base.passed),
                  "failed": failing[:20], "collect_errors": base.summary.get("collect_errors", [])[:5],
                  "timed_out": base.timed_out}
    reason = None
    if base.timed_out:
        reason = "suite timed out"
    elif not base.summary:
        reason = f"runner gave no summary: {base.stderr_tail[-500:]}"
    elif not base.passed:
        reason = "no passing test"
    elif failing or validation["collect_errors"]:
        reason = f"{len(failing)} failing tests, {len(validation['collect_errors'])} collection errors"
    validation["valid"] = reason is None
    validation["reason"] = reason
    return validation, base


def coverage_map(base) -> dict[tuple[str, int], list[str]]:
    """(file, line) -> the passing tests that executed it (sorted)."""
    covering: dict[tuple[str, int], list[str]] = {}
    for test in sorted(base.passed):
        for file, lines in base.lines.get(test, {}).items():
            for ln in lines:
                covering.setdefault((file, ln), []).append(test)
    return covering


def check_mutants(env: Env, base, covering: dict, sources: dict[str, str],
                  picked: list[tuple[str, Mutation]], *, seed: int, max_tasks: int, batch: int,
                  mutant_timeout: float, stats: dict) -> list[dict]:
    """Run each picked mutant's covering tests; the kept bugs as task records."""
    tried, kept, rejected = stats["tried"], stats["kept"], stats["rejected"]
    stats.setdefault("valid", Counter())
    tasks: list[dict] = []
    for start in range(0, len(picked), batch):
        if len(tasks) >= max_tasks:
            break
        chunk = picked[start:start + batch]
        reqs = [{"id": str(i), "file": f, "source": m.apply(sources[f]),
                 "tests": covering[(f, m.line)]} for i, (f, m) in enumerate(chunk)]
        results = run_mutants(env.tree, env, reqs, timeout=mutant_timeout,
                              wall_seconds=mutant_timeout * len(reqs) + 60)
        for req, (f, m) in zip(reqs, chunk):
            tried[m.operator] += 1
            res = results.get(req["id"])
            if res is None or res["status"] != "ok":
                rejected[res["status"] if res else "lost"] += 1
                continue
            # a covering test missing from the run (collection broke) failed too
            f2p = sorted(t for t in req["tests"] if res["outcomes"].get(t) != "pass")
            p2p = sorted(base.passed - set(f2p))
            if not f2p:
                rejected["no_fail_to_pass"] += 1
                continue
            if not p2p:
                rejected["no_pass_to_pass"] += 1
                continue
            stats["valid"][m.operator] += 1  # a bug, whether or not the cap lets it in
            if len(tasks) >= max_tasks:
                continue
            kept[m.operator] += 1
            gold = unified_diff(req["source"], sources[f], f)
            tasks.append({
                "id": _task_id(env, f, m), **env.meta(), "file": f, "line": m.line,
                "operator": m.operator, "seed": seed,
                "mutation": {"start": m.start, "end": m.end, "replacement": m.replacement},
                "bug_patch": unified_diff(sources[f], req["source"], f), "gold_patch": gold,
                "FAIL_TO_PASS": f2p, "PASS_TO_PASS": p2p,
                "problem_statement": problem_statement(env, f2p, res.get("messages", {}), gold),
                "test_command": env.test_command,
            })
    return tasks


def synthesize(env: Env, *, seed: int, max_mutants: int, max_tasks: int, batch: int,
               mutant_timeout: float, wall_seconds: float) -> Synthesis:
    stats = {"tried": Counter(), "valid": Counter(), "kept": Counter(), "rejected": Counter(),
             "pool": 0}
    stats["validation"], base = baseline(env, wall_seconds)
    if not stats["validation"]["valid"]:
        return Synthesis([], stats)
    covering = coverage_map(base)
    covered_files = {f for f, _ in covering}
    sources = {}
    for f in env.pkg_files:
        if f in covered_files:
            try:
                sources[f] = (env.tree / f).read_text(encoding="utf-8")
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
                          mutant_timeout=mutant_timeout, stats=stats)
    return Synthesis(tasks, stats)
