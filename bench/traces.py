"""Traces per second: our sandboxed fork-server tracer vs a process per program.

    .venv/bin/python bench/traces.py [--programs 3000] [--per-process 60] [--workers 2]

Programs: real small functions of the standard library (colorsys, bisect, heapq, textwrap,
fnmatch, ...) with generated inputs, from the traces stage's own program generator. In one run:
  ours          stages.trace_runner.trace_requests: W sandboxed fork servers, batched forks,
                the programs of a batch in one process (--isolation shared, the default's
                traces.isolation) and, as a second row, each in its own (process)
  python        a fresh, UNsandboxed `python` per program running the same tracer (W parallel)
  bwrap+python  the sandbox's run_command (bwrap + python) per program (W parallel)
Prints a table (traces/s, and ours / each baseline) and JSON with --json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from codeworld.config import TraceLimitsConfig, TracesConfig  # noqa: E402
from codeworld.sandbox import Limits, run_command  # noqa: E402
from codeworld.sandbox.bwrap import python_install  # noqa: E402
from stages.programs import iter_programs  # noqa: E402
from stages.trace_runner import TRACER_DIR, trace_requests  # noqa: E402

MODULES = ("colorsys", "bisect", "heapq", "textwrap", "fnmatch", "posixpath", "shlex", "base64",
           "calendar", "statistics", "string", "html/__init__", "json/encoder", "difflib")
ONE = ("import json, sys; sys.path.insert(0, {lib!r}); from cwtrace.worker import handle; "
       "print(json.dumps(handle(json.loads(sys.argv[1]))))")


def programs(n: int) -> list[dict]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    records = [{"id": m, "text": (lib / f"{m}.py").read_text()} for m in MODULES]
    cases = list(itertools.islice(iter_programs(records, seed=7, max_inputs_per_function=6), n))
    reps = (cases * (n // max(1, len(cases)) + 1))[:n]
    return [{"id": f"{c.id}#{i}", "code": c.code, "call": c.call} for i, c in enumerate(reps)]


def per_process(reqs: list[dict], workers: int, sandboxed: bool, lib_parent: Path) -> float:
    def one(req: dict) -> None:
        if sandboxed:
            code = ONE.format(lib="/sandbox/lib")
            res = run_command([python_install()[0], "-c", code, json.dumps(req)],
                              limits=Limits(wall_seconds=10),
                              extra_ro_binds=[(str(TRACER_DIR), "/sandbox/lib/cwtrace")])
            assert res.returncode == 0, res.stderr[-500:]
        else:
            subprocess.run([sys.executable, "-c", ONE.format(lib=str(lib_parent)), json.dumps(req)],
                           capture_output=True, check=True)

    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, reqs))
    return len(reqs) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--programs", type=int, default=3000)
    ap.add_argument("--per-process", type=int, default=60, help="programs for the baselines")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--batch-size", type=int, default=TracesConfig().batch_size)
    ap.add_argument("--isolation", choices=("shared", "process"), default="shared",
                    help="ours: params traces.isolation (the other mode is measured too)")
    ap.add_argument("--wall", type=float, default=TraceLimitsConfig().wall_seconds,
                    help="wall/CPU seconds per program (params traces.limits)")
    ap.add_argument("--json")
    args = ap.parse_args()
    reqs = programs(args.programs)
    limits = TraceLimitsConfig(wall_seconds=args.wall, cpu_seconds=args.wall)
    t = time.perf_counter()
    out = trace_requests(reqs, limits, args.workers, args.batch_size, too_long_text=False,
                         isolation=args.isolation)  # as the stage
    ours = len(reqs) / (time.perf_counter() - t)
    other = "process" if args.isolation == "shared" else "shared"
    t = time.perf_counter()
    trace_requests(reqs, limits, args.workers, args.batch_size, too_long_text=False,
                   isolation=other)
    other_rate = len(reqs) / (time.perf_counter() - t)
    statuses: dict = {}
    for r in out:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    # the baselines need `cwtrace` importable: a folder holding a link named cwtrace
    link_dir = ROOT / ".bench-cwtrace"
    link_dir.mkdir(exist_ok=True)
    if not (link_dir / "cwtrace").exists():
        (link_dir / "cwtrace").symlink_to(TRACER_DIR)
    few = reqs[: args.per_process]
    python = per_process(few, args.workers, False, link_dir)
    bwrap = per_process(few, args.workers, True, link_dir)
    rows = [("ours (sandboxed fork server)", ours), (f"ours, isolation {other}", other_rate),
            ("python per program", python), ("bwrap + python per program", bwrap)]
    print(f"{len(reqs)} programs ({len(few)} for the per-process baselines), workers={args.workers}, "
          f"batch={args.batch_size}, isolation={args.isolation}, cpus={os.cpu_count()}; "
          f"statuses {statuses}")
    print(f"{'method':32} {'traces/s':>10} {'ours / this':>12}")
    for name, rate in rows:
        print(f"{name:32} {rate:10.1f} {ours / rate:12.1f}")
    print(f"target: >= 1,500 traces/s sandboxed -> {'MET' if ours >= 1500 else 'NOT MET'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"programs": len(reqs), "statuses": statuses,
                                               "traces_per_second": dict(rows)}, indent=2))


if __name__ == "__main__":
    main()
