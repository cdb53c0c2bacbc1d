"""Real servers on loopback for the integration tests (a helper module, not a test module).

Each context manager starts the server as a subprocess (in a session of its own, so a Ctrl-C
meant for pytest does not reach it) on a free port, waits until it answers over HTTP, yields its
URL, and always stops it and its descendants (terminate, then kill) on the way out. Nothing
global (environment, working directory) is changed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Iterator

import psutil

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(log: IO[bytes], limit: int = 4000) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-limit:]


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a process started by these tests (a server, a flow) through its own Popen handle:
    terminate, wait, then kill. Its descendants (`mlflow server` runs uvicorn as a child, a flow
    its temporary Prefect server) are found while the leader is still alive and stopped the same
    way, each through a psutil handle (which checks the process's creation time, so a reused
    pid is never signalled)."""
    children: list[psutil.Process] = []
    if proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(proc.pid).children(recursive=True)
        proc.terminate()
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    _, alive = psutil.wait_procs(children, timeout=grace)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(alive, timeout=5)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


@contextlib.contextmanager
def _serve(name: str, argv_for_port, probe_path: str, env: dict | None, startup_timeout: float,
           log: IO[bytes], attempts: int = 3) -> Iterator[str]:
    """Start `argv_for_port(port)`, wait until GET probe_path answers 200, yield the base URL.
    A server that exits before answering (port taken by a racing process) is retried on
    another port."""
    last = ""
    for _ in range(attempts):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(argv_for_port(port), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + startup_timeout
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                if _answers(url + probe_path):
                    break
                time.sleep(0.25)
            if proc.poll() is not None:
                last = f"{name} exited with {proc.returncode} before answering:\n{_tail(log)}"
                continue
            if not _answers(url + probe_path):
                raise RuntimeError(f"{name} did not answer {url}{probe_path} within "
                                   f"{startup_timeout:.0f}s:\n{_tail(log)}")
            yield url
            return
        finally:
            stop_process(proc)
    raise RuntimeError(last)


@contextlib.contextmanager
def moto_server(startup_timeout: float = 60.0) -> Iterator[str]:
    """A moto S3 (all services) server; yields its endpoint URL, e.g. http://127.0.0.1:PORT."""
    with tempfile.TemporaryFile(prefix="moto-server-") as log:
        with _serve("moto server",
                    lambda port: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                    "/", None, startup_timeout, log) as url:
            yield url


@contextlib.contextmanager
def mlflow_server(tmpdir: str | os.PathLike, startup_timeout: float = 180.0) -> Iterator[str]:
    """An MLflow tracking server with a SQLite backend and proxied artifacts under tmpdir.

    The server only binds 127.0.0.1 and clients use http://127.0.0.1:PORT, which MLflow 3's
    host-header middleware allows by default (localhost and private addresses). Its job
    execution feature (huey consumers) is switched off: nothing here uses it and it would
    cost processes on a small machine."""
    tmp = Path(tmpdir)
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env.pop("MLFLOW_TRACKING_URI", None)

    def argv(port: int) -> list[str]:
        return [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                "--workers", "1",
                "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                "--artifacts-destination", str(tmp / "artifacts")]

    with open(tmp / "server.log", "w+b") as log:
        with _serve("mlflow server", argv, "/health", env, startup_timeout, log) as url:
            yield url


@contextlib.contextmanager
def prefect_server(tmpdir: str | os.PathLike, startup_timeout: float = 180.0) -> Iterator[str]:
    """A `prefect server start` (SQLite database, PREFECT_HOME under tmpdir) without its UI;
    yields its API URL, http://127.0.0.1:PORT/api, for PREFECT_API_URL.

    Its background services (scheduler, late-runs marker, ...) run as in production; analytics
    are off. The environment of this process is not changed: pass the URL on explicitly."""
    tmp = Path(tmpdir)
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for k in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_API_KEY"):
        env.pop(k, None)
    env.update(PREFECT_HOME=str(tmp / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false", PREFECT_SERVER_UI_ENABLED="false")

    def argv(port: int) -> list[str]:
        return [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                "--no-ui"]

    with open(tmp / "server.log", "w+b") as log:
        with _serve("prefect server", argv, "/api/health", env, startup_timeout, log) as url:
            yield url + "/api"
