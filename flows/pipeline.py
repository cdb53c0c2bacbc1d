"""The pipeline as a Prefect flow: each dvc.yaml stage is a Prefect task running
`dvc repro --single-item STAGE`, in DAG order, so DVC decides what is stale and Prefect shows,
retries and schedules the runs.

DVC holds a repository lock, so stages run one at a time, and a file lock held for the whole
flow keeps two flows off one workspace (a run started from a deployment also holds the
workspace's Prefect global concurrency limit, see flows/deploy.py). A stage that exits 75 (a
transient error by its own verdict, codeworld.cli) or finds DVC's lock held is retried; any
other failure fails the flow with the stage's name and the tail of its output.

`overrides` (`SECTION.KEY=VALUE`, like `dvc exp run -S`) are validated with the params first,
their validated values written into params.yaml for the run (so DVC sees and records them in dvc.lock, as `dvc exp run
-S` does) and params.yaml is put back as it was when the flow ends (by the next flow,
from a journal beside it, when the flow was killed; until then the other entry points refuse
the file: codeworld.overrides.refuse_killed_overrides).

After each stage that ran, its MLflow run gets lineage tags read from dvc.lock (md5 of each dep
and out, and of its params), and every stage leaves Prefect artifacts: its metrics, its lineage
and a link to its MLflow run (for a stage DVC found up to date, the run that made its outputs).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from codeworld import config
from codeworld.cli import EXIT_TRANSIENT
from codeworld.config import ConfigError, load_params
from codeworld.overrides import (apply_overrides, flow_lock_path, overrides_journal,
                                 undo_killed_overrides, write_overrides)
from codeworld.storage import write_file_atomic
from codeworld.tracking import PARENT_ENV, repo_root, run_url, start_run, tracking_uri

# What DVC prints when a stage's command failed (its last line) or when it could not take its
# own lock (the stage never ran). The stage's exit code is its verdict: 75 (EX_TEMPFAIL,
# codeworld.cli.EXIT_TRANSIENT) may pass on a retry. Words in the log are not: a training
# failure's log tail holds "Connection reset by peer" from the ranks that saw a crashed one.
_DVC_STAGE_EXIT = re.compile(r"^ERROR: failed to reproduce .*, exited with (-?\d+)$")
_DVC_LOCKED = "ERROR: Unable to acquire lock"


class StageFailed(config.StageFailed):
    """A stage's `dvc repro` that exited non-zero: the command line prints its message (the
    log's tail) as an error, exit 75 when it failed for a cause a retry may clear."""

    def __init__(self, stage: str, code: int, tail: str, transient: bool):
        self.stage, self.transient = stage, transient
        super().__init__(f"stage {stage!r} failed (exit {code}):\n{tail}")


def stage_needs(dvc_yaml: Path) -> dict[str, set[str]]:
    """Each stage's direct upstream stages: those with an out that is one of its deps or a
    folder holding one."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]

    def paths(entries: list) -> list[str]:
        return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]

    outs = {name: paths(s.get("outs")) for name, s in stages.items()}
    return {name: {other for other, o in outs.items() if other != name and any(
        d == p or d.startswith(p.rstrip("/") + "/") for d in paths(s.get("deps")) for p in o)}
        for name, s in stages.items()}


def dag_order(dvc_yaml: Path) -> list[str]:
    """Stages in dependency order (a stage after every stage whose outs it depends on);
    ties keep their order in dvc.yaml."""
    return _in_order(stage_needs(dvc_yaml), dvc_yaml)


def _in_order(needs: dict[str, set[str]], dvc_yaml: Path) -> list[str]:
    order: list[str] = []
    while len(order) < len(needs):
        ready = [n for n in needs if n not in order and needs[n] <= set(order)]
        if not ready:
            raise ValueError(f"{dvc_yaml}: dependency cycle among {sorted(set(needs) - set(order))}")
        order.append(ready[0])
    return order


def upstream(dvc_yaml: Path, wanted: list[str]) -> list[str]:
    """`wanted` and every stage they need, directly or through others, in DAG order. Only
    those: a stage that merely comes earlier in the order (agent before tokenizer) is no
    input of theirs, and running it could take hours."""
    needs = stage_needs(dvc_yaml)   # (read once: the order comes from the same needs)
    order = _in_order(needs, dvc_yaml)
    unknown = sorted(set(wanted) - set(order))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {order}")
    closure: set[str] = set()
    todo = list(wanted)
    while todo:
        stage = todo.pop()
        if stage not in closure:
            closure.add(stage)
            todo.extend(needs[stage])
    return [s for s in order if s in closure]


_held: dict[str, int] = {}
_held_guard = threading.Lock()


@contextmanager
def workspace_lock(root: Path) -> Iterator[None]:
    """An exclusive lock on the workspace, reentrant within this process (the flow holds it
    for its whole run and each stage task takes it again)."""
    lock = flow_lock_path(root)
    key = str(lock.resolve())
    with _held_guard:
        if _held.get(key):
            _held[key] += 1
            inner = True
        else:
            inner = False
    if inner:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as fh:   # (not "w": that would wipe the holder's record)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # Said, or a second `codeworld pipeline` looked hung for as long as the first ran.
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            print(f"waiting for the workspace: {holder} holds {lock}", flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"codeworld flow (pid {os.getpid()}, since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        fh.flush()
        with _held_guard:
            _held[key] = 1
        try:
            yield
        finally:
            with _held_guard:
                _held.pop(key, None)
            fcntl.flock(fh, fcntl.LOCK_UN)


def workspace_limit_name(root: Path) -> str:
    """The Prefect global concurrency limit (1 slot) of a workspace: runs from deployments hold
    it, so two runs on one workspace queue even when served by different processes."""
    return "codeworld-workspace-" + hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:12]


def stage_groups(dvc_yaml: Path) -> dict[str, list[str]]:
    """dvc.yaml's stages by part of the pipeline, in DAG order: `train` (outs under
    data/checkpoints/), `evaluate` (what follows training: named eval* or export*, or outs under
    data/eval or data/export), `data` (the rest). A group without stages is absent."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    groups: dict[str, list[str]] = {}
    for name in dag_order(dvc_yaml):
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in stages[name].get("outs") or []]
        if name.startswith(("eval", "export")) or any(o.startswith(("data/eval", "data/export"))
                                                      for o in outs):
            group = "evaluate"
        elif any(o.startswith("data/checkpoints") for o in outs):
            group = "train"
        else:
            group = "data"
        groups.setdefault(group, []).append(name)
    return {g: groups[g] for g in ("data", "train", "evaluate") if g in groups}


@contextmanager
def params_overridden(params_file: Path, overrides: list[str]) -> Iterator[None]:
    """params.yaml with `overrides` set to their validated values (comments and order kept,
    see write_overrides), restored on exit unless someone else changed it meanwhile. A bad
    override is a ConfigError here, before the file is touched. First undoes what a killed
    earlier run left (undo_killed_overrides): the flow calls this under the workspace lock."""
    undo_killed_overrides(params_file)
    if not overrides:
        yield
        return
    original = params_file.read_text()
    validated = apply_overrides(load_params(params_file), overrides)
    written = write_overrides(original, validated, overrides)
    journal = overrides_journal(params_file)
    write_file_atomic(journal, json.dumps({"original": original, "written": written,
                                           "overrides": overrides}).encode())
    write_file_atomic(params_file, written.encode())
    try:
        # What the stages will read must be what was validated; a difference would be a silent
        # config change recorded in dvc.lock, so it stops the run before any stage.
        if load_params(params_file) != validated:
            raise ConfigError(f"{params_file}: the overrides {overrides} as written do not read "
                              "back as validated (a bug in codeworld.overrides.write_overrides)")
        yield
    finally:
        if params_file.read_text() == written:
            write_file_atomic(params_file, original.encode())
        else:
            print(f"warning: {params_file} changed during the run; left as it is now")
        journal.unlink(missing_ok=True)


def _dvc() -> str:
    local = Path(sys.executable).with_name("dvc")
    return str(local) if local.exists() else (shutil.which("dvc") or "dvc")


def _retry_if_transient(task, task_run, state) -> bool:
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, StageFailed) and exc.transient


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_if_transient,
      task_run_name="stage-{stage}")
def run_stage(stage: str, root: str, force: bool, parent_run_id: str | None,
              experiment: str = "codeworld") -> dict:
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
        # A session of its own, so that it can be stopped whole (below)
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace",
                                start_new_session=True)
        try:
            for line in proc.stdout:
                lines.append(line.rstrip())
                logger.info("%s | %s", stage, line.rstrip())
            code = proc.wait()
        except BaseException:
            # The flow stopped (Prefect's cancel or serve-stop: SIGTERM, raised here; Ctrl-C):
            # the stage stops too. Left running, it outlived the lock and the overrides in
            # params.yaml, and DVC recorded the params put back, not those it ran with.
            _stop_group(proc)
            raise
    if code != 0:
        tail = "\n".join(lines[-25:])
        raise StageFailed(stage, code, tail, dvc_failure_is_transient(lines))
    metrics_file = Path(root) / "metrics" / f"{stage}.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    ran = not any("didn't change, skipping" in ln for ln in lines)
    lineage = dvc_lineage(Path(root) / "dvc.lock", stage)
    run_id = url = None
    try:
        run_id = _stage_run_id(stage, experiment, parent_run_id, lineage, ran)
        if run_id and ran:
            _tag_lineage(run_id, lineage)
        if run_id:
            url = mlflow_run_url(experiment, run_id)
    except Exception as exc:  # tracking must not fail a stage that succeeded
        logger.warning("%s: MLflow lineage not recorded: %s", stage, exc)
    _publish(stage, metrics, ran, lineage, run_id, url)
    return {"stage": stage, "ran": ran, "metrics": metrics, "mlflow_run_id": run_id, "mlflow_url": url}


def _stop_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """Stop `proc`'s process group (DVC and the stage it runs) as Ctrl-C did when they shared
    the terminal's group: SIGINT (the stage's `finally`s run, its MLflow run is closed), then
    SIGTERM, then SIGKILL, each after a wait."""
    import signal

    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            pass


def dvc_failure_is_transient(lines: list[str]) -> bool:
    """Whether a failed `dvc repro`'s output says a retry may pass: the stage exited 75, or DVC
    found its lock held."""
    for line in reversed(lines):
        if m := _DVC_STAGE_EXIT.match(line.strip()):
            return int(m.group(1)) == EXIT_TRANSIENT
    return any(line.startswith(_DVC_LOCKED) for line in lines)


def dvc_lineage(lock_file: Path, stage: str) -> dict[str, str]:
    """MLflow tags for a stage from dvc.lock: `dvc.dep.PATH` and `dvc.out.PATH` (md5; a folder's
    ends in `.dir`) and `dvc.params.md5` (md5 of the stage's params as DVC recorded them)."""
    if not lock_file.exists():
        return {}
    entry = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {}).get(stage)
    if not entry:
        return {}
    tags = {}
    for kind, key in (("dep", "deps"), ("out", "outs")):
        for item in entry.get(key) or []:
            digest = item.get("md5") or item.get("etag") or item.get("checksum")
            if digest:
                tags[f"dvc.{kind}.{item['path']}"] = str(digest)
    if entry.get("params"):
        canon = json.dumps(entry["params"], sort_keys=True, default=str).encode()
        tags["dvc.params.md5"] = hashlib.md5(canon).hexdigest()
    return tags


def _stage_run_id(stage: str, experiment: str, parent: str | None, lineage: dict[str, str],
                  ran: bool) -> str | None:
    """The MLflow run of this stage: the child of this flow's run when the stage ran, else the
    latest run of the stage tagged with the same outputs (the run that made them)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    where = f"tags.`codeworld.stage` = '{stage}'"
    if ran:
        if not parent:
            return None
        where += f" and tags.`mlflow.parentRunId` = '{parent}'"
    else:
        outs = {k: v for k, v in lineage.items() if k.startswith("dvc.out.")}
        if not outs:
            return None
        where += "".join(f" and tags.`{k}` = '{v}'" for k, v in outs.items())
    runs = client.search_runs([exp.experiment_id], where, max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def _tag_lineage(run_id: str, lineage: dict[str, str]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri())
    for k, v in lineage.items():
        client.set_tag(run_id, k, v)


def _artifact_key(stage: str, what: str) -> str:
    return f"{stage}-{what}".replace("_", "-").lower()


def _publish(stage: str, metrics: dict, ran: bool, lineage: dict[str, str] | None = None,
             run_id: str | None = None, url: str | None = None) -> None:
    state = "ran" if ran else "up to date, not rerun"
    create_table_artifact([{"metric": k, "value": v} for k, v in sorted(metrics.items())],
                          key=_artifact_key(stage, "metrics"), description=f"metrics/{stage}.json ({state})")
    if lineage:
        rows = [{"kind": k.split(".")[1], "path": k.split(".", 2)[2], "md5": v}
                for k, v in lineage.items() if k.startswith(("dvc.dep.", "dvc.out."))]
        create_table_artifact(rows, key=_artifact_key(stage, "lineage"),
                              description=f"dvc.lock hashes of stage {stage} ({state})")
    if run_id:
        what = "its MLflow run" if ran else "the MLflow run that made its current outputs"
        if url:
            create_link_artifact(url, link_text=f"MLflow run {run_id} ({stage})",
                                 key=_artifact_key(stage, "mlflow-run"), description=f"{stage}: {what}")
        else:
            create_markdown_artifact(f"MLflow run `{run_id}` at `{tracking_uri()}` "
                                     f"(`mlflow ui --backend-store-uri {tracking_uri()}`)",
                                     key=_artifact_key(stage, "mlflow-run"), description=f"{stage}: {what}")


def mlflow_run_url(experiment: str, run_id: str) -> str | None:
    from mlflow import MlflowClient

    uri = tracking_uri()
    exp = MlflowClient(uri).get_experiment_by_name(experiment)
    return run_url(uri, exp.experiment_id, run_id) if exp else None


@task(name="register")
def register_model(parent_run_id: str | None) -> dict:
    """The final checkpoint into the MLflow model registry (codeworld/registry.py), as a child
    of this pipeline run; a checkpoint registered before is not registered again."""
    from codeworld.registry import register_final

    old = os.environ.get(PARENT_ENV)
    if parent_run_id:
        os.environ[PARENT_ENV] = parent_run_id
    try:
        info = register_final(load_params(repo_root() / "params.yaml"))
    finally:
        if old is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = old
    create_table_artifact([{k: str(v) for k, v in info.items()}], key="registered-model",
                          description="the final checkpoint in the MLflow model registry")
    return {"stage": "register", "ran": bool(info["new"]), "metrics": {},
            "mlflow_url": None, **info}


@flow(name="codeworld-pipeline", log_prints=True)
def pipeline(stages: list[str] | None = None, force: bool = False,
             overrides: list[str] | None = None, group: str | None = None) -> list[dict]:
    """Run the dvc.yaml stages in DAG order: all of them, or the named `stages`, or the stages
    of `group` (data / train / evaluate, see stage_groups), with the stages these need (see
    upstream). `overrides`:
    `SECTION.KEY=VALUE` items set in params.yaml for this run only (like `dvc exp run -S`)."""
    root = repo_root()
    overrides = list(overrides or [])
    params = load_params(root / "params.yaml")  # a bad param fails here, before any stage
    params = apply_overrides(params, overrides)  # and so does a bad override
    order = dag_order(root / "dvc.yaml")
    if group:
        groups = stage_groups(root / "dvc.yaml")
        if group not in groups:
            raise ValueError(f"no stage in group {group!r}; dvc.yaml has {groups}")
        stages = [*(stages or []), *groups[group]]
    todo = upstream(root / "dvc.yaml", stages) if stages else order
    results: list[dict] = []
    with _workspace_slot(root), workspace_lock(root), params_overridden(root / "params.yaml", overrides):
        # read again under the lock: what this run's stages read (a killed run's overrides undone)
        params = load_params(root / "params.yaml")
        parent = _start_parent_run(todo, params.tracking.experiment, overrides)
        status = "FAILED"
        try:
            for stage in todo:
                results.append(run_stage(stage, str(root), force, parent, params.tracking.experiment))
            if set(todo) & set(stage_groups(root / "dvc.yaml").get("train", [])):
                results.append(register_model(parent))
            status = "FINISHED"
        finally:
            _end_parent_run(status)
    rows = [{"stage": r["stage"], "ran": r["ran"],
             "records": r["metrics"].get("records", r["metrics"].get("kept", "")),
             "seconds": r["metrics"].get("seconds_total", "")} for r in results]
    links = {r["stage"]: r.get("mlflow_url") for r in results}
    try:
        links["pipeline"] = mlflow_run_url(params.tracking.experiment, parent) if parent else None
    except Exception:  # the summary does not need the link
        links["pipeline"] = None
    create_markdown_artifact(_summary(rows, links), key="pipeline-summary", description="codeworld pipeline run")
    return results


def _summary(rows: list[dict], links: dict[str, str | None] | None = None) -> str:
    links = links or {}
    lines = ["# codeworld pipeline", "", "| stage | ran | records | seconds | MLflow |", "|---|---|---|---|---|"]
    for r in rows:
        link = f"[run]({links[r['stage']]})" if links.get(r["stage"]) else ""
        lines.append(f"| {r['stage']} | {r['ran']} | {r['records']} | {r['seconds']} | {link} |")
    if links.get("pipeline"):
        lines += ["", f"MLflow: [pipeline run]({links['pipeline']})"]
    else:
        lines += ["", f"MLflow: `{tracking_uri()}` (run `mlflow ui --backend-store-uri {tracking_uri()}`)"]
    return "\n".join(lines)


@contextmanager
def _workspace_slot(root: Path) -> Iterator[None]:
    """In a run from a deployment, hold the workspace's global concurrency slot (the limit is
    created by flows/deploy.py; strict=False: without it the file lock still holds)."""
    from prefect.runtime import deployment

    if not deployment.id:
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(workspace_limit_name(root), occupy=1, strict=False):
        yield


def _start_parent_run(stages: list[str], experiment: str, overrides: list[str] | None = None) -> str | None:
    from prefect.runtime import deployment, flow_run

    tags = {"codeworld.kind": "pipeline", "codeworld.stages": ",".join(stages)}
    if overrides:
        tags["codeworld.overrides"] = json.dumps(overrides)
    if flow_run.id:
        tags["prefect.flow_run_id"] = str(flow_run.id)
    if deployment.id:
        tags["prefect.deployment"] = f"{flow_run.flow_name}/{deployment.name}"
    return start_run("pipeline", experiment, tags).info.run_id


def _end_parent_run(status: str) -> None:
    """Close the flow's MLflow run. It runs in a `finally`: an error here (the tracking server
    gone meanwhile) is logged, never raised, or it would replace the stage's own error, or fail
    a flow whose stages all succeeded. A close the server missed waits as a stage's does
    (codeworld.tracking.keep_stage_close), or the run stayed RUNNING forever: the next stage run
    on that server, or `codeworld send-steps`, ends it as this flow meant."""
    import mlflow

    from codeworld.tracking import TrackingUnavailable, keep_stage_close, tracking_server

    active = mlflow.active_run()   # (this process's own record: no request)
    close = {"status": status, "end_time": int(time.time() * 1000), "metrics": {}, "tags": {}}
    try:
        with tracking_server():
            mlflow.end_run(status=status)
    except TrackingUnavailable as err:
        kept = ""
        if active is not None:
            try:
                keep_stage_close(active.info.run_id, mlflow.get_tracking_uri(), close)
                kept = " (its close kept for the next stage run or `codeworld send-steps`)"
            except OSError as disk:
                kept = f" (its close not kept: {disk})"
        print(f"warning: MLflow pipeline run not closed at {mlflow.get_tracking_uri()} yet (left "
              f"RUNNING, not {status}{kept}): {err}")
    except Exception as err:  # noqa: BLE001 - see above
        # (printed: the flow logs prints, and this works outside a flow run too)
        print(f"warning: MLflow pipeline run not closed at {tracking_uri()} (left RUNNING, "
              f"not {status}): {type(err).__name__}: {err}")

if __name__ == "__main__":
    pipeline()
