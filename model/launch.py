"""This node's torchrun command for a training phase, on one node or many.

    python -m model.launch --phase pretrain [--params params.yaml] [--overlay FILE ...]
                           [--set SECTION.KEY=JSON ...] [--metrics-dir DIR] [--print]

One node (`parallel.nnodes` 1): `torchrun --standalone --nproc-per-node N`, as the stages have
always run it. Several nodes: every node runs this same command (infra/slurm/train.sbatch,
infra/k8s/train-job.yaml); node 0 runs the phase's stage (fingerprint, run.json, resume or
start over, the MLflow run, metrics), whose torchrun is one of the nnodes agents; every other
node execs its torchrun straight away, and c10d's rendezvous holds them until node 0's joins.
The ranks all read `checkpoints/<phase>/params.json` and `run.json` (the MLflow run the logging
rank logs each step to, wherever that rank lands), which node 0's stage writes before its
torchrun starts, so the checkpoints directory must be one every node shares (with an S3
storage root it is data/checkpoints; the packed data then comes from S3 into each node's
storage.local_cache).

The environment names the rendezvous (what SLURM and Kubernetes set, or set by hand):

    CODEWORLD_RDZV_ENDPOINT  HOST:PORT of node 0's rendezvous store;
                             else MASTER_ADDR, with MASTER_PORT (default 29400)
    CODEWORLD_RDZV_ID        one id for the nodes of one run; else SLURM_JOB_ID
    CODEWORLD_NODE_RANK      0 on the node that runs the stage; else SLURM_NODEID, else
                             JOB_COMPLETION_INDEX (a Kubernetes Indexed Job)
    CODEWORLD_RDZV_TIMEOUT   seconds a node waits for the others (default 1800: node 0 may
                             prepare for a while first, the rl task pool for one)

torchrun's global ranks follow c10d's order of the nodes, not CODEWORLD_NODE_RANK: which node
holds which pipeline stage is torchrun's choice; only the stage's bookkeeping is pinned to node 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

from codeworld.config import PHASES, ConfigError, Params, load_params, read_yaml

ENDPOINT = "CODEWORLD_RDZV_ENDPOINT"
RDZV_ID = "CODEWORLD_RDZV_ID"
NODE_RANK = "CODEWORLD_NODE_RANK"
TIMEOUT = "CODEWORLD_RDZV_TIMEOUT"
# Fallbacks, in order: what torchrun users, SLURM and a Kubernetes Indexed Job already set.
ENDPOINT_FALLBACK = ("MASTER_ADDR", "MASTER_PORT")
ID_FALLBACK = ("SLURM_JOB_ID",)
NODE_RANK_FALLBACK = ("SLURM_NODEID", "JOB_COMPLETION_INDEX")
DEFAULT_PORT = 29400      # c10d's own default
DEFAULT_TIMEOUT = 1800
ALL_PHASES = (*PHASES, "rl")
# What a rank's MLflow call waits at most (worker_env), about: 3 tries of 20 s, 2 + 4 s apart.
RANK_MLFLOW_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


class LaunchError(ConfigError):
    """The environment cannot place this node in a multi-node run (a missing variable...)."""


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    for name in names:
        if env.get(name, "").strip():
            return name, env[name].strip()
    return None


def rendezvous_endpoint(env: Mapping[str, str]) -> str:
    if value := env.get(ENDPOINT, "").strip():
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise LaunchError(f"{ENDPOINT}={value!r}: expected HOST:PORT")
        return value
    if addr := env.get("MASTER_ADDR", "").strip():
        port = env.get("MASTER_PORT", "").strip() or str(DEFAULT_PORT)
        if not port.isdigit():
            raise LaunchError(f"MASTER_PORT={port!r}: expected a port number")
        return f"{addr}:{port}"
    raise LaunchError(f"parallel.nnodes > 1 needs the rendezvous endpoint: set {ENDPOINT}="
                      f"HOST:PORT (node 0's address) or MASTER_ADDR [and MASTER_PORT]")


def rendezvous_id(env: Mapping[str, str], phase: str) -> str:
    found = _first(env, (RDZV_ID, *ID_FALLBACK))
    if found is None:
        raise LaunchError(f"parallel.nnodes > 1 needs a rendezvous id shared by the nodes of "
                          f"this run: set {RDZV_ID} (or run under SLURM, which sets "
                          f"{', '.join(ID_FALLBACK)})")
    # One id per phase: a job that runs two phases in turn never joins the last one's round.
    return f"{found[1]}-{phase}"


def node_rank(env: Mapping[str, str]) -> int:
    found = _first(env, (NODE_RANK, *NODE_RANK_FALLBACK))
    if found is None:
        raise LaunchError(f"parallel.nnodes > 1 needs this node's index (0 runs the stage): set "
                          f"{NODE_RANK} (SLURM sets SLURM_NODEID, an Indexed Job "
                          f"JOB_COMPLETION_INDEX)")
    name, value = found
    if not value.isdigit():
        raise LaunchError(f"{name}={value!r}: expected a node index 0, 1, ...")
    return int(value)


def launcher_args(params: Params, phase: str, env: Mapping[str, str]) -> list[str]:
    """torchrun's own flags for this node."""
    par = params.parallel
    if par.nnodes == 1:
        return ["--standalone", f"--nproc-per-node={par.nproc}"]
    if (n := env.get("SLURM_NNODES", "").strip()) and n != str(par.nnodes):
        raise LaunchError(f"parallel.nnodes is {par.nnodes} but SLURM allocated SLURM_NNODES={n} "
                          f"nodes: set parallel.nnodes={n} or sbatch --nodes={par.nnodes}")
    rank = node_rank(env)
    if rank >= par.nnodes:
        raise LaunchError(f"node index {rank} is not below parallel.nnodes {par.nnodes}")
    timeout = env.get(TIMEOUT, "").strip() or str(DEFAULT_TIMEOUT)
    if not timeout.isdigit() or int(timeout) <= 0:
        raise LaunchError(f"{TIMEOUT}={timeout!r}: expected a number of seconds > 0")
    # is_host: node 0 serves the rendezvous store (a hostname match would guess it, wrongly
    # behind Kubernetes DNS names). read_timeout is how long the others keep trying to reach
    # it while node 0's stage prepares; join_timeout how long a round may wait for all nodes.
    conf = f"join_timeout={timeout},read_timeout={timeout},is_host={str(rank == 0).lower()}"
    return [f"--nnodes={par.nnodes}", f"--nproc-per-node={par.nproc}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rendezvous_endpoint(env)}", f"--rdzv-id={rendezvous_id(env, phase)}",
            f"--rdzv-conf={conf}", "--max-restarts=0"]


def torchrun_command(params: Params, phase: str, env: Mapping[str, str] | None = None,
                     extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The torchrun argv of `phase` on this node: launcher flags from params.parallel and the
    environment, then the phase's entry (model.train, or model.rl for rl) on the phase's
    directory. Writes nothing: the stage writes the params.json it points at."""
    from stages.train_phase import PARAMS, STEPS, phase_config, phase_dir
    from stages.pack import local_dir

    if phase not in ALL_PHASES:
        raise ConfigError(f"unknown phase {phase!r} (known: {', '.join(ALL_PHASES)})")
    env = os.environ if env is None else env
    out = phase_dir(params, phase)
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher_args(params, phase, env)]
    if phase == "rl":
        from stages.rl import POOL

        if params.rl is None:
            raise ConfigError("params has no rl section: the rl phase is not configured")
        cmd += ["-m", "model.rl", "--params", str(out / PARAMS), "--pool", str(out / POOL),
                "--out", str(out), "--init-from", str(phase_dir(params, params.rl.init_from)),
                "--steps-log", str(out / STEPS)]
    else:
        cmd += ["-m", "model.train", "--phase", phase, "--params", str(out / PARAMS),
                "--pack", str(local_dir(params)), "--out", str(out), "--steps-log", str(out / STEPS)]
        if init_from := phase_config(params, phase).init_from:
            cmd += ["--init-from", str(phase_dir(params, init_from))]
    return cmd + list(extra)


def finished(params: Params, phase: str) -> bool:
    """Whether node 0's stage will find this phase done (same fingerprint, last step saved
    and intact) and start no torchrun: then the other nodes must not wait for it either."""
    from model import checkpoint
    from stages import train_phase

    out = train_phase.phase_dir(params, phase)
    try:
        found = checkpoint.latest(out)
        steps = params.rl.steps if phase == "rl" else train_phase.phase_config(params, phase).steps
        if found is None or found[0] < steps:
            return False
        if (bad := checkpoint.damage(found[1])) is not None:
            # node 0's stage resumes from an older intact checkpoint and starts its torchrun:
            # this node must join it, not leave it waiting at the rendezvous
            print(f"model.launch: {bad}: the final checkpoint is damaged, so the phase is "
                  f"trained again from an intact one", file=sys.stderr)
            return False
        recorded = json.loads((out / train_phase.RUN).read_text())["fingerprint"]
        if phase == "rl":
            from stages import rl

            return recorded == rl.rl_fingerprint(params, rl.parent_record(params))
        return recorded == train_phase.phase_fingerprint(params, phase)
    except Exception as err:   # anything amiss: train; node 0's stage says what is wrong
        print(f"model.launch: {out}: not taken as finished ({type(err).__name__}: {err})",
              file=sys.stderr)
        return False


def metrics_paths(params: Params, phase: str, metrics_dir: str | None = None) -> tuple[str, str]:
    """The phase's summary and per-step plot files (paths from the repository root): under
    `metrics_dir` when given; else the repository's metrics/ (dvc.yaml's outputs) only when the
    phase trains into the pipeline's own checkpoints (data/checkpoints/<phase>, which an S3
    root keeps too), else a metrics/ folder beside the checkpoints/ this run writes, so a run
    aimed at another root (a cluster's, a scratch one) leaves the pipeline's figures alone."""
    from codeworld.tracking import repo_root
    from stages.train_phase import phase_dir

    if metrics_dir is None:
        out = phase_dir(params, phase).resolve()
        pipeline = (repo_root() / "data" / "checkpoints" / phase).resolve()
        metrics_dir = "metrics" if out == pipeline else str(out.parent.parent / "metrics")
    return (os.path.join(metrics_dir, f"{phase}.json"),
            os.path.join(metrics_dir, "plots", f"{phase}.json"))


def worker_env(params: Params) -> dict[str, str]:
    """What every node's torchrun and its ranks run with (the stage's, stages/train_phase.py,
    and a node's without a stage): the MLflow server, one intra-op thread share per process,
    and one hash seed, so that nothing a rank computes can follow the order of a set of
    strings. (Pinned when mid-training's first loss was seen to move with PYTHONHASHSEED; that
    was oneMKL's first-call race, which model/__init__.py settles: it came back with the seed
    fixed, and went with the warm-up.) MLflow's HTTP retries and timeout are short unless set:
    by default a server that is down holds the logging rank 4 minutes and more per call (7
    retries, 2 s to 2 minutes apart, each try up to 120 s), and the other ranks with it at
    their next collective;
    the logging rank stops sending at the first failure and the stage sends the rest later
    (model/metrics.StepLog)."""
    from codeworld.tracking import tracking_uri

    threads = str(max(1, (os.cpu_count() or 1) // params.parallel.nproc))
    return {**RANK_MLFLOW_HTTP, **os.environ, "MLFLOW_TRACKING_URI": tracking_uri(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads),
            "PYTHONHASHSEED": "0"}


def overlay_items(path: Path) -> list[str]:
    """An overlay file (infra/params/*.yaml) as SECTION.KEY=JSON overrides: the sections it
    names are merged into params.yaml key by key, and each key's value replaces the file's."""
    data = read_yaml(path, "overlay")
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"{path}: an overlay maps sections to {{key: value}} mappings")
    return [f"{section}.{key}={json.dumps(value)}"
            for section, values in data.items() for key, value in values.items()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phase", required=True, choices=ALL_PHASES)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--overlay", action="append", default=[], metavar="FILE",
                    help="sections merged into params (infra/params/h100-7b.yaml...), before --set")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON",
                    help="override a parameter (parallel.tensor=8, storage.root=/shared/data...)")
    ap.add_argument("--print", action="store_true", help="print this node's command; run nothing")
    ap.add_argument("--no-track", action="store_true", help="node 0's stage logs no MLflow run")
    ap.add_argument("--metrics-dir", metavar="DIR",
                    help="where node 0 writes <phase>.json and plots/<phase>.json (default: "
                         "metrics/ for the pipeline's checkpoints, else beside the checkpoints)")
    args = ap.parse_args(argv)
    try:
        return _launch(args)
    except ConfigError as err:
        print(f"model.launch: error: {err}", file=sys.stderr)
        return 2


def _launch(args: argparse.Namespace) -> int:
    from codeworld.tracking import repo_root

    params = load_params(Path(args.params).resolve())
    # paths as the caller meant them, before the chdir below (an s3:// URL stays as it is)
    metrics_dir = args.metrics_dir
    if metrics_dir and "://" not in metrics_dir:
        metrics_dir = str(Path(metrics_dir).resolve())
    # One validation of the whole result: a layout that holds only with every change applied
    # (a 7B model with its TP) is never judged half-way.
    items = [i for f in args.overlay for i in overlay_items(Path(f).resolve())] + args.set
    if items:
        from codeworld.overrides import apply_overrides

        params = apply_overrides(params, items)
    # The stage hands torchrun paths under the storage root and runs it in the repository
    # root: resolve a relative root from there on every node alike.
    os.chdir(repo_root())
    nnodes = params.parallel.nnodes
    rank = 0 if nnodes == 1 else node_rank(os.environ)
    cmd = torchrun_command(params, args.phase)
    if args.print:
        role = f"the {args.phase} stage runs here and starts" if rank == 0 else "worker node"
        print(f"# node {rank} of {nnodes}: {role}\n{shlex.join(cmd)}")
        return 0
    if rank == 0:
        import importlib

        metrics, plot = metrics_paths(params, args.phase, metrics_dir)
        result = importlib.import_module(f"stages.{args.phase}").run(
            params, track=not args.no_track, metrics_path=metrics, plot_path=plot)
        print(json.dumps({"stage": args.phase, "records": result.get("records"),
                          "checkpoint": result.get("checkpoint"), "metrics": metrics}))
        return 0
    if finished(params, args.phase):
        print(f"model.launch: {args.phase} already finished; node {rank} has nothing to do")
        return 0
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, worker_env(params))


if __name__ == "__main__":
    sys.exit(main())
