"""An RL run's figures from its steps log: what metrics/rl.json holds, and what the evaluate
stage reports of the RL checkpoint it evaluates (the log's steps up to that checkpoint). Apart
from stages/rl.py so that evaluation does not import (and rerun on edits of) RL's training."""

from __future__ import annotations

import statistics


def summary(rows: list[dict]) -> dict:
    """metrics/rl.json: the reward curve's ends (first and last quarter of the steps), the mean
    success rate, the agent episodes' success, how many steps updated the policy."""
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
    eps = [(r["agent_episodes"], r.get("agent_reward_mean", 0.0)) for r in rows
           if r.get("agent_episodes")]
    out["agent_episodes"] = sum(n for n, _ in eps)
    out["agent_broken_episodes"] = sum(r.get("agent_broken", 0) for r in rows)
    if eps:
        out["agent_success_rate"] = round(sum(n * m for n, m in eps) / out["agent_episodes"], 4)
    out["updates"] = sum(r.get("updated", 0) for r in rows)
    secs = [r["step_seconds"] for r in rows if "step_seconds" in r]
    if secs:
        out["step_seconds_median"] = sorted(secs)[len(secs) // 2]
    return out
