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


def start_run(name: str, experiment: str, tags: dict[str, str]):
    """An MLflow run in `experiment` at tracking_uri(), tagged with the git commit."""
    import mlflow

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

            mlflow.log_dict(obj, name)

    def __exit__(self, exc_type, exc, tb) -> None:
        self.metrics["seconds_total"] = round(time.perf_counter() - self._t0, 3)
        if self.metrics_path and exc is None:
            body = json.dumps(self.metrics, indent=2, sort_keys=True).encode() + b"\n"
            write_atomic(filesystem(self.metrics_path), self.metrics_path, body)
        if self.track:
            import mlflow

            numeric = {k: float(v) for k, v in self.metrics.items() if isinstance(v, (int, float))}
            mlflow.log_metrics(numeric)
            if exc is not None:
                mlflow.set_tag("codeworld.error", f"{exc_type.__name__}: {exc}"[:5000])
            mlflow.end_run(status="FAILED" if exc is not None else "FINISHED")
