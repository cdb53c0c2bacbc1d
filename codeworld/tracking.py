"""Stage run tracking: params, counts and timings to MLflow, and metrics/<stage>.json for DVC.

The tracking URI is MLFLOW_TRACKING_URI when set, else sqlite:///<repo>/mlflow.db. A stage
started by the pipeline flow becomes a child of the flow's run (CODEWORLD_PARENT_RUN_ID).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from codeworld.storage import filesystem, write_atomic

PARENT_ENV = "CODEWORLD_PARENT_RUN_ID"
log = logging.getLogger(__name__)


def repo_root(start: Path | None = None) -> Path:
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "dvc.yaml").exists() or (d / ".git").exists():
            return d
    return here


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI page of a run when the tracking URI is an MLflow server (http[s]), else None."""
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class TrackingUnavailable(ConnectionError):
    """The MLflow tracking server did not answer, after MLflow's own HTTP retries
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES): an outage, so the CLI exits 75 (a ConnectionError) and
    the flow retries the stage, instead of a traceback and exit 1 that is never retried."""


def _outage(err: BaseException) -> BaseException | None:
    """The innermost error of `err`'s chain when the chain shows a tracking server that could
    not be reached or kept failing (refused, timed out, 5xx after the retries), else None.
    MLflow raises a plain MlflowException for these, the requests error only its context."""
    import requests

    outage = (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError,
              ConnectionError, TimeoutError)
    found, seen = False, set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        # a certificate problem is a setting to fix, not an outage (SSLError is a ConnectionError)
        if isinstance(err, outage) and not isinstance(err, requests.exceptions.SSLError):
            found = True
        last, err = err, err.__cause__ or err.__context__
    return last if found else None


@contextmanager
def tracking_server() -> Iterator[None]:
    """Re-raise a failure to reach the tracking server as TrackingUnavailable: one line naming
    the tracking URI and why (the MLflow error is its cause)."""
    try:
        yield
    except TrackingUnavailable:
        raise
    except Exception as err:
        if (root := _outage(err)) is None:
            raise
        raise TrackingUnavailable(
            f"MLflow tracking server {tracking_uri()} unreachable: {root} (start it, or point "
            "MLFLOW_TRACKING_URI at a running one)") from err


def start_run(name: str, experiment: str, tags: dict[str, str]):
    """An MLflow run in `experiment` at tracking_uri(), tagged with the git commit;
    TrackingUnavailable when the tracking server cannot be reached."""
    import mlflow

    with tracking_server():
        mlflow.set_tracking_uri(tracking_uri())
        mlflow.set_experiment(experiment)
        if commit := git_commit():
            tags = {**tags, "git.commit": commit}
        return mlflow.start_run(run_name=name, tags=tags)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, f"{key}."))
        else:
            flat[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return flat


class StageRun:
    """One run of a stage. Use as a context manager; metrics written on success and failure."""

    def __init__(self, stage: str, params: dict, experiment: str = "codeworld",
                 metrics_path: str | None = None, track: bool = True):
        self.stage = stage
        self.params = params
        self.experiment = experiment
        self.metrics_path = metrics_path
        self.track = track
        self.metrics: dict[str, float | int] = {}
        self.run_id: str | None = None
        self._t0 = 0.0

    def __enter__(self) -> "StageRun":
        self._t0 = time.perf_counter()
        if self.track:
            import mlflow

            tags = {"codeworld.stage": self.stage}
            if parent := os.environ.get(PARENT_ENV):
                tags["mlflow.parentRunId"] = parent
            self.run_id = start_run(self.stage, self.experiment, tags).info.run_id
            params = flatten(self.params)
            with tracking_server():
                # MLflow caps a param value's length; long lists are still in the artifact.
                mlflow.log_params({k: v[:6000] for k, v in params.items()})
                mlflow.log_dict(self.params, "params.json")
        return self

    def log(self, **metrics: float | int) -> None:
        self.metrics.update(metrics)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.metrics[f"seconds_{name}"] = round(time.perf_counter() - t, 3)

    def artifact(self, obj: dict, name: str) -> None:
        if self.track:
            import mlflow

            with tracking_server():
                mlflow.log_dict(obj, name)

    def __exit__(self, exc_type, exc, tb) -> None:
        self.metrics["seconds_total"] = round(time.perf_counter() - self._t0, 3)
        if self.metrics_path and exc is None:
            body = json.dumps(self.metrics, indent=2, sort_keys=True).encode() + b"\n"
            write_atomic(filesystem(self.metrics_path), self.metrics_path, body)
        if self.track:
            try:
                self._finish_run(exc_type, exc)
            except TrackingUnavailable as err:
                if exc is None:
                    raise
                # the stage's own error is what to fix; the server being down is secondary
                log.warning("%s: run not closed in MLflow: %s", self.stage, err)

    def _finish_run(self, exc_type, exc) -> None:
        import mlflow

        with tracking_server():
            try:
                numeric = {k: float(v) for k, v in self.metrics.items() if isinstance(v, (int, float))}
                mlflow.log_metrics(numeric)
                if exc is not None:
                    mlflow.set_tag("codeworld.error", f"{exc_type.__name__}: {exc}"[:5000])
            finally:
                # even when logging failed: end_run takes the run off this process's stack
                # before it calls the server, so no run stays active here
                mlflow.end_run(status="FAILED" if exc is not None else "FINISHED")
