"""The pipeline as a Prefect flow: each dvc.yaml stage is a Prefect task running
`dvc repro --single-item STAGE`, in DAG order, so DVC decides what is stale and Prefect shows,
retries and schedules the runs.

DVC holds a repository lock, so stages run one at a time and a file lock keeps two flows on one
workspace from calling DVC at once. A failure that looks transient (DVC lock held, connection
errors reported by a stage) is retried; any other failure fails the flow with the stage's name
and the tail of its output.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from codeworld.config import load_params
from codeworld.tracking import PARENT_ENV, repo_root, start_run, tracking_uri

TRANSIENT_MARKERS = ("Unable to acquire lock", "transient error (retry)", "Connection reset",
                     "Temporary failure in name resolution")


class StageFailed(RuntimeError):
    def __init__(self, stage: str, code: int, tail: str, transient: bool):
        self.stage, self.transient = stage, transient
        super().__init__(f"stage {stage!r} failed (exit {code}):\n{tail}")


def dag_order(dvc_yaml: Path) -> list[str]:
    """Stages in dependency order (a stage after every stage whose outs it depends on);
    ties keep their order in dvc.yaml."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]

    def paths(entries: list) -> list[str]:
        return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]

    outs = {name: paths(s.get("outs")) for name, s in stages.items()}
    needs = {name: {other for other, o in outs.items() if other != name and any(
        d == p or d.startswith(p.rstrip("/") + "/") for d in paths(s.get("deps")) for p in o)}
        for name, s in stages.items()}
    order: list[str] = []
    while len(order) < len(stages):
        ready = [n for n in stages if n not in order and needs[n] <= set(order)]
        if not ready:
            raise ValueError(f"{dvc_yaml}: dependency cycle among {sorted(set(stages) - set(order))}")
        order.append(ready[0])
    return order


def upstream(order: list[str], wanted: list[str]) -> list[str]:
    unknown = sorted(set(wanted) - set(order))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {order}")
    # Earlier stages are cheap no-ops when up to date, so run the prefix up to the last wanted.
    return order[: max(order.index(w) for w in wanted) + 1]


@contextmanager
def workspace_lock(root: Path) -> Iterator[None]:
    lock = root / ".dvc" / "tmp" / "codeworld-flow.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _dvc() -> str:
    local = Path(sys.executable).with_name("dvc")
    return str(local) if local.exists() else (shutil.which("dvc") or "dvc")


def _retry_if_transient(task, task_run, state) -> bool:
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, StageFailed) and exc.transient


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_if_transient,
      task_run_name="stage-{stage}")
def run_stage(stage: str, root: str, force: bool, parent_run_id: str | None) -> dict:
    logger = get_run_logger()
    env = dict(os.environ)
    if parent_run_id:
        env[PARENT_ENV] = parent_run_id
    env["MLFLOW_TRACKING_URI"] = tracking_uri()
    # dvc.yaml calls `codeworld`: the one installed beside this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [_dvc(), "repro", "--single-item", stage] + (["--force"] if force else [])
    lines: list[str] = []
    with workspace_lock(Path(root)):
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
        for line in proc.stdout:
            lines.append(line.rstrip())
            logger.info("%s | %s", stage, line.rstrip())
        code = proc.wait()
    if code != 0:
        tail = "\n".join(lines[-25:])
        raise StageFailed(stage, code, tail, any(m in tail for m in TRANSIENT_MARKERS))
    metrics_file = Path(root) / "metrics" / f"{stage}.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    ran = not any("didn't change, skipping" in ln for ln in lines)
    _publish(stage, metrics, ran)
    return {"stage": stage, "ran": ran, "metrics": metrics}


def _publish(stage: str, metrics: dict, ran: bool) -> None:
    key = f"{stage}-metrics".replace("_", "-").lower()
    create_table_artifact([{"metric": k, "value": v} for k, v in sorted(metrics.items())], key=key,
                          description=f"metrics/{stage}.json ({'ran' if ran else 'up to date, not rerun'})")


@flow(name="codeworld-pipeline", log_prints=True)
def pipeline(stages: list[str] | None = None, force: bool = False) -> list[dict]:
    """Run the dvc.yaml stages in DAG order (all of them, or up to the named ones)."""
    root = repo_root()
    params = load_params(root / "params.yaml")  # a bad param fails here, before any stage
    order = dag_order(root / "dvc.yaml")
    todo = upstream(order, stages) if stages else order
    parent = _start_parent_run(todo, params.tracking.experiment)
    results: list[dict] = []
    status = "FAILED"
    try:
        for stage in todo:
            results.append(run_stage(stage, str(root), force, parent))
        status = "FINISHED"
    finally:
        _end_parent_run(status)
    rows = [{"stage": r["stage"], "ran": r["ran"],
             "records": r["metrics"].get("records", r["metrics"].get("kept", "")),
             "seconds": r["metrics"].get("seconds_total", "")} for r in results]
    create_markdown_artifact(_summary(rows), key="pipeline-summary", description="codeworld pipeline run")
    return results


def _summary(rows: list[dict]) -> str:
    lines = ["# codeworld pipeline", "", "| stage | ran | records | seconds |", "|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['ran']} | {r['records']} | {r['seconds']} |" for r in rows]
    lines += ["", f"MLflow: `{tracking_uri()}` (run `mlflow ui --backend-store-uri {tracking_uri()}`)"]
    return "\n".join(lines)


def _start_parent_run(stages: list[str], experiment: str) -> str | None:
    tags = {"codeworld.kind": "pipeline", "codeworld.stages": ",".join(stages)}
    return start_run("pipeline", experiment, tags).info.run_id


def _end_parent_run(status: str) -> None:
    import mlflow

    mlflow.end_run(status=status)


if __name__ == "__main__":
    pipeline()
