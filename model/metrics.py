"""Per-step training metrics from the one logging rank (its memory figures the maximum over all
ranks): JSON lines (the DVC plot source and the resume record) and MLflow step metrics when the
stage started a run for this phase."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from codeworld.tracking import keep_close, read_pending, send_pending, write_pending

# Peak dense tensor FLOP/s per GPU for the MFU estimate (none on CPU or unknown GPUs), from
# NVIDIA's datasheets. The first entry whose name is in the device's name is used, so the
# PCIe and NVL H100s (lower clocks) come before the SXM one ("NVIDIA H100 80GB HBM3").
PEAK_FLOPS = {("H100 PCIe", "bf16"): 756e12, ("H100 PCIe", "fp8"): 1513e12,
              ("H100 NVL", "bf16"): 835e12, ("H100 NVL", "fp8"): 1671e12,
              ("H100", "bf16"): 989e12, ("H100", "fp8"): 1979e12,
              ("H200", "bf16"): 989e12, ("H200", "fp8"): 1979e12,
              ("A100", "bf16"): 312e12}


def peak_flops(precision: str, name: str | None = None) -> float | None:
    """For this process's GPU, or the one `name` names."""
    if name is None:
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    return next((v for (gpu, p), v in PEAK_FLOPS.items() if gpu in name and p == precision), None)


def memory() -> dict:
    """Peak GPU memory, allocated and reserved, or this process's resident memory on CPU. A CUDA
    graph keeps its activations in a private pool that only the reserved figure counts."""
    if torch.cuda.is_available():
        return {"memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                "memory_reserved_mb": round(torch.cuda.max_memory_reserved() / 2**20, 1)}
    import psutil

    return {"memory_mb": round(psutil.Process().memory_info().rss / 2**20, 1)}


def memory_over_ranks() -> dict:
    """memory()'s figures at their maximum over all ranks (one all_reduce of a few numbers on
    the default process group; every rank calls it): the logging rank's own peak says nothing
    of a pipeline's first stage or a rank with more of the model, which run out first."""
    mine = memory()
    # NCCL reduces device tensors only; gloo reduces host tensors on any machine
    gpu = torch.distributed.get_backend() == "nccl"
    values = torch.tensor(list(mine.values()), dtype=torch.float64,
                          device=torch.cuda.current_device() if gpu else "cpu")
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return {k: round(v, 1) for k, v in zip(mine, values.tolist())}


RUN_ID_ENV = "CODEWORLD_TRAIN_RUN_ID"


def tracking_run_id(out: Path) -> str | None:
    """The phase's MLflow run, which the logging rank logs each step to: from the stage's
    environment on node 0, else from the phase's run.json (on the shared storage root) that
    node 0's stage wrote before its torchrun started. On several nodes the logging rank (the
    last pipeline stage) may be on another node, whose torchrun the stage did not start."""
    if os.environ.get(RUN_ID_ENV):
        return os.environ[RUN_ID_ENV]
    try:
        return json.loads((out / "run.json").read_text()).get("mlflow_run_id")
    except (OSError, ValueError):
        return None


def read_rows(path: Path) -> list[dict]:
    """The step rows of a steps.jsonl; a blank line, or one a killed writer left half written,
    is dropped (that step is trained again on resume)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def unsent_path(steps: Path) -> Path:
    """Beside a steps.jsonl: the step rows the logging rank kept from MLflow (unsent_runs)."""
    return steps.with_name(f"{steps.name}.unsent")


def unsent_runs(steps: Path) -> list[dict]:
    """What of the runs logging to `steps` never reached MLflow, oldest first
    (codeworld.tracking.read_pending): each {"run_id", "tracking_uri", "first", "last"}, its
    rows those of steps first..last (last None: to the end of the file), which a StepLog adds
    when the tracking server goes down; or {"run_id", "tracking_uri", "close"}, the close of a
    stage run the server missed (close_later)."""
    return read_pending(unsent_path(steps))


def _write_unsent(steps: Path, runs: list[dict]) -> None:
    write_pending(unsent_path(steps), runs)   # (its folder made: a close kept before any step)


def close_later(steps: Path, run_id: str, uri: str, close: dict) -> None:
    """Keep the close of MLflow run `run_id` that its tracking server missed (StageRun's
    on_unclosed) behind the run's unsent steps: send_unsent ends the run with it after them."""
    keep_close(unsent_path(steps), run_id, uri, close)


# A row's wall-clock time (ms since the epoch) when the logging rank wrote it: the time of
# its MLflow metrics, sent then or after an outage. A time, not a metric.
TIME = "timestamp_ms"


def step_metrics(row: dict) -> list:
    """A step row's numbers as MLflow metrics at its step and the time it was logged (a row
    written before rows carried it: now)."""
    import time

    from mlflow.entities import Metric

    stamp = row.get(TIME) or int(time.time() * 1000)
    return [Metric(k, float(v), stamp, row["step"]) for k, v in row.items()
            if k not in ("step", TIME) and isinstance(v, (int, float))]


def send_unsent(steps: Path) -> tuple[int, list[dict]]:
    """Send MLflow what unsent_runs names, entry by entry (each to its own run on its own
    tracking server; codeworld.tracking.send_pending), each entry dropped once it is in: step
    rows at their step and time, and closes; returns the number of steps sent and the closes.
    What a run holds already (a request that landed although its answer was lost, a send cut
    short) is not sent again: each step of a metric is there once. MLflow's errors are raised
    (the stage tells an outage from others: codeworld.tracking)."""
    from mlflow.tracking import MlflowClient

    sent = 0

    def send_steps(entry: dict) -> None:
        nonlocal sent
        last = entry.get("last")
        rows = [r for r in read_rows(steps)
                if r["step"] >= entry["first"] and (last is None or r["step"] <= last)]
        client = MlflowClient(entry["tracking_uri"])
        metrics = [m for r in rows for m in step_metrics(r)]
        there = {(m.key, m.step) for key in {m.key for m in metrics}
                 for m in client.get_metric_history(entry["run_id"], key)}
        metrics = [m for m in metrics if (m.key, m.step) not in there]
        if metrics:
            client.log_batch(entry["run_id"], metrics=metrics)
        sent += len({m.step for m in metrics})

    closed = send_pending(unsent_path(steps), send_steps)
    return sent, closed


class StepLog:
    """Each step's row to the JSONL file and, when `run_id` is given, to that MLflow run. A
    tracking server that is down costs training nothing: at the first failure to reach it
    (after MLflow's own retries, which launch.worker_env keeps short for the ranks) one
    warning line is printed and nothing more is sent; the file keeps every row, and
    unsent_path says from which step on, for the stage to send (send_unsent)."""

    def __init__(self, path: Path, active: bool, resume_after: int, run_id: str | None):
        self.path, self.active = path, active
        self.client = None
        self.run_id = run_id
        if not active:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # A resumed run recomputes the steps after its checkpoint: drop their old lines.
        kept = [r for r in read_rows(path) if r["step"] <= resume_after]
        # An earlier run's unsent rows (none when the stage sent them before this run began)
        # end at the checkpoint too: the rows after it are this run's to send.
        try:
            unsent = unsent_runs(path)
        except ValueError:
            unsent = []   # unreadable: what it said is lost, and the file no use to keep
        # (a run's close stays: it ends the run whatever was trained again)
        capped = [u if "first" not in u else
                  {**u, "last": min(resume_after, u.get("last") or resume_after)}
                  for u in unsent if "first" not in u or u["first"] <= resume_after]
        if capped != unsent:
            _write_unsent(path, capped)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        os.replace(tmp, path)
        self.f = open(path, "a")
        if run_id:
            import mlflow
            from mlflow.tracking import MlflowClient

            self.uri = mlflow.get_tracking_uri()
            self.client = MlflowClient(self.uri)

    def write(self, row: dict) -> None:
        if not self.active:
            return
        import time

        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.items()), flush=True)
        row = {**row, TIME: int(time.time() * 1000)}
        self.f.write(json.dumps(row, sort_keys=True) + "\n")
        self.f.flush()
        if self.client is not None:
            try:
                self.client.log_batch(self.run_id, metrics=step_metrics(row))
            except Exception as err:
                from codeworld.tracking import _outage

                if (root := _outage(err)) is None:
                    raise   # not the server's absence (a run that is gone...): a fault to see
                self._stop_sending(row["step"], root)

    def _stop_sending(self, step: int, why: BaseException) -> None:
        self.client = None
        try:
            runs = unsent_runs(self.path)
        except ValueError:
            runs = []
        _write_unsent(self.path, runs + [{"run_id": self.run_id, "tracking_uri": self.uri,
                                          "first": step, "last": None}])
        print(f"warning: MLflow tracking server {self.uri} unreachable at step {step} ({why}); "
              f"training goes on, its steps from {step} on only in {self.path}, for the stage "
              f"to send to MLflow after training (or at its next run; or `codeworld "
              f"send-steps`)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.active:
            self.f.close()
