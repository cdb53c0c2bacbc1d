"""One episode: a policy works on a task's buggy working copy through the tools until it
submits or a budget (turns, tokens) runs out; then the hidden tests give the reward.

The trajectory keeps every turn (CWM trains on failed trajectories too): the system prompt, the
problem statement, each assistant turn (one tool call) and each tool result as its own turn.
Tokens are counted as UTF-8 bytes / 4 (rounded up): the usual rule of thumb for code and
English, until the project's tokenizer counts them.

The working copy lies on the host's disk, but each tool call works on a copy of it in a tmpfs
of `max_workdir_mb` in the sandbox, written back after the call: writes past the limit fail
(ENOSPC) within the call, and a call that leaves the copy full ends the episode there (stop
reason ``workdir_limit``, no reward). A policy that cannot
be reached (a chat server down, after its retries) is no episode to keep: PolicyUnavailable
stops the stage, which a rerun resumes (exit 75, retried by the flow); a policy that answers
but cannot go on (its context is full) ends the episode as ``policy_error``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from stages.agent.envs import WORKDIR_PREFIX, Env
from stages.agent.policies import SYSTEM_PROMPT, PolicyUnavailable
from stages.agent.reward import evaluate, materialise
from stages.agent.tools import Outcome, parse_call, run_tool, truncate


def count_tokens(text: str) -> int:
    return -(-len(text.encode("utf-8")) // 4)


def user_prompt(task: dict) -> str:
    return (f"{task['problem_statement']}\nFix the bug in the repository's code (not in its "
            f"tests), check that the tests pass, then submit.")


def sweep_orphans() -> int:
    """Remove the stage's temp folders (`cw-agent-<pid>-...` in the temp dir: episodes,
    reward checks, failing-test traces, sandbox specs) of processes that are gone: a stage
    killed with -9 cleans up nothing, and an episode's folder may hold a working copy of up
    to max_workdir_mb, a mutants run's spec every mutant's source. Returns how many were
    removed."""
    removed = 0
    tmp = Path(tempfile.gettempdir())
    for d in tmp.glob(f"{WORKDIR_PREFIX}*-*"):
        pid = d.name[len(WORKDIR_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or not d.is_dir() or d.is_symlink():
            continue
        try:
            os.kill(int(pid), 0)
            continue                      # its process lives (or its pid was taken again)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue                      # another user's live process
        shutil.rmtree(d, ignore_errors=True)
        removed += 1
    return removed


def run_episode(task: dict, env: Env, policy, *, max_turns: int, max_tokens: int,
                observation_chars: int, tool_wall_seconds: float,
                test_wall_seconds: float, max_workdir_mb: int = 256) -> dict:
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": user_prompt(task)}]
    tokens = sum(count_tokens(m["content"]) for m in messages)
    submitted, stop, error = False, "turn_budget", None
    with tempfile.TemporaryDirectory(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-") as tmp:
        buggy = materialise(task, env, Path(tmp) / "buggy")
        work = Path(tmp) / "work"
        shutil.copytree(buggy, work, symlinks=True)
        turns = 0
        while turns < max_turns:
            turns += 1
            try:
                reply = policy.act(messages)
            except PolicyUnavailable:
                raise
            except (ConnectionError, TimeoutError, OSError, ValueError) as err:
                stop, error = "policy_error", f"{type(err).__name__}: {err}"[:500]
                break
            messages.append({"role": "assistant", "content": reply})
            tokens += count_tokens(reply)
            parsed = parse_call(reply)
            if not isinstance(parsed, str) and parsed.name == "submit":
                submitted, stop = True, "submit"
                break
            outcome = Outcome(parsed) if isinstance(parsed, str) else run_tool(
                parsed, work, env, wall_seconds=tool_wall_seconds, workdir_mb=max_workdir_mb)
            obs = outcome.text
            if outcome.workdir_full:
                obs += (f"\n[error: the working copy is full, at its limit of {max_workdir_mb} MB "
                        f"(agent.max_workdir_mb): the episode ends]")
                stop = "workdir_limit"
            obs = truncate(obs, observation_chars)
            messages.append({"role": "tool", "content": obs})
            tokens += count_tokens(obs)
            if stop == "workdir_limit":
                shutil.rmtree(work, ignore_errors=True)
                break
            if tokens >= max_tokens:
                stop = "token_budget"
                break
        result = evaluate(task, env, buggy, work, wall_seconds=test_wall_seconds) \
            if submitted else {"reward": 0.0, "outcomes": {}}
    return {"messages": messages, "turns": turns, "tokens": tokens, "submitted": submitted,
            "stop_reason": stop, "error": error, "reward": result["reward"],
            "hidden_tests": result.get("summary", {})}
