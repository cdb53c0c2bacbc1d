"""Stage run tracking: params, counts and timings to MLflow, and metrics/<stage>.json for DVC.

The tracking URI is MLFLOW_TRACKING_URI when set, else sqlite:///<repo>/mlflow.db. A stage
started by the pipeline flow becomes a child of the flow's run (CODEWORLD_PARENT_RUN_ID).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from codeworld.storage import write_file_atomic

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


def log_close(client, run_id: str, close: dict) -> None:
    """A stage run's closing metrics and tags (`close`, StageRun's) to MLflow; each metric at
    step 0 and the close's end time, so that sending them twice leaves one point."""
    from mlflow.entities import Metric, RunTag

    client.log_batch(run_id, metrics=[Metric(k, v, close["end_time"], 0)
                                      for k, v in close["metrics"].items()],
                     tags=[RunTag(k, v) for k, v in close["tags"].items()])


def close_run(uri: str, run_id: str, close: dict) -> None:
    """End a run that a tracking server outage kept open (StageRun's on_unclosed) as its stage
    ended it: its metrics and tags, then its status and end time."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    log_close(client, run_id, close)
    client.set_terminated(run_id, close["status"], close["end_time"])


# What the tracking server missed, kept in a JSON file for later, oldest first: entries
# {"run_id", "tracking_uri", "close"} (a run's close, close_run ends the run with it), and in a
# training phase's file also {"run_id", "tracking_uri", "first", "last"} (step rows,
# model/metrics). One file format and one sending loop (send_pending) for every stage.

def read_pending(path: Path) -> list[dict]:
    """The entries kept in `path`; none when it does not exist. ValueError naming it when it
    cannot be read as such."""
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except ValueError as err:
        raise ValueError(f"{path}: unreadable ({err})") from None
    return entries if isinstance(entries, list) else []


def write_pending(path: Path, entries: list[dict]) -> None:
    """`entries` to `path` atomically; no entries: no file."""
    if not entries:
        path.unlink(missing_ok=True)
        return
    write_file_atomic(path, (json.dumps(entries, sort_keys=True) + "\n").encode())


def keep_close(path: Path, run_id: str, uri: str, close: dict) -> None:
    """Keep the close of MLflow run `run_id` that its tracking server missed (StageRun's
    on_unclosed) after what `path` holds already: send_pending ends the run with it."""
    try:
        entries = read_pending(path)
    except ValueError:
        entries = []   # unreadable: what it said is lost, and the close still worth keeping
    write_pending(path, entries + [{"run_id": run_id, "tracking_uri": uri, "close": close}])


def send_pending(path: Path, send_steps: Callable[[dict], None] | None = None,
                 uri: str | None = None) -> list[dict]:
    """Send MLflow the entries of `path` in order (only those of tracking server `uri` when
    given), each dropped from the file once it is in: step entries through `send_steps`,
    closes through close_run. Returns the closes sent. MLflow's errors are raised, the entry
    kept (tracking_server tells an outage from others)."""
    closed = []
    while todo := [e for e in read_pending(path) if uri is None or e.get("tracking_uri") == uri]:
        entry = todo[0]
        if "first" in entry:
            if send_steps is None:
                raise ValueError(f"{path}: holds training steps (run {entry['run_id']}): send "
                                 "them with the phase's steps file (codeworld send-steps)")
            send_steps(entry)
        if "close" in entry:
            close_run(entry["tracking_uri"], entry["run_id"], entry["close"])
            closed.append(entry)
        left = read_pending(path)
        left.remove(entry)   # this one only: an equal entry after it is sent in its turn
        write_pending(path, left)
    return closed


# The closes of the stages' runs other than the training phases' (whose wait behind their
# unsent steps, in the phase's folder): beside the default sqlite store, at the repository
# root where the stages run (dvc.yaml's wdir).
STAGE_CLOSES = "mlflow.unclosed.json"


def stage_closes_path() -> Path:
    return repo_root() / STAGE_CLOSES


@contextmanager
def _stage_closes_locked() -> Iterator[Path]:
    """The stage closes file, locked: two stages (two `codeworld stage` processes) never read
    and rewrite it at once, nor send one close twice."""
    import fcntl

    path = stage_closes_path()
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield path


def keep_stage_close(run_id: str, uri: str, close: dict) -> None:
    """StageRun's default on_unclosed: the close waits in stage_closes_path() for the next
    stage run on that tracking server (StageRun.__enter__) or `codeworld send-steps`."""
    with _stage_closes_locked() as path:
        keep_close(path, run_id, uri, close)


def send_stage_closes(uri: str | None = None) -> list[dict]:
    """End the runs whose closes keep_stage_close kept (of tracking server `uri` when given);
    the closes sent. Raised as send_pending's."""
    if not stage_closes_path().exists():   # (the common case: no lock file made)
        return []
    with _stage_closes_locked() as path:
        closed = send_pending(path, uri=uri)
    for c in closed:
        log.warning("%s: closed MLflow run %s as %s (its tracking server missed the close)",
                    path.name, c["run_id"], c["close"]["status"])
    return closed


# (run_id, tracking_uri, close): keeps a close the server could not take for later (close_run)
Unclosed = Callable[[str, str, dict], None]


class StageRun:
    """One run of a stage. Use as a context manager; metrics written on success and failure.
    A run that the tracking server's outage keeps from closing has its close kept for later
    by `on_unclosed`: by default in stage_closes_path(), sent when the next stage run starts
    on that server (the training phases keep theirs behind their unsent steps:
    model/metrics.close_later). None: the run stays RUNNING in MLflow."""

    def __init__(self, stage: str, params: dict, experiment: str = "codeworld",
                 metrics_path: str | None = None, track: bool = True,
                 on_unclosed: Unclosed | None = keep_stage_close):
        self.stage = stage
        self.params = params
        self.experiment = experiment
        self.metrics_path = metrics_path
        self.track = track
        self.on_unclosed = on_unclosed
        self.metrics: dict[str, float | int] = {}
        self.run_id: str | None = None
        self.uri: str | None = None
        self._t0 = 0.0

    def __enter__(self) -> "StageRun":
        self._t0 = time.perf_counter()
        if self.track:
            import mlflow

            tags = {"codeworld.stage": self.stage}
            if parent := os.environ.get(PARENT_ENV):
                tags["mlflow.parentRunId"] = parent
            self.run_id = start_run(self.stage, self.experiment, tags).info.run_id
            self.uri = mlflow.get_tracking_uri()
            self._send_kept_closes()
            params = flatten(self.params)
            try:
                with tracking_server():
                    # MLflow caps a param value's length; long lists are still in the artifact.
                    mlflow.log_params({k: v[:6000] for k, v in params.items()})
                    mlflow.log_dict(self.params, "params.json")
            except BaseException:
                # the run exists: closed as failed (or its close kept), not left RUNNING and
                # active here, as no `with` body ran to reach __exit__
                self.__exit__(*sys.exc_info())
                raise
        return self

    def _send_kept_closes(self) -> None:
        """The server answers again: end the runs of earlier stages whose close it missed.
        Never this stage's failure: a close it cannot take yet stays kept, with a warning."""
        try:
            with tracking_server():
                send_stage_closes(self.uri)
        except (TrackingUnavailable, ValueError, OSError) as err:
            log.warning("%s: earlier runs' closes not sent yet: %s", self.stage, err)
        except Exception as err:   # MLflow refused one (a run deleted since): said, kept
            log.warning("%s: MLflow refused an earlier run's kept close (%s: %s); remove %s "
                        "to give the kept closes up", self.stage, type(err).__name__, err,
                        stage_closes_path())

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
            write_file_atomic(self.metrics_path, body)
        if self.track:
            close = {"status": "FAILED" if exc is not None else "FINISHED",
                     "end_time": int(time.time() * 1000),
                     "metrics": {k: float(v) for k, v in self.metrics.items()
                                 if isinstance(v, (int, float))},
                     "tags": {} if exc is None else
                     {"codeworld.error": f"{exc_type.__name__}: {exc}"[:5000]}}
            try:
                self._finish_run(close)
            except TrackingUnavailable as err:
                kept = self._keep_close(close)
                if exc is None:
                    raise
                # the stage's own error is what to fix; the server being down is secondary
                log.warning("%s: run not closed in MLflow%s: %s", self.stage,
                            " (its close kept for later)" if kept else "", err)

    def _finish_run(self, close: dict) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        with tracking_server():
            try:
                log_close(MlflowClient(self.uri), self.run_id, close)
            finally:
                # even when logging failed: end_run takes the run off this process's stack
                # before it calls the server, so no run stays active here
                mlflow.end_run(status=close["status"])

    def _keep_close(self, close: dict) -> bool:
        """Hand the close the server missed to on_unclosed; whether it took it. Its failure
        (a disk error) is a warning: the stage's outcome is what the caller sees."""
        if self.on_unclosed is None:
            return False
        try:
            self.on_unclosed(self.run_id, self.uri, close)
        except OSError as err:
            log.warning("%s: the close of MLflow run %s not kept: %s", self.stage, self.run_id, err)
            return False
        return True
