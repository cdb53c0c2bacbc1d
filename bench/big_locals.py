"""Tracing cost of large locals: traced / untraced time, before and after a change.

    .venv/bin/python bench/big_locals.py [--before PATH] [--n 100000] [--json]

Each program holds one large local (a set, a dict holding a list, a deque, a list of lists,
a Counter, a list of objects with a __repr__ of their own) through a 200-iteration loop, so the
tracer writes that local at ~600 frames while keeping ~200 characters of it
(stages/tracer/prefix.py). Prints, per program, the untraced time and the traced time as a
ratio against it, for this checkout and, with --before, for the checkout at PATH (run in a
subprocess with PATH first on sys.path, e.g. a worktree of main).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LOOP = "    t = 0\n    for k in range(200):\n        t += k\n    return t\n"
PROGRAMS = {
    "set of ints": "def f(n):\n    d = set(range(n))\n" + LOOP,
    "dict holding a list": "def f(n):\n    d = {'a': list(range(n))}\n" + LOOP,
    "deque of ints": "import collections\ndef f(n):\n    d = collections.deque(range(n))\n" + LOOP,
    "list of lists": "def f(n):\n    d = [[i] for i in range(n)]\n" + LOOP,
    "Counter": "import collections\ndef f(n):\n    d = collections.Counter(range(n))\n" + LOOP,
    "list of objects": ("class P:\n    def __init__(self, i):\n        self.i = i\n"
                        "    def __repr__(self):\n        return f'P({self.i})'\n"
                        "def f(n):\n    d = [P(i) for i in range(n // 10)]\n" + LOOP),
}


def measure(n: int) -> dict[str, dict]:
    from stages.tracer import TraceLimits, trace_call
    limits = TraceLimits(max_events=10**6, max_bytes=10**9)
    rows = {}
    for name, code in PROGRAMS.items():
        ns: dict = {}
        exec(compile(code, "<bench>", "exec"), ns)
        t0 = time.process_time()
        ns["f"](n)
        untraced = time.process_time() - t0
        t0 = time.process_time()
        r = trace_call(code, f"f({n})", limits=limits)
        traced = time.process_time() - t0
        rows[name] = {"untraced_s": untraced, "traced_s": traced, "status": r.status}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", help="checkout to compare with (its root directory)")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON only")
    args = ap.parse_args()
    after = measure(args.n)
    before = None
    if args.before:
        env = {**os.environ, "PYTHONPATH": os.path.abspath(args.before)}
        out = subprocess.run([sys.executable, "-c", "import json, sys; sys.path.insert(0, "
                              f"{str(ROOT / 'bench')!r}); import big_locals; "
                              f"print(json.dumps(big_locals.measure({args.n})))"],
                             env=env, cwd=args.before, capture_output=True, text=True, check=True)
        before = json.loads(out.stdout)
    if args.json:
        print(json.dumps({"after": after, "before": before}, indent=1))
        return
    print(f"{'program (n=%d)' % args.n:28s} {'untraced':>9s} {'before':>16s} {'after':>16s}")
    for name, row in after.items():
        base = max(row["untraced_s"], 1e-4)
        cells = []
        for r in (before or {}).get(name), row:
            cells.append("-" if r is None else f"{r['traced_s']:.3f}s {r['traced_s'] / base:5.0f}x")
        print(f"{name:28s} {row['untraced_s']:8.4f}s {cells[0]:>16s} {cells[1]:>16s}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
