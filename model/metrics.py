"""Per-step training metrics from the one logging rank (its memory figures the maximum over all
ranks): JSON lines (the DVC plot source and the resume record) and MLflow step metrics when the
stage started a run for this phase."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

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


class StepLog:
    def __init__(self, path: Path, active: bool, resume_after: int, run_id: str | None):
        self.path, self.active = path, active
        self.client = None
        self.run_id = run_id
        if not active:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # A resumed run recomputes the steps after its checkpoint: drop their old lines.
        kept = [r for r in read_rows(path) if r["step"] <= resume_after]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        os.replace(tmp, path)
        self.f = open(path, "a")
        if run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient()

    def write(self, row: dict) -> None:
        if not self.active:
            return
        self.f.write(json.dumps(row, sort_keys=True) + "\n")
        self.f.flush()
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.items()), flush=True)
        if self.client is not None:
            from mlflow.entities import Metric
            import time

            now = int(time.time() * 1000)
            metrics = [Metric(k, float(v), now, row["step"]) for k, v in row.items()
                       if k != "step" and isinstance(v, (int, float))]
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        if self.active:
            self.f.close()
