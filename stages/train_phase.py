"""A training phase as a stage: torchrun over model/train.py with this node's processes.

The phase's checkpoint directory (`checkpoints/<phase>` under the storage root) holds the
checkpoints, `steps.jsonl` (one line per step, written by the logging rank) and `run.json`
(what the checkpoints are a function of). A rerun with the same fingerprint resumes from the
latest checkpoint (or returns at once when training finished); another fingerprint starts
over. The parallel layout is not part of it: a checkpoint loads under any TP/PP/DP layout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from codeworld.config import PHASES, Params
from codeworld.shards import code_version, fingerprint
from codeworld.storage import write_atomic, filesystem
from codeworld.tracking import StageRun, repo_root, tracking_uri
from model import checkpoint
from stages import pack as pack_stage

RUN = "run.json"
PARAMS = "params.json"
STEPS = "steps.jsonl"


class TrainingFailed(RuntimeError):
    pass


def phase_dir(params: Params, phase: str) -> Path:
    return pack_stage.local_dir(params).parent / "checkpoints" / phase


def phase_fingerprint(params: Params, phase: str) -> str:
    pack = json.loads((pack_stage.local_dir(params) / pack_stage.MANIFEST).read_text())
    cfg = getattr(params, phase)
    parent = None
    if cfg.init_from:
        parent = json.loads((phase_dir(params, cfg.init_from) / RUN).read_text())["fingerprint"]
    return fingerprint("train", 1, phase, params.model.model_dump(), cfg.model_dump(),
                       pack["fingerprint"], parent, code_version(), model_code_version())


def model_code_version() -> str:
    """The training engine's own code (model/), which code_version() does not cover."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted((Path(__file__).resolve().parents[1] / "model").glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def torchrun_command(params: Params, phase: str, out: Path, extra: list[str] = ()) -> list[str]:
    par = params.parallel
    # The ranks read exactly the params this stage was given (overrides included).
    write_atomic(filesystem(str(out)), str(out / PARAMS), json.dumps(params.model_dump()).encode())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={par.nproc}", "-m", "model.train", "--phase", phase,
           "--params", str(out / PARAMS),
           "--pack", str(pack_stage.local_dir(params)), "--out", str(out),
           "--steps-log", str(out / STEPS), *extra]
    init_from = getattr(params, phase).init_from
    if init_from:
        cmd += ["--init-from", str(phase_dir(params, init_from))]
    return cmd


def run_in_own_group(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run torchrun in its own process group and, when it ends, kill what is left of the group:
    dist_checkpointing keeps a multiprocessing Manager process that outlives a killed rank."""
    timeout = kwargs.pop("timeout", None)
    proc = subprocess.Popen(cmd, start_new_session=True, stderr=subprocess.STDOUT, **kwargs)
    try:
        code = proc.wait(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, code)


def read_steps(out: Path) -> list[dict]:
    path = out / STEPS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary(rows: list[dict]) -> dict:
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    tps = sorted(r["tokens_per_s"] for r in rows[1:] or rows)  # step 1 includes warm-up
    valid = [r["valid_loss"] for r in rows if "valid_loss" in r]
    out = {"steps": rows[-1]["step"] if rows else 0,
           "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
           "tokens_per_s_median": tps[len(tps) // 2] if tps else None}
    if valid:
        out["final_valid_loss"] = valid[-1]
    if len(losses) >= 4:  # mean of the last quarter below the first quarter's
        q = len(losses) // 4
        out["loss_fell"] = int(sum(losses[-q:]) / q < sum(losses[:q]) / q)
    return {k: v for k, v in out.items() if v is not None}


def write_plot(rows: list[dict], path: str) -> None:
    """DVC plot source: the per-step rows as one JSON list."""
    body = json.dumps(rows, indent=1, sort_keys=True).encode() + b"\n"
    write_atomic(filesystem(path), path, body)


def run_phase(params: Params, phase: str, *, track: bool = True, extra: list[str] = (),
              metrics_path: str | None = "default", plot_path: str | None = "default") -> dict:
    assert phase in PHASES, phase
    metrics_path = f"metrics/{phase}.json" if metrics_path == "default" else metrics_path
    plot_path = f"metrics/plots/{phase}.json" if plot_path == "default" else plot_path
    cfg = getattr(params, phase)
    out = phase_dir(params, phase)
    fp = phase_fingerprint(params, phase)
    with StageRun(phase, params.model_dump(include={"model", "parallel", phase}),
                  params.tracking.experiment, metrics_path, track) as run_:
        if out.exists():
            try:
                same = json.loads((out / RUN).read_text()).get("fingerprint") == fp
            except (OSError, ValueError):
                same = False
            if not same:   # checkpoints of other params or code: never resume from those
                shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(filesystem(str(out)), str(out / RUN),
                     json.dumps({"phase": phase, "fingerprint": fp}).encode() + b"\n")
        done = checkpoint.latest(out)
        if done is None or done[0] < cfg.steps:
            env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(), "OMP_NUM_THREADS":
                   os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // params.parallel.nproc)))}
            if run_.run_id:
                env["CODEWORLD_TRAIN_RUN_ID"] = run_.run_id
            log_path = out / "train.log"
            with run_.timed("train"), open(log_path, "w") as log:
                proc = run_in_own_group(torchrun_command(params, phase, out, list(extra)),
                                        cwd=repo_root(), env=env, stdout=log)
            if proc.returncode != 0:
                tail = "".join(l for l in log_path.read_text().splitlines(True)
                               if "warn" not in l.lower())[-3000:]
                raise TrainingFailed(f"{phase}: torchrun exited with {proc.returncode} "
                                     f"(log: {log_path})\n{tail}")
        rows = read_steps(out)
        stats = summary(rows)
        run_.log(**stats)
        if plot_path:
            write_plot(rows, plot_path)
        final = checkpoint.latest(out)
        return {"name": phase, "fingerprint": fp, "records": stats.get("steps", 0),
                "checkpoint": str(final[1]) if final else None, "stats": stats}
