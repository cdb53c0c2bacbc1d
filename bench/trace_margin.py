"""How far the traces stage's programs run from its wall-clock limit.

    .venv/bin/python bench/trace_margin.py [--params params.yaml] [--factor 10] [--top 15]

A program's fate (traced, or dropped as a timeout) must not depend on the machine: the same
params must give the same traces on a slow laptop, a loaded CI runner and a fast server. The
tracer's own limits (max_events, max_bytes) are counts, the same everywhere; the wall-clock
limit is not. So it has to sit far from every program's running time: a program that takes
0.4 s here times out at a 0.5 s limit on a machine 1.3x slower.

This runs the stage's programs (the same generator and params, from the dedup dataset on disk)
one per fork in the sandbox, with the limit raised `--factor` times so that the slow ones
finish, and prints the slowest, the margin (limit / slowest program that finished) and the
programs "at risk": those a machine `--factor` times slower or faster would move across the
limit. Needs the dedup stage's output (`dvc repro dedup`, or `make run`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from codeworld.config import load_params  # noqa: E402
from codeworld.shards import Dataset  # noqa: E402
from codeworld.storage import Storage  # noqa: E402
from stages import traces  # noqa: E402
from stages.trace_runner import sandbox_results  # noqa: E402


def at_risk(seconds: float, limit: float, factor: float) -> bool:
    """Whether a machine `factor` times slower or faster could give a program that ran
    `seconds` here the other fate (a program cut at the raised limit, `limit * factor`,
    times out everywhere)."""
    return limit / factor < seconds < limit * factor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--factor", type=float, default=10.0,
                    help="speed difference between machines the limit must absorb")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    params = load_params(args.params)
    cfg = params.traces
    limit = cfg.limits.wall_seconds
    storage = Storage(params.storage.root, params.storage.s3_endpoint_url)
    cases = list(traces.programs_to_trace(Dataset(storage.sub("dedup")), cfg, Counter()))
    raised = cfg.limits.model_copy(update={"wall_seconds": limit * args.factor,
                                           "cpu_seconds": cfg.limits.cpu_seconds * args.factor})
    t0 = time.perf_counter()
    results = sandbox_results([{"id": c.id, "code": c.code, "call": c.call} for c in cases],
                              raised, cfg.workers, batch_size=1, frames=True, too_long_text=False)
    elapsed = time.perf_counter() - t0
    rows = sorted(((r.wall_seconds, r.status != "timeout", c.id, c.call)
                   for c, r in zip(cases, results)), reverse=True)
    finished = [s for s, done, *_ in rows if done]
    risky = [row for row in rows if row[1] and at_risk(row[0], limit, args.factor)]
    summary = {"programs": len(rows), "limit_seconds": limit, "factor": args.factor,
               "slowest_finished_seconds": round(max(finished, default=0.0), 4),
               "margin": round(limit / max(finished), 1) if finished else None,
               "timeouts_at_raised_limit": len(rows) - len(finished),
               "at_risk": len(risky), "seconds": round(elapsed, 1)}
    if args.json:
        print(json.dumps({**summary, "at_risk_programs": [r[2] for r in risky]}, indent=1))
        return
    print(f"{len(rows)} programs, one per fork, limit {limit} s raised {args.factor:g}x "
          f"({elapsed:.0f} s)\n")
    print(f"{'seconds':>9}  {'fate':<8}  program")
    for s, done, pid, call in rows[:args.top]:
        print(f"{s:9.3f}  {'ok' if done else 'timeout':<8}  {pid}  {call[:60]}")
    print(f"\nslowest program that finished: {summary['slowest_finished_seconds']} s; "
          f"margin to the {limit} s limit: {summary['margin']}x")
    print(f"at risk (their fate changes on a machine {args.factor:g}x slower or faster): "
          f"{len(risky)}" + "".join(f"\n  {r[0]:.3f} s  {r[2]}" for r in risky))


if __name__ == "__main__":
    main()
