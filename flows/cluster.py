"""`make cluster` / `make cluster-stop`: a local Dask cluster on loopback to try
`executor.kind: dask` -- a scheduler and two single-threaded workers, started from the
repository root (so a relative storage root such as `data` means the same folder to them).

    python -m flows.cluster start [--port 8786] [--workers 2]
    python -m flows.cluster stop
    python -m flows.cluster status

Runtime files in .cluster/: NAME.pid (pid and start time of each process started here) and
NAME.log. `stop` stops exactly those processes (the start time is checked, so a reused pid is
left alone), as `make serve-stop` does. Single-threaded workers: the jobs are pure-Python CPU
work, so a second thread in the same process would only wait for the GIL; run more workers
instead (`--workers`), or on other machines `dask worker tcp://HOST:PORT --nthreads 1`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from codeworld.tracking import repo_root
from flows.serve import BIN, _free, _running, _start, running_on, status_named, stop_named

RUN_DIR = ".cluster"


def _names(run_dir: Path) -> list[str]:
    """Processes recorded here, the scheduler first (and stopped last)."""
    workers = sorted(p.stem for p in run_dir.glob("worker-*.pid"))
    return ["scheduler", *workers]


def start(root: Path, port: int, workers: int, timeout: float = 120) -> str:
    run_dir = root / RUN_DIR
    run_dir.mkdir(exist_ok=True)
    address = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if running_on(run_dir, "scheduler", port, "CLUSTER_PORT") is None:
        if not _free(port):
            raise SystemExit(f"scheduler: port {port} on 127.0.0.1 is taken (choose another: "
                             f"make cluster CLUSTER_PORT=...)")
        _start(run_dir, "scheduler", [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1",
                                      "--port", str(port), "--no-dashboard"], env, root)
    for k in range(1, workers + 1):
        name = f"worker-{k}"
        if _running(run_dir, name) is None:
            _start(run_dir, name, [str(BIN / "dask"), "worker", address, "--host", "127.0.0.1",
                                   "--nthreads", "1", "--name", name, "--no-dashboard"], env, root)
    n = _wait(address, workers, run_dir, timeout)
    print(f"Dask scheduler {address} with {n} workers (logs and pids in {run_dir}/)\n"
          f"use it: executor: {{kind: dask, address: {address}}} in params.yaml")
    return address


def _wait(address: str, workers: int, run_dir: Path, timeout: float) -> int:
    from distributed import Client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in _names(run_dir):
            if _running(run_dir, name) is None:
                log = run_dir / f"{name}.log"
                raise SystemExit(f"{name} exited; see {log}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with Client(address, timeout=5, set_as_default=False) as client:
                client.wait_for_workers(workers, timeout=max(1.0, deadline - time.monotonic()))
                return len(client.scheduler_info(n_workers=-1)["workers"])
        except (OSError, TimeoutError):
            time.sleep(0.5)
    raise SystemExit(f"the cluster at {address} did not have {workers} workers within "
                     f"{timeout:.0f}s; see {run_dir}/*.log")


def stop(root: Path, grace: float = 20) -> None:
    """Stop the processes of our pid files (and their children: a worker's nanny forks the
    worker process), workers first."""
    run_dir = root / RUN_DIR
    stop_named(run_dir, reversed(_names(run_dir)) if run_dir.is_dir() else (), grace)


def status(root: Path) -> int:
    run_dir = root / RUN_DIR
    return status_named(run_dir, _names(run_dir) if run_dir.is_dir() else ["scheduler"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["start", "stop", "status"])
    p.add_argument("--root", default=None, help="the workspace (default: this repository)")
    p.add_argument("--port", type=int, default=8786)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    root = Path(args.root).resolve() if args.root else repo_root()
    if args.command == "start":
        start(root, args.port, args.workers)
        return 0
    if args.command == "stop":
        stop(root)
        return 0
    return status(root)


if __name__ == "__main__":
    sys.exit(main())
