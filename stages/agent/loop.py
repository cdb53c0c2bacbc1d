"""One episode: a policy works on a task's buggy working copy through the tools until it
submits or a budget (turns, tokens) runs out; then the hidden tests give the reward.

The trajectory keeps every turn (CWM trains on failed trajectories too): the system prompt, the
problem statement, each assistant turn (one tool call) and each tool result as its own turn.
Tokens are counted as UTF-8 bytes / 4 (rounded up): the usual rule of thumb for code and
English, until the project's tokenizer counts them.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from stages.agent.envs import Env
from stages.agent.policies import SYSTEM_PROMPT
from stages.agent.reward import evaluate, materialise
from stages.agent.tools import execute, parse_call, truncate


def count_tokens(text: str) -> int:
    return -(-len(text.encode("utf-8")) // 4)


def user_prompt(task: dict) -> str:
    return (f"{task['problem_statement']}\nFix the bug in the repository's code (not in its "
            f"tests), check that the tests pass, then submit.")


def run_episode(task: dict, env: Env, policy, *, max_turns: int, max_tokens: int,
                observation_chars: int, tool_wall_seconds: float,
                test_wall_seconds: float) -> dict:
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": user_prompt(task)}]
    tokens = sum(count_tokens(m["content"]) for m in messages)
    submitted, stop, error = False, "turn_budget", None
    with tempfile.TemporaryDirectory(prefix="cw-agent-") as tmp:
        buggy = materialise(task, env, Path(tmp) / "buggy")
        work = Path(tmp) / "work"
        shutil.copytree(buggy, work, symlinks=True)
        turns = 0
        while turns < max_turns:
            turns += 1
            try:
                reply = policy.act(messages)
            except (ConnectionError, TimeoutError, OSError, ValueError) as err:
                stop, error = "policy_error", f"{type(err).__name__}: {err}"[:500]
                break
            messages.append({"role": "assistant", "content": reply})
            tokens += count_tokens(reply)
            parsed = parse_call(reply)
            if not isinstance(parsed, str) and parsed.name == "submit":
                submitted, stop = True, "submit"
                break
            obs = parsed if isinstance(parsed, str) else execute(
                parsed, work, env, wall_seconds=tool_wall_seconds)
            obs = truncate(obs, observation_chars)
            messages.append({"role": "tool", "content": obs})
            tokens += count_tokens(obs)
            if tokens >= max_tokens:
                stop = "token_budget"
                break
        result = evaluate(task, env, buggy, work, wall_seconds=test_wall_seconds) \
            if submitted else {"reward": 0.0, "outcomes": {}}
    return {"messages": messages, "turns": turns, "tokens": tokens, "submitted": submitted,
            "stop_reason": stop, "error": error, "reward": result["reward"],
            "hidden_tests": result.get("summary", {})}
