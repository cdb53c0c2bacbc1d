"""The traces stage's wall-clock limit is a safety net: runaway Python code stops at a count
(max_events), the same on every machine, and only work that never reaches a traced line meets
the clock. bench/trace_margin.py measures how far the programs run from that limit."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import trace_margin  # noqa: E402

from codeworld.config import TraceLimitsConfig  # noqa: E402
from stages.trace_runner import sandbox_results  # noqa: E402


def test_at_risk_is_the_band_a_factor_around_the_limit():
    assert trace_margin.at_risk(0.2, 0.5, 10) and trace_margin.at_risk(4.9, 0.5, 10)
    assert not trace_margin.at_risk(0.04, 0.5, 10)   # 10x slower still finishes
    assert not trace_margin.at_risk(5.0, 0.5, 10)    # cut at the raised limit: times out anywhere


def test_a_python_loop_stops_at_its_event_count_not_at_the_clock():
    loop = {"id": "loop", "code": "def f():\n    while True:\n        pass\n", "call": "f()"}
    quick = {"id": "quick", "code": "def g(x):\n    return x + 1\n", "call": "g(1)"}
    limits = TraceLimitsConfig(wall_seconds=120, cpu_seconds=120, max_events=2000)
    results = sandbox_results([loop, quick], limits, workers=1, batch_size=1)
    assert [r.response["id"] for r in results] == ["loop", "quick"]
    assert [r.status for r in results] == ["ok", "ok"]
    assert [r.response["status"] for r in results] == ["too_long", "ok"]
    assert results[0].wall_seconds < 60   # stopped by the count, far before the clock


def test_work_that_reaches_no_traced_line_meets_the_clock():
    # one C-level call (a sum over 10^12 integers) never returns to a traced line
    spin = {"id": "spin", "code": "def f():\n    return sum(range(10**12))\n", "call": "f()"}
    limits = TraceLimitsConfig(wall_seconds=0.5, cpu_seconds=0.5)
    [res] = sandbox_results([spin], limits, workers=1, batch_size=1)
    assert res.status in ("timeout", "killed")   # the wall clock, or the CPU rlimit first
