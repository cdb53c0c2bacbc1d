"""`make serve` / `make serve-stop`: a Prefect server, an MLflow tracking server and the served
pipeline deployments, in the background on loopback, for this workspace.

    python -m flows.serve start [--prefect-port 4200] [--mlflow-port 5000]
    python -m flows.serve stop
    python -m flows.serve status

Runtime files in .serve/: NAME.pid (pid and start time of each process this started), NAME.log,
and env (`source .serve/env` points prefect and mlflow commands at the servers). MLflow keeps
runs in mlflow.db (SQLite) and artifacts in mlartifacts/; Prefect keeps its database in
.prefect/. `stop` stops exactly the processes named by the pid files (and their children),
checking each one's start time so a reused pid is never signalled.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from codeworld.tracking import repo_root

BIN = Path(sys.executable).parent
NAMES = ("mlflow", "prefect", "deployments")  # started in this order, stopped in reverse


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _running(run_dir: Path, name: str) -> psutil.Process | None:
    """The process recorded in NAME.pid if it still runs (same pid and start time)."""
    f = run_dir / f"{name}.pid"
    if not f.exists():
        return None
    try:
        rec = json.loads(f.read_text())
        proc = psutil.Process(rec["pid"])
        if abs(proc.create_time() - rec["create_time"]) < 0.01:
            return proc
    except (ValueError, KeyError, psutil.Error):
        pass
    return None


def running_on(run_dir: Path, name: str, port: int, make: str) -> psutil.Process | None:
    """The process of NAME.pid if it still runs, on `port`. One started on another port (its
    recorded argv's --port) is a SystemExit naming it: going on would point what is written
    and printed now (.serve/env, the UI addresses, a cluster's address) at a port where nothing
    listens. `make`: the make variable that chooses the port, e.g. SERVE_MLFLOW_PORT."""
    proc = _running(run_dir, name)
    if proc is None:
        return None
    try:
        argv = json.loads((run_dir / f"{name}.pid").read_text()).get("argv") or []
        running = argv[argv.index("--port") + 1]
    except (OSError, ValueError, IndexError, AttributeError):
        return proc   # a record without its command line: nothing to compare
    if running != str(port):
        stop = "cluster-stop" if make.startswith("CLUSTER") else "serve-stop"
        raise SystemExit(f"{name}: already running on port {running} (pid {proc.pid}), not {port}: "
                         f"use {make}={running}, or `make {stop}` first")
    return proc


def _start(run_dir: Path, name: str, argv: list[str], env: dict, cwd: Path) -> psutil.Process:
    with open(run_dir / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    p = psutil.Process(proc.pid)
    (run_dir / f"{name}.pid").write_text(json.dumps({"pid": proc.pid, "create_time": p.create_time(),
                                                     "argv": argv}))
    return p


def _wait(name: str, proc: psutil.Process, url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            raise SystemExit(f"{name} exited; see {log}:\n{log.read_text(errors='replace')[-3000:]}")
        if _answers(url):
            return
        time.sleep(0.5)
    raise SystemExit(f"{name} did not answer {url} within {timeout:.0f}s; see {log}")


def start(root: Path, prefect_port: int, mlflow_port: int, timeout: float = 300) -> dict:
    run_dir = root / ".serve"
    run_dir.mkdir(exist_ok=True)
    api = f"http://127.0.0.1:{prefect_port}/api"
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    env = dict(os.environ)
    for k in ("PREFECT_API_URL", "PREFECT_PROFILE", "MLFLOW_TRACKING_URI", "CODEWORLD_PARENT_RUN_ID"):
        env.pop(k, None)
    env.update(PREFECT_HOME=str(root / ".prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    servers = {
        "mlflow": ([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                    "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                    "--artifacts-destination", str(root / "mlartifacts")], mlflow_port, f"{mlflow_url}/health"),
        "prefect": ([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                    prefect_port, f"{api}/health"),
    }
    procs = {}
    for name, (argv, port, health) in servers.items():
        if proc := running_on(run_dir, name, port, f"SERVE_{name.upper()}_PORT"):
            print(f"{name}: already running (pid {proc.pid})")
            continue
        if not _free(port):
            raise SystemExit(f"{name}: port {port} on 127.0.0.1 is taken (choose another, e.g. "
                             f"make serve SERVE_{name.upper()}_PORT=...)")
        procs[name] = (_start(run_dir, name, argv, env, root), health)
    for name, (proc, health) in procs.items():
        _wait(name, proc, health, run_dir / f"{name}.log", timeout)
        print(f"{name}: up (pid {proc.pid})")
    if proc := _running(run_dir, "deployments"):
        print(f"deployments: already served (pid {proc.pid})")
    else:
        denv = dict(env, PREFECT_API_URL=api, MLFLOW_TRACKING_URI=mlflow_url)
        proc = _start(run_dir, "deployments", [sys.executable, "-m", "flows.deploy", "serve", "--root", str(root)],
                      denv, root)
        _wait_deployments(proc, api, run_dir / "deployments.log", timeout)
        print(f"deployments: served (pid {proc.pid})")
    (run_dir / "env").write_text(f"export PREFECT_API_URL={api}\nexport MLFLOW_TRACKING_URI={mlflow_url}\n")
    print(f"\nPrefect UI  http://127.0.0.1:{prefect_port}    (API {api})\n"
          f"MLflow UI   {mlflow_url}\n"
          f"logs and pids in {run_dir}/; `source .serve/env` for the prefect and mlflow CLIs")
    return {"prefect": api, "mlflow": mlflow_url}


def _wait_deployments(proc: psutil.Process, api: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            raise SystemExit(f"deployments exited; see {log}:\n{log.read_text(errors='replace')[-3000:]}")
        if "deployments are being served" in log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise SystemExit(f"deployments not served within {timeout:.0f}s; see {log}")


def stop_named(run_dir: Path, names, grace: float = 20) -> None:
    """Stop the processes of these pid files in `run_dir`, in this order, each with its
    children (terminate, then kill after `grace` seconds); the pid files are removed."""
    for name in names:
        proc = _running(run_dir, name)
        if proc is None:
            print(f"{name}: not running")
        else:
            family = [proc]
            with contextlib.suppress(psutil.Error):
                family += proc.children(recursive=True)
            for p in family:
                with contextlib.suppress(psutil.Error):
                    p.terminate()
            _, alive = psutil.wait_procs(family, timeout=grace)
            for p in alive:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            psutil.wait_procs(alive, timeout=5)
            print(f"{name}: stopped (pid {proc.pid})")
        (run_dir / f"{name}.pid").unlink(missing_ok=True)


def status_named(run_dir: Path, names) -> int:
    """Print which of these processes run; 0 when all of them do."""
    up = 0
    for name in names:
        proc = _running(run_dir, name)
        print(f"{name}: {'running (pid %d)' % proc.pid if proc else 'not running'}")
        up += proc is not None
    return 0 if up == len(names) else 1


def stop(root: Path, grace: float = 20) -> None:
    stop_named(root / ".serve", reversed(NAMES), grace)


def status(root: Path) -> int:
    return status_named(root / ".serve", NAMES)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["start", "stop", "status"])
    p.add_argument("--root", default=None, help="the workspace (default: this repository)")
    p.add_argument("--prefect-port", type=int, default=4200)
    p.add_argument("--mlflow-port", type=int, default=5000)
    args = p.parse_args(argv)
    root = Path(args.root).resolve() if args.root else repo_root()
    if args.command == "start":
        start(root, args.prefect_port, args.mlflow_port)
        return 0
    if args.command == "stop":
        stop(root)
        return 0
    return status(root)


if __name__ == "__main__":
    sys.exit(main())
