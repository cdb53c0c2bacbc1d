"""Training beyond one machine: model/launch.py's torchrun command on two "nodes" of this
machine (two torchrun agents, c10d rendezvous on loopback) trains as one data-parallel run;
the SLURM script and the Kubernetes manifests give the launcher the variables it reads."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from codeworld.config import parse_params
from model import launch
from tests.train_fixtures import build_training_root, tiny_params, write_yaml

REPO = Path(__file__).resolve().parents[1]
TOL = 2e-4        # as tests/test_train.py: DP sums the loss over ranks in another order
RUN = {"steps": 3, "save_interval": 3, "eval_interval": 3}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    build_training_root(root)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def storage(root: Path, name: str) -> Path:
    """A storage root of its own (its own checkpoints/) on the shared packed data."""
    d = root / name
    d.mkdir()
    (d / "pack").symlink_to(root / "pack")
    return d


def prepare(root: Path, name: str, **parallel) -> tuple[Path, object]:
    """params.yaml of the tiny model and, as node 0's stage would, the params.json the ranks read."""
    store = storage(root, name)
    raw = tiny_params(store, pretrain=RUN, parallel=parallel)
    path = write_yaml(store / "params.yaml", raw)
    params = parse_params(raw)
    from stages.train_phase import PARAMS, phase_dir

    out = phase_dir(params, "pretrain")
    out.mkdir(parents=True)
    (out / PARAMS).write_text(json.dumps(params.model_dump()))
    return path, params


def run_all(cmds: list[tuple[list[str], dict, Path]], timeout: float = 300) -> list[int]:
    """Start each command in its own process group (a torchrun and all it starts), wait for
    all, and kill what is left of every group whatever happens."""
    procs = []
    try:
        for cmd, env, log in cmds:
            with open(log, "w") as f:   # a file, not a pipe: leftovers cannot block a read
                procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f,
                                              stderr=subprocess.STDOUT, start_new_session=True))
            time.sleep(1)               # the worker waits for node 0's store: that path is tested
        deadline = time.monotonic() + timeout
        return [p.wait(timeout=max(1, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def losses(params) -> dict[int, float]:
    from stages.train_phase import STEPS, phase_dir

    rows = (phase_dir(params, "pretrain") / STEPS).read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, rows)}


def test_two_nodes_train_as_one_data_parallel_run(root, tmp_path):
    base_env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base_env.pop("CODEWORLD_TRAIN_RUN_ID", None)
    _, one = prepare(root, "one")
    one_cmd = launch.torchrun_command(one, "pretrain", env={})
    assert "--standalone" in one_cmd and "--nproc-per-node=1" in one_cmd
    path, two = prepare(root, "two", nnodes=2, nproc=1)
    # The phase's MLflow run, as node 0's stage records it in run.json: the logging rank may
    # be on either node, and neither torchrun here has the stage's CODEWORLD_TRAIN_RUN_ID.
    from mlflow.tracking import MlflowClient
    from stages.train_phase import RUN, phase_dir

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("multinode")).info.run_id
    (phase_dir(two, "pretrain") / RUN).write_text(json.dumps({"mlflow_run_id": run_id}))
    base_env["MLFLOW_TRACKING_URI"] = uri
    rdzv = {**base_env, launch.ENDPOINT: f"127.0.0.1:{free_port()}", launch.RDZV_ID: "test",
            launch.TIMEOUT: "120"}
    node0 = {**rdzv, launch.NODE_RANK: "0"}
    # Node 1 through the CLI, as the SLURM script and the Kubernetes pods run it (a node other
    # than 0 execs its torchrun); node 0's torchrun is the command its stage would start.
    node1_cli = [sys.executable, "-m", "model.launch", "--phase", "pretrain", "--params", str(path)]
    codes = run_all([(one_cmd, base_env, tmp_path / "one.log"),
                     (node1_cli, {**rdzv, launch.NODE_RANK: "1"}, tmp_path / "node1.log"),
                     (launch.torchrun_command(two, "pretrain", env=node0), node0,
                      tmp_path / "node0.log")])
    logs = {n: (tmp_path / f"{n}.log").read_text()[-3000:] for n in ("one", "node0", "node1")}
    assert codes == [0, 0, 0], logs
    base, dp = losses(one), losses(two)
    assert sorted(base) == sorted(dp) == [1, 2, 3]
    for step, loss in base.items():
        assert dp[step] == pytest.approx(loss, abs=TOL), (step, base, dp)
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert logged == pytest.approx(dp, abs=1e-6), (logged, dp)


def test_a_worker_node_of_a_finished_phase_starts_nothing(root, tmp_path):
    """Node 0's stage returns at once for a finished phase of the same fingerprint; the other
    nodes must not wait for its torchrun (they would, until the rendezvous timeout)."""
    from stages import train_phase

    path, params = prepare(root, "done", nnodes=2, nproc=1)
    out = train_phase.phase_dir(params, "pretrain")
    (out / "iter_0000003").mkdir()
    (out / "latest.json").write_text(json.dumps({"iteration": 3, "dir": "iter_0000003"}))
    env = {**os.environ, launch.ENDPOINT: "127.0.0.1:9", launch.RDZV_ID: "x", launch.NODE_RANK: "1"}
    cmd = [sys.executable, "-m", "model.launch", "--phase", "pretrain", "--params", str(path)]
    (out / train_phase.RUN).write_text(json.dumps({"fingerprint": "another"}))
    assert not launch.finished(params, "pretrain")    # other params or code: train again
    (out / train_phase.RUN).write_text(json.dumps(
        {"fingerprint": train_phase.phase_fingerprint(params, "pretrain")}))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "already finished" in proc.stdout, proc.stderr
    # a final checkpoint cut since it was saved: node 0 trains again from an older one, so
    # this node must join its torchrun, not exit and leave the rendezvous waiting
    from model.checkpoint import FILES

    (out / "iter_0000003" / "__0_0.distcp").write_bytes(b"x")
    (out / "iter_0000003" / FILES).write_text(json.dumps({"__0_0.distcp": 100}))
    assert not launch.finished(params, "pretrain")


def test_missing_rendezvous_variables_are_named():
    params = parse_params(tiny_params(Path("/tmp/x"), parallel={"nnodes": 2, "nproc": 1}))
    full = {launch.ENDPOINT: "h:1", launch.RDZV_ID: "j", launch.NODE_RANK: "1"}
    for missing, named in ((launch.ENDPOINT, "CODEWORLD_RDZV_ENDPOINT"),
                           (launch.RDZV_ID, "CODEWORLD_RDZV_ID"),
                           (launch.NODE_RANK, "CODEWORLD_NODE_RANK")):
        env = {k: v for k, v in full.items() if k != missing}
        with pytest.raises(launch.LaunchError, match=named):
            launch.launcher_args(params, "pretrain", env)
    with pytest.raises(launch.LaunchError, match="SLURM_NNODES=3"):
        launch.launcher_args(params, "pretrain", {**full, "SLURM_NNODES": "3"})
    with pytest.raises(launch.LaunchError, match="expected HOST:PORT"):
        launch.launcher_args(params, "pretrain", {**full, launch.ENDPOINT: "nohost"})
    # what SLURM and torchrun users already set does as well
    args = launch.launcher_args(params, "pretrain", {"MASTER_ADDR": "n1", "SLURM_JOB_ID": "7",
                                                     "SLURM_NODEID": "0", "SLURM_NNODES": "2"})
    assert {"--rdzv-endpoint=n1:29400", "--rdzv-id=7-pretrain", "--nnodes=2"} <= set(args)
    assert any("is_host=true" in a for a in args)


def test_stages_start_torchrun_through_the_launcher(tmp_path, monkeypatch):
    """stages/train_phase.py and stages/rl.py build their torchrun with model/launch.py, so
    node 0's stage joins the other nodes' rendezvous."""
    from stages import rl, train_phase

    for k, v in {launch.ENDPOINT: "n1:29400", launch.RDZV_ID: "j", launch.NODE_RANK: "0"}.items():
        monkeypatch.setenv(k, v)
    params = parse_params(tiny_params(tmp_path, parallel={"nnodes": 2, "nproc": 1},
                                      model={"max_position_embeddings": 2048},
                                      rl={"init_from": "pretrain"}))
    out = train_phase.phase_dir(params, "pretrain")
    out.mkdir(parents=True)
    assert train_phase.torchrun_command(params, "pretrain", out) == \
        launch.torchrun_command(params, "pretrain")
    rl_out = train_phase.phase_dir(params, "rl")
    rl_out.mkdir(parents=True)
    parent = {"checkpoint": str(out / "iter_0000004")}
    assert rl.torchrun_command(params, rl_out, parent) == launch.torchrun_command(params, "rl")


def test_every_rank_hashes_strings_alike(tmp_path, monkeypatch):
    """The torchrun of a stage and of a worker node runs with one fixed hash seed, whatever
    the caller's: no rank's numbers can follow the order of a set of strings."""
    monkeypatch.setenv("PYTHONHASHSEED", "1")
    params = parse_params(tiny_params(tmp_path))
    assert launch.worker_env(params)["PYTHONHASHSEED"] == "0"


def test_a_run_on_another_root_keeps_its_metrics_beside_its_checkpoints(root, tmp_path):
    """Node 0 through the CLI on a storage root of its own (a cluster's, a scratch one) trains
    and writes the phase's summary and plot beside that root's checkpoints, leaving the
    pipeline's metrics/ (dvc.yaml's outputs) alone; --metrics-dir puts them elsewhere."""
    store = storage(root, "elsewhere")
    path = write_yaml(store / "params.yaml", tiny_params(store, pretrain=RUN))
    ours = [REPO / "metrics" / "pretrain.json", REPO / "metrics" / "plots" / "pretrain.json"]
    before = [(f.read_bytes(), f.stat().st_mtime_ns) if f.exists() else None for f in ours]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CODEWORLD_TRAIN_RUN_ID", None)
    cmd = [sys.executable, "-m", "model.launch", "--phase", "pretrain", "--params", str(path),
           "--no-track"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((store / "metrics" / "pretrain.json").read_text())
    assert summary["steps"] == 3, summary
    plot = json.loads((store / "metrics" / "plots" / "pretrain.json").read_text())
    assert [r["step"] for r in plot] == [1, 2, 3]
    assert json.loads(proc.stdout.splitlines()[-1])["metrics"] == str(store / "metrics" / "pretrain.json")
    assert [(f.read_bytes(), f.stat().st_mtime_ns) if f.exists() else None for f in ours] == before
    # finished: nothing trains again, and the figures go where they are asked to
    other = tmp_path / "figures"
    proc = subprocess.run([*cmd, "--metrics-dir", str(other)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    untimed = lambda d: {k: v for k, v in d.items() if not k.startswith("seconds")}
    assert untimed(json.loads((other / "pretrain.json").read_text())) == untimed(summary)
    assert json.loads((other / "plots" / "pretrain.json").read_text()) == plot
    # the pipeline's own checkpoints keep the pipeline's metrics/
    pipeline = parse_params(tiny_params(Path("data")))
    assert launch.metrics_paths(pipeline, "midtrain") == ("metrics/midtrain.json",
                                                          "metrics/plots/midtrain.json")


# --- infra/: the SLURM script and the Kubernetes manifests agree with model/launch.py --------

def launched(cmd_output: str) -> list[str]:
    """The torchrun argv that `model.launch --print` printed (after its comment line)."""
    lines = [l for l in cmd_output.splitlines() if l and not l.startswith("#")]
    assert len(lines) == 1, cmd_output
    return shlex.split(lines[0])


def test_sbatch_script_launches_every_node_through_the_launcher(tmp_path):
    script = REPO / "infra" / "slurm" / "train.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    gpus = int(re.search(r"^#SBATCH --gpus-per-node=(\d+)", text, re.M).group(1))
    # Stand-ins for SLURM's commands: scontrol names two nodes; srun runs its command once per
    # node with that node's SLURM_NODEID, as one task per node would.
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a\\ngpu-b\\n'\n")
    (bin_ / "srun").write_text(
        "#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done\n"
        f"for i in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$i \"$@\" > {tmp_path}/node$i &"
        " pids+=($!); done\nfor p in \"${pids[@]}\"; do wait $p || exit; done\n"
        f"for i in $(seq 0 $((SLURM_NNODES - 1))); do cat {tmp_path}/node$i; echo; done\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CODEWORLD_"))},
           "PATH": f"{bin_}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_SUBMIT_DIR": str(REPO), "PRINT": "1",
           "PYTHON": sys.executable, "MLFLOW_TRACKING_URI": "http://mlflow:5000", "PHASE": "sft"}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    nodes = [n for n in proc.stdout.split("\n\n") if n.strip()]
    assert len(nodes) == 2 and "sft stage runs here" in nodes[0], proc.stdout
    for rank, out in enumerate(nodes):
        argv = launched(out)
        assert {"--nnodes=2", f"--nproc-per-node={gpus}", "--rdzv-backend=c10d",
                "--rdzv-endpoint=gpu-a:29400", "--rdzv-id=slurm-42-sft"} <= set(argv), argv
        assert f"is_host={'true' if rank == 0 else 'false'}" in argv[argv.index("--rdzv-backend=c10d") + 3]
        assert argv[argv.index("-m", 2):][:4] == ["-m", "model.train", "--phase", "sft"]
    # without a tracking server it says so, before any node starts
    env.pop("MLFLOW_TRACKING_URI")
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "MLFLOW_TRACKING_URI" in proc.stderr


def k8s_docs() -> list[dict]:
    docs = []
    for f in sorted((REPO / "infra" / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in env values, command and args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def test_kubernetes_job_gives_each_pod_what_the_launcher_reads():
    docs = k8s_docs()
    job = next(d for d in docs if d["kind"] == "Job")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    service = next(d for d in docs if d["kind"] == "Service"
                   and d["metadata"]["name"] == pod["subdomain"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert "JOB_COMPLETION_INDEX" in launch.NODE_RANK_FALLBACK
    (c,) = pod["containers"]
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    mounts = {m["mountPath"]: claims[m["name"]] for m in c["volumeMounts"]}
    assert mounts["/opt/codeworld/data"] == "codeworld-data"   # the image's storage root
    assert re.search(r"^WORKDIR /opt/codeworld$", (REPO / "infra" / "Dockerfile").read_text(), re.M)
    assert c["workingDir"] == "/opt/codeworld"
    names = {e["name"] for e in c["env"]}
    assert {launch.ENDPOINT, launch.RDZV_ID} <= names
    assert job["metadata"]["name"] == f"codeworld-{next(e['value'] for e in c['env'] if e['name'] == 'PHASE')}"

    nnodes = spec["parallelism"]
    procs = {}
    for index in (0, nnodes - 1):   # node 0 (the stage, the store) and a worker
        # what Kubernetes gives pod `index`: the downward API's labels, JOB_COMPLETION_INDEX
        labels = {"batch.kubernetes.io/job-name": job["metadata"]["name"],
                  "batch.kubernetes.io/controller-uid": "uid-1"}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CODEWORLD_"))}
        env["JOB_COMPLETION_INDEX"] = str(index)
        for e in c["env"]:
            if "value" in e:
                env[e["name"]] = expand(e["value"], env)
            else:
                field = e["valueFrom"]["fieldRef"]["fieldPath"]
                env[e["name"]] = labels[re.fullmatch(r"metadata\.labels\['(.+)'\]", field).group(1)]
        argv = [expand(a, env) for a in c["command"] + c["args"]]
        assert argv[:3] == ["python", "-m", "model.launch"]
        procs[index] = subprocess.Popen([sys.executable, *argv[1:], "--print"], cwd=REPO, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for index, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        torchrun = launched(out)
        endpoint = f"{job['metadata']['name']}-0.{service['metadata']['name']}:" \
                   f"{service['spec']['ports'][0]['port']}"
        gpus = c["resources"]["limits"]["nvidia.com/gpu"]
        assert {f"--nnodes={nnodes}", f"--nproc-per-node={gpus}", f"--rdzv-endpoint={endpoint}",
                "--rdzv-id=uid-1-pretrain"} <= set(torchrun), torchrun
        assert (f"is_host={'true' if index == 0 else 'false'}" in " ".join(torchrun))


def test_image_pins_what_pyproject_pins():
    docker = (REPO / "infra" / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", docker, re.M).group(1)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-devel-ubuntu\d+\.\d+", base), base
    pyproject = (REPO / "pyproject.toml").read_text()
    for dist in ("transformer-engine", "torch"):
        pin = re.search(rf'"{dist}(?:\[[\w,]+\])?==([\d.]+)"', pyproject).group(1)
        assert re.search(rf"{dist}(\[[\w,]+\])?=={re.escape(pin)}\b", docker), (dist, pin)
    assert '"megatron-core==0.16.1"' in pyproject and "pip install -e ." in docker
    assert "bubblewrap" in docker


def test_the_worked_example_overlays_are_valid_layouts():
    from codeworld.config import load_params
    from codeworld.overrides import apply_overrides

    base = load_params(REPO / "params.yaml")
    overlays = REPO / "infra" / "params"
    big = apply_overrides(base, launch.overlay_items(overlays / "h100-7b.yaml"))
    par = big.parallel
    assert (par.nproc, par.nnodes, par.tensor, par.pipeline) == (8, 4, 8, 2)
    assert par.nproc * par.nnodes // (par.tensor * par.pipeline) == 2   # data parallel
    rl = apply_overrides(base, launch.overlay_items(overlays / "h100-7b.yaml")
                         + launch.overlay_items(overlays / "h100-7b-rl.yaml"))
    from model.rl import check_rl_layout

    check_rl_layout(rl)


# --- the data indices on nodes that share no local disk ----------------------------------------

def node_indices(cache: Path) -> list[tuple[str, bytes]]:
    """The Megatron index files one node's cache holds: (name without Megatron's hash, bytes
    with the node's own cache path made neutral), sorted. Megatron hashes the pack's path into
    its file names and descriptions, and each "node" here has its own path."""
    return sorted((f.name.split("-", 1)[1], f.read_bytes().replace(str(cache).encode(), b"CACHE"))
                  for f in (cache / ".work").rglob("*") if f.suffix in (".npy", ".txt"))


def test_two_nodes_with_node_local_caches_each_have_the_data_indices(root, tmp_path, s3_endpoint):
    """An S3 storage root: each node fetches the pack into its own storage.local_cache (a
    local disk, here a folder per "node") and keeps Megatron's sample and shuffle indices
    there. Megatron builds them on global rank 0 only and the other ranks read them from the
    cache after a barrier: the ranks of the node without rank 0 would find none. Both nodes
    must train, hold the same indices, and give the losses of one process on a local root."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    bucket = f"cw-{os.urandom(6).hex()}"
    client.create_bucket(Bucket=bucket)
    for f in sorted((root / "pack").iterdir()):
        if f.is_file() and not f.name.startswith("."):
            client.upload_file(str(f), bucket, f"run/pack/{f.name}")
    shared = tmp_path / "shared"        # the checkpoints: a file system every node mounts
    shared.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CODEWORLD_TRAIN_RUN_ID", None)
    rdzv = {launch.ENDPOINT: f"127.0.0.1:{free_port()}", launch.RDZV_ID: "idx",
            launch.TIMEOUT: "120"}
    cmds = []
    for node in (0, 1):
        raw = tiny_params(root, pretrain=RUN, parallel={"nnodes": 2, "nproc": 1})
        raw["storage"] = {"root": f"s3://{bucket}/run", "s3_endpoint_url": s3_endpoint,
                          "local_cache": str(tmp_path / f"node{node}" / "cache")}
        path = write_yaml(tmp_path / f"node{node}.yaml", raw)
        params = parse_params(raw)
        node_env = {**rdzv, launch.NODE_RANK: str(node)}
        cmd = [sys.executable, "-m", "torch.distributed.run",
               *launch.launcher_args(params, "pretrain", node_env),
               "-m", "model.train", "--phase", "pretrain", "--params", str(path),
               "--pack", str(tmp_path / f"node{node}" / "cache" / "pack"),
               "--out", str(shared / "ck"), "--steps-log", str(shared / "steps.jsonl")]
        cmds.append((cmd, {**env, **node_env}, tmp_path / f"node{node}.log"))
    _, one = prepare(root, "one-local")
    one_cmd = launch.torchrun_command(one, "pretrain", env={})
    codes = run_all([*cmds, (one_cmd, env, tmp_path / "one.log")])
    logs = {n: (tmp_path / f"{n}.log").read_text()[-3000:] for n in ("node0", "node1", "one")}
    assert codes == [0, 0, 0], logs
    caches = [node_indices(tmp_path / f"node{n}" / "cache") for n in (0, 1)]
    assert len(caches[0]) > 10 and caches[0] == caches[1], [[n for n, _ in c] for c in caches]
    rows = [json.loads(l) for l in (shared / "steps.jsonl").read_text().splitlines()]
    dp = {r["step"]: r["loss"] for r in rows}
    base = losses(one)
    assert sorted(dp) == sorted(base) == [1, 2, 3]
    for step, loss in base.items():
        assert dp[step] == pytest.approx(loss, abs=TOL), (step, base, dp)
