"""A training phase as a stage: torchrun over model/train.py with this node's processes.

The phase's checkpoint directory (`checkpoints/<phase>` under the storage root) holds the
checkpoints, `steps.jsonl` (one line per step, written by the logging rank) and `run.json`
(what the checkpoints are a function of, and the parent checkpoint a phase with `init_from`
started from). A rerun with the same fingerprint resumes from the latest checkpoint (or returns
at once when training finished); another fingerprint starts over. The parallel layout is not
part of it: a checkpoint loads under any TP/PP/DP layout. The fingerprint covers the pack
sources of the phase's blend only, so packing another phase's data retrains nothing else.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from codeworld.code import Code
from codeworld import pack_cache
from codeworld.config import PHASES, ConfigError, Params, PhaseConfig, StageFailed
from codeworld.shards import fingerprint
from codeworld.storage import StorageError, write_file_atomic
from codeworld.tracking import StageRun, repo_root, tracking_server, tracking_uri
from model import checkpoint
from model.data import plan_validation
from model.metrics import TIME, close_later, read_rows
from stages import pack as pack_stage

# The stage and the torchrun entry it launches. model.launch only builds the command line and
# checks the layout: editing it must not retrain every phase.
CODE = Code(("stages.train_phase", "model.train"), skip=("model.launch",))

RUN = "run.json"
PARAMS = "params.json"
STEPS = "steps.jsonl"


class TrainingFailed(StageFailed):
    pass


def phase_dir(params: Params, phase: str) -> Path:
    if pack_cache.storage_of(params.storage).is_s3:
        # Checkpoints need a filesystem all nodes share (each rank saves its part), not the
        # node-local cache: with an S3 root they stay where dvc.yaml expects them.
        return Path("data") / "checkpoints" / phase
    return pack_stage.local_dir(params).parent / "checkpoints" / phase


def phase_config(params: Params, phase: str) -> PhaseConfig:
    cfg = getattr(params, phase, None)
    if not isinstance(cfg, PhaseConfig):
        raise ConfigError(f"params has no {phase} section: the {phase} phase is not configured")
    return cfg


def tokenizer_of(params: Params) -> str | None:
    """sha256 of the tokenizer a phase trains with, for its run.json: the export refuses to
    ship a checkpoint with another (same vocabulary size, other ids: nothing else would say).
    None when the storage root has none (a pack made without the tokenizer stage)."""
    from stages.tokenizer import recorded_sha256

    try:
        return recorded_sha256(pack_cache.storage_of(params.storage))
    except FileNotFoundError:
        return None


def manifest_path(params: Params) -> str:
    return pack_cache.storage_of(params.storage).sub(pack_stage.OUTPUT).path(pack_stage.MANIFEST)


def pack_sources(params: Params, phase: str) -> dict[str, dict]:
    """The pack manifest's entries of the phase's blend sources."""
    sources = pack_stage.read_manifest(params)["sources"]   # on S3 with an S3 root
    path = manifest_path(params)
    missing = sorted(set(phase_config(params, phase).blend) - set(sources))
    if missing:
        raise TrainingFailed(f"{path}: {phase}.blend names {', '.join(missing)}, not packed "
                             f"yet (run the pack stage)")
    return {n: sources[n] for n in sorted(phase_config(params, phase).blend)}


def blend_shares(cfg: PhaseConfig, sources: dict[str, dict]) -> dict[str, float]:
    """The phase's metrics on its blend, per source: `blend_weight_` (its share of the weights
    as given), `sample_weight_` (its share of the samples Megatron draws, the weights converted
    from cfg.blend_unit), `loss_share_` (the share of the loss tokens those samples carry) and
    `loss_share_if_samples_` (the share it would get were the weights taken as samples,
    Megatron's unit: what SFT trained on before blend_unit). From the pack's counts."""
    from model.data import loss_token_shares, sample_weights

    weights = sample_weights(cfg.blend, sources, cfg.blend_unit)
    out = {"loss_share": loss_token_shares(weights, sources),
           "loss_share_if_samples": loss_token_shares(cfg.blend, sources)}
    for key, w in (("blend_weight", cfg.blend), ("sample_weight", weights)):
        out[key] = {n: v / sum(w.values()) for n, v in w.items()}
    return {f"{key}_{n}": round(v, 6) for key, per in out.items() for n, v in per.items()}


def parent_record(params: Params, phase: str) -> dict | None:
    """The checkpoint this phase (rl too) starts from: its phase, path, iteration and
    fingerprint. The parent must have finished (its last checkpoint at its configured steps)."""
    cfg = getattr(params, phase, None)   # a PhaseConfig, or rl's RLConfig: both name init_from
    if cfg is None:
        raise ConfigError(f"params has no {phase} section: the {phase} phase is not configured")
    parent = cfg.init_from
    if not parent:
        return None
    root = phase_dir(params, parent)
    found = latest_or_fail(root)
    if found is None:
        raise TrainingFailed(f"{root}: {phase} starts from {parent}'s checkpoint and there "
                             f"is none (run the {parent} stage first)")
    iteration, path = found
    if (bad := checkpoint.damage(path)) is not None:
        raise TrainingFailed(f"{bad}: {phase} starts from {parent}'s final checkpoint, which is "
                             f"damaged; rerun the {parent} stage (it trains again from its "
                             "newest intact checkpoint)")
    steps = phase_config(params, parent).steps
    if iteration < steps:
        raise TrainingFailed(f"{root}: {parent} stopped at iteration {iteration} of {steps}; "
                             f"finish the {parent} stage before {phase}")
    try:
        parent_fp = json.loads((root / RUN).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TrainingFailed(f"{root / RUN}: unreadable ({type(err).__name__}: {err}); it says what "
                             f"made {parent}'s checkpoint, which {phase} starts from: rerun the "
                             f"{parent} stage") from None
    return {"phase": parent, "checkpoint": str(path), "iteration": iteration,
            "fingerprint": parent_fp}


def phase_fingerprint(params: Params, phase: str, parent: dict | None = None,
                      precision: str | None = None) -> str:
    """`precision`: the one check_machine resolved ("auto" as fp32, bf16 or fp8 on this
    machine); resolved here when not given (model/launch.py)."""
    cfg = phase_config(params, phase)
    parent = parent if parent is not None else parent_record(params, phase)
    sources = {n: m["fingerprint"] for n, m in pack_sources(params, phase).items()}
    return fingerprint(CODE, "train", 2, phase, params.model.model_dump(), cfg.model_dump(), sources,
                       parent and [parent["fingerprint"], parent["iteration"]],
                       precision if precision is not None else resolved_precision(cfg))


def resolved_precision(cfg) -> str:
    """What the phase's precision is on this machine: "auto" is fp32 on a CPU, bf16 or fp8 on
    a GPU, and a checkpoint of one is no resume point for another (other optimizer state)."""
    from model.build import resolve_precision

    return resolve_precision(cfg).name



def torchrun_command(params: Params, phase: str, out: Path, extra: list[str] = ()) -> list[str]:
    # The ranks read exactly the params this stage was given (overrides included); on several
    # nodes all of them read this file, written before this node's torchrun joins.
    write_file_atomic(out / PARAMS, json.dumps(params.model_dump()).encode())
    from model import launch

    return launch.torchrun_command(params, phase, extra=list(extra))   # out == phase_dir(params, phase)


def _die_with_parent() -> None:
    # In the child before exec: SIGTERM when the stage dies, even by SIGKILL (Linux), which
    # torchrun answers by stopping its ranks. Else a killed stage left training running
    # unattended, and a rerun raced it on the same folder.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def run_in_own_group(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run torchrun in its own process group and, when it ends, kill what is left of the group:
    dist_checkpointing keeps a multiprocessing Manager process that outlives a killed rank.
    torchrun gets SIGTERM if this process dies first."""
    timeout = kwargs.pop("timeout", None)
    proc = subprocess.Popen(cmd, start_new_session=True, stderr=subprocess.STDOUT,
                            preexec_fn=_die_with_parent, **kwargs)
    try:
        code = proc.wait(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, code)


@contextmanager
def phase_lock(out: Path):
    """One run at a time in a phase folder (this node's). Held by the stage and by its torchrun,
    which inherits the descriptor (train passes it on): a torchrun still ending after its
    stage died keeps the folder until it is gone. Yields the descriptor."""
    path = out.parents[1] / ".work" / "locks" / f"{out.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process"
            raise TrainingFailed(f"{out}: {holder} is training this phase already (lock "
                                 f"{path}); wait for it to end or stop it, then rerun") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield fd
    finally:
        os.close(fd)


@contextmanager
def phase_run(out: Path, stage: str, params: dict, experiment: str, metrics_path: str | None,
              track: bool):
    """The phase folder's lock (phase_lock) and, inside it, the phase's StageRun: yields both
    (the lock's descriptor for train() to pass on). A close of the MLflow run that the
    tracking server missed waits behind the run's unsent steps (model/metrics.close_later),
    for the next sending to end the run with; under the lock, as every write of the folder."""
    with phase_lock(out) as lock_fd, StageRun(
            stage, params, experiment, metrics_path, track,
            on_unclosed=partial(close_later, out / STEPS)) as run_:
        yield run_, lock_fd


def open_phase(out: Path, record: dict) -> None:
    """The phase folder for this run, whose lock the caller holds (phase_run): kept for a
    resume or cleared (claim), and its run.json written (`record`: phase, fingerprint,
    parent, MLflow run...)."""
    if record.get("mlflow_run_id"):
        # what earlier runs could not send (steps, a run's close): before claim may clear it
        send_unsent_steps(out / STEPS)
    claim(out, record["fingerprint"])
    out.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out / RUN, json.dumps(record, sort_keys=True).encode() + b"\n")


def claim(out: Path, fp: str) -> None:
    """Keep `out` for a resume when its run.json names this fingerprint, else clear it for a
    new run. Checkpoints whose run.json is missing or unreadable are not cleared: what made
    them is unknown, and deleting them would lose the run for a damaged metadata file."""
    if not out.exists():
        return
    try:
        same = json.loads((out / RUN).read_text()).get("fingerprint") == fp
    except (OSError, ValueError, AttributeError) as err:
        if checkpoint.has_checkpoints(out):
            why = "missing" if isinstance(err, FileNotFoundError) else f"unreadable ({err})"
            raise TrainingFailed(
                f"{out / RUN}: {why}; it records which params, data and code made the "
                f"checkpoints in {out}: restore it to resume, or remove {out} to start over") from None
        same = False
    if not same:   # checkpoints of other params, data or code: never resume from those
        shutil.rmtree(out)


def latest_or_fail(root: Path) -> tuple[int, Path] | None:
    """checkpoint.latest, its errors (a garbled latest.json, a folder it names gone) as
    TrainingFailed: their messages name the file."""
    try:
        return checkpoint.latest(root)
    except (ValueError, FileNotFoundError) as err:
        raise TrainingFailed(str(err)) from None


def resume_point(out: Path, phase: str) -> tuple[int, Path] | None:
    """The checkpoint to resume `phase` from: the latest, or, when a file of it was cut or
    lost since it was saved, the newest older one that is intact (named in latest.json; the
    steps after it are trained again). None to start from step 0."""
    found = latest_or_fail(out)
    if found is None or (bad := checkpoint.damage(found[1])) is None:
        return found
    for older in reversed(checkpoint.complete(out)):
        if older != found[1] and checkpoint.damage(older) is None:
            print(f"{phase}: {bad}: resuming from {older.name} instead", file=sys.stderr)
            checkpoint.point_latest(out, older)
            return checkpoint.latest(out)
    raise TrainingFailed(f"{bad}: the latest checkpoint of {phase} is damaged and no older one "
                         f"is intact; remove {out} to train {phase} from the start")


def check_pack(params: Params, phase: str, out: Path) -> None:
    """Before torchrun: the blend's .bin/.idx files are present and match the pack manifest's
    sha256 (Megatron's own errors on a missing or cut file name no file, or not the cause),
    stamped in `out` so that unchanged files are not hashed again at the next start."""
    if pack_cache.storage_of(params.storage).is_s3:
        return   # each node's ranks fetch the pack into their cache, checking every sha256
    manifest = pack_stage.read_manifest(params)
    want = {f: sha for n in phase_config(params, phase).blend
            for f, sha in manifest["sources"][n]["files"].items()}
    try:
        pack_cache.verify(pack_stage.local_dir(params), want, out / ".pack_verified.json")
    except StorageError as err:
        raise TrainingFailed(str(err)) from None


def train(params: Params, name: str, out: Path, cmd: list[str], run_: StageRun,
          lock_fd: int | None = None) -> None:
    """Run a phase's torchrun `cmd` (its log in out/train.log) with what every rank needs: the
    MLflow server and run, one intra-op thread share per process; TrainingFailed with the
    log's tail when it fails."""
    from model import launch

    env = launch.worker_env(params)
    if run_.run_id:
        env["CODEWORLD_TRAIN_RUN_ID"] = run_.run_id
    log_path = out / "train.log"
    # appended: a killed or failed run's log stays, above the rerun's
    with run_.timed("train"), open(log_path, "a") as log:
        log.write(f"==== torchrun {' '.join(cmd[1:4])}... (pid {os.getpid()})\n")
        log.flush()
        proc = run_in_own_group(cmd, cwd=repo_root(), env=env, stdout=log,
                                pass_fds=() if lock_fd is None else (lock_fd,))
    if proc.returncode != 0:
        this_run = log_path.read_text().rsplit("==== torchrun", 1)[-1]
        tail = "".join(l for l in this_run.splitlines(True)[1:] if "warn" not in l.lower())[-3000:]
        raise TrainingFailed(f"{name}: torchrun exited with {proc.returncode} "
                             f"(log: {log_path})\n{tail}")
    if run_.run_id:
        send_unsent_steps(out / STEPS)


def send_unsent_steps(steps: Path) -> None:
    """Send MLflow what it missed while the tracking server was down (model/metrics.send_unsent):
    the step rows the logging rank kept in `steps` (model/metrics.StepLog) and the closes of
    runs (close_later); after training, before a rerun, and by `codeworld send-steps`. A
    server still down is TrackingUnavailable (exit 75): the rerun sends them, its training
    done."""
    from codeworld.tracking import TrackingUnavailable, _outage
    from model.metrics import send_unsent, unsent_path, unsent_runs

    marker = unsent_path(steps)
    try:
        if not unsent_runs(steps):
            return
    except ValueError as err:
        raise TrainingFailed(f"{err}: it names the training steps not sent to MLflow yet "
                             f"(their rows are in {steps}); remove it to give them up") from None
    try:
        sent, closed = send_unsent(steps)
    except Exception as err:
        run = unsent_runs(steps)[0]
        what = (f"steps {run['first']} on of MLflow run {run['run_id']} are not sent yet "
                f"(their rows are in {steps}, {marker} names them)" if "first" in run else
                f"MLflow run {run['run_id']} is not closed yet (as {run['close']['status']}: "
                f"{marker} holds its close)")
        if (root := _outage(err)) is not None:
            raise TrackingUnavailable(
                f"MLflow tracking server {run['tracking_uri']} unreachable: {root}; training "
                f"{what}: once the server is back, rerun the stage (or `codeworld send-steps`), "
                f"or remove {marker} to give them up") from err
        raise TrainingFailed(f"{what}; MLflow refused them ({type(err).__name__}: {err}): "
                             f"remove {marker} to give them up") from err
    if sent:
        print(f"{steps.parent.name}: sent MLflow the {sent} training steps its tracking "
              "server missed", file=sys.stderr)
    for c in closed:
        print(f"{steps.parent.name}: closed MLflow run {c['run_id']} as {c['close']['status']} "
              "(its tracking server missed the close)", file=sys.stderr)


def read_steps(out: Path) -> list[dict]:
    return read_rows(out / STEPS)


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
    """DVC plot source: the per-step rows as one JSON list, without the time each was logged
    (MLflow's; the plot is by step)."""
    rows = [{k: v for k, v in r.items() if k != TIME} for r in rows]
    body = json.dumps(rows, indent=1, sort_keys=True).encode() + b"\n"
    write_file_atomic(path, body)


def run_phase(params: Params, phase: str, *, track: bool = True, extra: list[str] = (),
              metrics_path: str | None = "default", plot_path: str | None = "default") -> dict:
    assert phase in PHASES, phase
    from model.build import check_machine

    # First: a precision, graph mode or backend this machine lacks must fail before
    # open_phase, whose claim clears the phase's checkpoints for a new fingerprint (precision
    # and cuda_graph are in it), only for torchrun to fail on the same setting. The precision
    # it resolves is the fingerprint's (resolved once).
    precision = check_machine(params, phase).name
    metrics_path = f"metrics/{phase}.json" if metrics_path == "default" else metrics_path
    plot_path = f"metrics/plots/{phase}.json" if plot_path == "default" else plot_path
    cfg = phase_config(params, phase)
    out = phase_dir(params, phase)
    parent = parent_record(params, phase)
    fp = phase_fingerprint(params, phase, parent, precision)
    # The ranks make the same split (model/data.py); this fails before torchrun when no
    # source of the blend can validate, and says which sources train without validating.
    sources = pack_sources(params, phase)
    validated, train_only = plan_validation({n: m["documents"] for n, m in sources.items()})
    try:   # before torchrun: a source the blend's unit cannot weigh fails here
        shares = blend_shares(cfg, sources)
    except ValueError as err:
        raise TrainingFailed(f"{manifest_path(params)}: {err}") from None
    with phase_run(out, phase, params.model_dump(include={"model", "parallel", phase}),
                   params.tracking.experiment, metrics_path, track) as (run_, lock_fd):
        tags = {"codeworld.valid_sources": ",".join(validated),
                "codeworld.train_only_sources": ",".join(train_only) or "-"}
        if parent:
            tags.update({f"codeworld.parent_{k}": str(v) for k, v in parent.items()})
        _set_tags(run_, tags)
        run_.log(valid_sources=len(validated), train_only_sources=len(train_only), **shares)
        # mlflow_run_id: the ranks on other nodes read it here (model/metrics.tracking_run_id)
        record = {"phase": phase, "fingerprint": fp, "parent": parent, "mlflow_run_id": run_.run_id,
                  "valid_sources": validated, "train_only_sources": train_only,
                  "tokenizer_sha256": tokenizer_of(params)}
        open_phase(out, record)
        done = resume_point(out, phase)
        if done is None or done[0] < cfg.steps:
            check_pack(params, phase, out)
            train(params, phase, out, torchrun_command(params, phase, out, list(extra)), run_,
                  lock_fd)
        rows = read_steps(out)
        stats = summary(rows)
        run_.log(**stats)
        if plot_path:
            write_plot(rows, plot_path)
        final = checkpoint.latest(out)
        return {"name": phase, "fingerprint": fp, "records": stats.get("steps", 0),
                "checkpoint": str(final[1]) if final else None, "stats": stats,
                "parent": parent, "train_only_sources": train_only}


def _set_tags(run_: StageRun, tags: dict[str, str]) -> None:
    """MLflow tags on the phase's run (the parent checkpoint, the validated sources)."""
    if run_.run_id:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri())
        with tracking_server():   # an outage here is one (exit 75), not a traceback
            for key, value in tags.items():
                client.set_tag(run_.run_id, key, value)
