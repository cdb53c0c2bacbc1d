"""Per-request overhead of the sandbox: fork server vs a fresh interpreter per request.

    .venv/bin/python bench/sandbox_overhead.py [--requests 3000] [--workers 2] [--batch-size 16]

Measures, in one run and with the same trivial handler (sum of a short list):
  forkserver   map_requests(..., workers=W): W sandboxed fork servers, one request at a time
               (each in namespaces of its own: a relay, an init and the request's process,
               three forks of the server)
  forkserver_batchK  the same with batch_size=K (one fork per K requests)
  forkserver1  one ForkServer, sequential .call()s
  python-c     a fresh, UNsandboxed `python -c` per request (W in parallel): the floor
               of any process-per-request design
  bwrap+python run_command (bwrap + python) per request (W in parallel)
  bwrap_python_no_memcg  the same without the sandbox's memory cgroup
               (CODEWORLD_SANDBOX_MEMCG=off): what the cgroup costs a command
and prints requests/s as JSON. Startup of the fork servers is included in "forkserver".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codeworld.sandbox import ForkServer, Limits, map_requests, run_command  # noqa: E402

HANDLER = "def total(req):\n    return {'sum': sum(req['xs']), 'id': req['id']}\n"
CODE = "import json,sys; r=json.loads(sys.argv[1]); print(json.dumps({'sum': sum(r['xs'])}))"


def rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--per-process-requests", type=int, default=60)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    limits = Limits(wall_seconds=10)
    out: dict = {"cpus": os.cpu_count(), "workers": args.workers}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "bench_handler.py").write_text(HANDLER)
        code_dirs = {"/sandbox/lib/bench_handler.py": str(Path(tmp) / "bench_handler.py")}
        reqs = [{"xs": list(range(i % 50)), "id": i} for i in range(args.requests)]

        t0 = time.perf_counter()
        res = map_requests(reqs, "bench_handler:total", workers=args.workers,
                           code_dirs=code_dirs, limits=limits)
        dt = time.perf_counter() - t0
        assert all(r.ok for r in res) and [r.response["id"] for r in res] == list(range(len(reqs)))
        out["forkserver_rps"] = rate(len(reqs), dt)

        t0 = time.perf_counter()
        res = map_requests(reqs, "bench_handler:total", workers=args.workers,
                           batch_size=args.batch_size, code_dirs=code_dirs, limits=limits)
        dt = time.perf_counter() - t0
        assert [r.response["id"] for r in res] == list(range(len(reqs)))
        out[f"forkserver_batch{args.batch_size}_rps"] = rate(len(reqs), dt)

        n1 = max(1, args.requests // 2)
        with ForkServer("bench_handler:total", code_dirs, limits) as server:
            t0 = time.perf_counter()
            for r in reqs[:n1]:
                assert server.call(r).ok
            out["forkserver1_rps"] = rate(n1, time.perf_counter() - t0)

        small = reqs[: args.per_process_requests]

        def fresh_python(r):
            p = subprocess.run([sys.executable, "-c", CODE, json.dumps(r)], capture_output=True)
            assert p.returncode == 0

        def bwrap_python(r):
            c = run_command(["python3", "-c", CODE, json.dumps(r)], limits=limits)
            assert c.returncode == 0, c

        memcg_mode = os.environ.get("CODEWORLD_SANDBOX_MEMCG")
        for name, fn, mode in (("python_c_rps", fresh_python, memcg_mode),
                               ("bwrap_python_rps", bwrap_python, memcg_mode),
                               ("bwrap_python_no_memcg_rps", bwrap_python, "off")):
            if mode is not None:
                os.environ["CODEWORLD_SANDBOX_MEMCG"] = mode
            with ThreadPoolExecutor(args.workers) as pool:
                t0 = time.perf_counter()
                list(pool.map(fn, small))
                out[name] = rate(len(small), time.perf_counter() - t0)
        if memcg_mode is None:
            os.environ.pop("CODEWORLD_SANDBOX_MEMCG", None)
        out["memcg_ms_per_command"] = round(
            1000 * args.workers * (1 / out["bwrap_python_rps"] - 1 / out["bwrap_python_no_memcg_rps"]), 1)
    out["speedup_vs_python_c"] = round(out["forkserver_rps"] / out["python_c_rps"], 1)
    out["speedup_vs_bwrap_python"] = round(out["forkserver_rps"] / out["bwrap_python_rps"], 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
