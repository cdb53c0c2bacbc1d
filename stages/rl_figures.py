"""An RL run's figures from its steps log: what metrics/rl.json holds, and what the evaluate
stage reports of the RL checkpoint it evaluates (the log's steps up to that checkpoint). Apart
from stages/rl.py so that evaluation does not import (and rerun on edits of) RL's training."""

from __future__ import annotations

import statistics

# The run's counts so far, carried in each logged row (and in each checkpoint, to resume
# them): with log_interval > 1 the steps not logged are in no row, and a sum over the rows
# undercounted them. total_agent_reward: the agent rewards' sum (episodes x their mean).
TOTALS = ("total_updates", "total_agent_episodes", "total_agent_broken", "total_agent_reward")


def add_step(totals: dict, row: dict) -> dict:
    """The running totals (TOTALS; {} at the start) after a step whose row is `row`."""
    n = row.get("agent_episodes") or 0
    return {"total_updates": totals.get("total_updates", 0) + row.get("updated", 0),
            "total_agent_episodes": totals.get("total_agent_episodes", 0) + n,
            "total_agent_broken": totals.get("total_agent_broken", 0) + row.get("agent_broken", 0),
            "total_agent_reward": totals.get("total_agent_reward", 0)
            + (n * row.get("agent_reward_mean", 0.0) if n else 0)}


def run_totals(rows: list[dict]) -> dict:
    """The totals at the last of `rows`: the ones it carries, or, in a log written before rows
    carried them (every step logged then, by default), its rows' sums."""
    if rows and all(k in rows[-1] for k in TOTALS):
        return {k: rows[-1][k] for k in TOTALS}
    totals: dict = {}
    for r in rows:
        totals = add_step(totals, r)
    return totals


def summary(rows: list[dict]) -> dict:
    """metrics/rl.json: the reward curve's ends (first and last quarter of the logged steps),
    the mean success rate (of the logged steps: the curve's), the agent episodes' success and
    how many steps updated the policy (of every step: run_totals)."""
    out: dict = {"steps": rows[-1]["step"] if rows else 0}
    rewards = [r["reward_mean"] for r in rows if "reward_mean" in r]
    if rewards:
        q = max(1, len(rewards) // 4)
        out.update(reward_first=round(statistics.fmean(rewards[:q]), 4),
                   reward_last=round(statistics.fmean(rewards[-q:]), 4),
                   reward_mean=round(statistics.fmean(rewards), 4),
                   success_rate=round(statistics.fmean(r["success_rate"] for r in rows
                                                       if "success_rate" in r), 4))
    for kind in ("output", "next_frame"):
        vals = [r[f"reward_{kind}"] for r in rows if f"reward_{kind}" in r]
        if vals:
            out[f"reward_{kind}_mean"] = round(statistics.fmean(vals), 4)
    totals = run_totals(rows)
    out["agent_episodes"] = totals.get("total_agent_episodes", 0)
    out["agent_broken_episodes"] = totals.get("total_agent_broken", 0)
    if out["agent_episodes"]:
        out["agent_success_rate"] = round(totals["total_agent_reward"] / out["agent_episodes"], 4)
    out["updates"] = totals.get("total_updates", 0)
    secs = [r["step_seconds"] for r in rows if "step_seconds" in r]
    if secs:
        out["step_seconds_median"] = sorted(secs)[len(secs) // 2]
    return out
