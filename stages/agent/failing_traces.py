"""Repository-level execution traces of a task's failing tests (for mid-training): the buggy
tree's FAIL_TO_PASS tests run under the project's repository tracer (``stages.repo_traces``,
the tracer of the traces stage, in the sandbox), so the model sees the bug *execute*: the call
frames, the locals before each line, the wrong return value or the exception.

The repository tracer runs unittest discovery plus module-level ``test_*`` functions without
parameters; the buggy tree handed to it keeps only the test files that hold a failing test,
so the traced run stays short. Traces of calls made by other tests of those files are dropped;
parametrised pytest tests (``test_x[a-b]``) are beyond that runner and give no trace.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from stages.agent.envs import WORKDIR_PREFIX, Env
from stages.agent.reward import materialise
from stages.repo_traces import trace_repository
from stages.tracer import TraceLimits

KEEP = ("ok", "exception")


def _unittest_suffix(nodeid: str) -> tuple[str, ...] | None:
    """``tests/test_x.py::Class::test_m`` -> ("test_x", "Class", "test_m"): the tail of the
    unittest id the repository tracer gives the same test; None for parametrised ids."""
    if "[" in nodeid:
        return None
    path, *parts = nodeid.split("::")
    return (Path(path).stem, *parts)


def failing_test_traces(task: dict, env: Env, *, max_traces: int, wall_seconds: float,
                        limits: TraceLimits = TraceLimits()) -> tuple[list[dict], dict]:
    wanted = {s for s in map(_unittest_suffix, task["FAIL_TO_PASS"]) if s}
    stats = {"task_id": task["id"], "traceable_tests": len(wanted), "traces": 0}
    if not wanted:
        return [], stats
    keep_files = {t.split("::")[0] for t in task["FAIL_TO_PASS"]}
    # named like an episode's folder, so a run killed with -9 leaves nothing that the next
    # start does not sweep (loop.sweep_orphans)
    with tempfile.TemporaryDirectory(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-trace-") as tmp:
        buggy = materialise(task, env, Path(tmp) / "buggy")
        for tf in env.test_files:
            name = Path(tf).name
            if tf not in keep_files and name not in ("conftest.py", "__init__.py"):
                (buggy / tf).unlink(missing_ok=True)
        recs, st = trace_repository(buggy, max_traces=max_traces * 4, max_per_function=5,
                                    limits=limits, wall_seconds=wall_seconds, repo=task["repo"],
                                    version=task.get("version"), sha256=task.get("sha256"))
        shutil.rmtree(buggy, ignore_errors=True)
    out = []
    for r in recs:
        parts = tuple(r["test"].split("."))
        if r["status"] not in KEEP or not any(parts[-len(w):] == w for w in wanted):
            continue
        out.append({**r, "id": hashlib.sha256(f"{task['id']}:{r['id']}".encode()).hexdigest()[:20],
                    "task_id": task["id"], "operator": task["operator"],
                    # held out with the task (codeworld.split.corpus_id), as its trajectories
                    # are: by the repository module, a held-out task's failing tests would
                    # reach training
                    "provenance": {**r["provenance"], "generator": "agent_failing_test",
                                   "task_id": task["id"], "corpus_id": f"task:{task['id']}"}})
        if len(out) >= max_traces:
            break
    stats.update(traces=len(out), tests_run=st.get("tests_run"), timed_out=st.get("timed_out"))
    return out, stats
