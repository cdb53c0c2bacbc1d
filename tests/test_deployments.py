"""Prefect deployments of the pipeline (flows/deploy.py) against a real `prefect server` and a
real `mlflow server` on loopback.

The integration test serves the real deployments (`python -m flows.deploy serve`) from a small
git+DVC workspace whose dvc.yaml keeps the project's corpus and dedup stages (so its `data`
deployment is those two real stages on a tiny tree), triggers runs through the server, and
checks the flow runs, their Prefect artifacts, the deployments' schedules and limits, the MLflow
runs' lineage tags, the overrides and that queued runs never overlap on the workspace.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from flows.deploy import SCHEDULES, prefect_yaml, specs

EXPERIMENT = "codeworld-deployments"
from codeworld.config import ConfigError
from flows.pipeline import dag_order, dvc_lineage, params_overridden, stage_groups, upstream
from tests.helpers import make_tree
from tests.servers import prefect_server, stop_process
from tests.test_flow_e2e import base_env, make_workspace

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FLOW = "codeworld-pipeline"
RUN_TIMEOUT = 300


# --- without a server ----------------------------------------------------------------------------

def test_deployments_follow_dvc_yaml():
    stages = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    by_name = {s["name"]: s for s in specs(REPO)}
    assert by_name["all"]["stages"] and sorted(by_name["all"]["stages"]) == sorted(stages)
    assert by_name["all"]["parameters"] == {"overrides": [], "force": False}
    assert by_name["all"]["cron"] == SCHEDULES["all"]
    groups = stage_groups(REPO / "dvc.yaml")
    assert sorted(s for g in groups.values() for s in g) == sorted(stages)  # each in one group
    assert groups["data"][:2] == ["corpus", "dedup"] and "pack" in groups["data"]
    assert "pretrain" in groups["train"]
    for g in groups:
        assert by_name[g]["parameters"]["group"] == g
    assert set(by_name) == {"all", *groups}


def test_groups_grow_with_dvc_yaml(tmp_path):
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    dvc["stages"]["eval_humaneval"] = {"cmd": "true", "deps": ["data/checkpoints/pretrain"],
                                       "outs": ["data/eval/humaneval"]}
    last = stage_groups(REPO / "dvc.yaml")["train"][-1]   # a phase after the last one
    dvc["stages"]["anneal"] = {"cmd": "true", "deps": [f"data/checkpoints/{last}"],
                               "outs": ["data/checkpoints/anneal"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc))
    groups = stage_groups(tmp_path / "dvc.yaml")
    assert "eval_humaneval" in groups["evaluate"]
    assert groups["train"][-1] == "anneal" and "pretrain" in groups["train"]
    assert {s["name"] for s in specs(tmp_path)} == {"all", "data", "train", "evaluate"}


def test_prefect_yaml_is_current():
    assert (REPO / "prefect.yaml").read_text() == prefect_yaml(REPO), \
        "prefect.yaml is stale: run `python -m flows.deploy prefect-yaml`"
    conf = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for d in conf["deployments"]:
        assert d["entrypoint"] == "flows/pipeline.py:pipeline"
        assert d["concurrency_limit"]["limit"] == 1


def test_cron_options_are_checked_and_reach_prefect_yaml(tmp_path):
    from flows import deploy

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    assert deploy.main(["prefect-yaml", "--root", str(tmp_path), "--cron", "data=0 1 * * *",
                        "--cron", "all="]) == 0
    conf = {d["name"]: d for d in yaml.safe_load((tmp_path / "prefect.yaml").read_text())["deployments"]}
    assert conf["data"]["schedules"] == [{"cron": "0 1 * * *", "timezone": "UTC", "active": True}]
    assert conf["all"]["schedules"] == []
    for bad, says in (("nope=0 1 * * *", "no deployment 'nope'"),
                      ("data=61 * * * *", "is not a cron expression"), ("data", "expected NAME=CRON")):
        with pytest.raises(SystemExit, match=says):
            deploy.main(["list", "--root", str(tmp_path), "--cron", bad])


def test_a_failed_prefect_yaml_write_leaves_the_old_file(tmp_path):
    # write_text truncated prefect.yaml first: a write cut short (here a file-size limit,
    # as a full disk would) left half a file that `prefect deploy --all` then read.
    import resource

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    old = "# the deployments of before\n"
    (tmp_path / "prefect.yaml").write_text(old)

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG rather than a kill

    run = subprocess.run([sys.executable, "-m", "flows.deploy", "prefect-yaml", "--root",
                          str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         preexec_fn=small_files)
    assert run.returncode == 1 and "prefect.yaml: cannot write" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    assert (tmp_path / "prefect.yaml").read_text() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dvc.yaml", "prefect.yaml"]


def test_a_named_stage_runs_with_what_it_needs_only(tmp_path):
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text(yaml.safe_dump({"stages": {
        "corpus": {"cmd": "c", "outs": ["data/corpus"]},
        "agent": {"cmd": "a", "outs": [{"data/agent": {"cache": False}}]},   # needs nothing
        "tokenizer": {"cmd": "t", "deps": ["data/corpus/manifest.json"], "outs": ["data/tok"]},
        "pack": {"cmd": "p", "deps": ["data/tok", "data/agent"], "outs": ["data/pack"]}}},
                                       sort_keys=False))
    assert dag_order(dvc_yaml) == ["corpus", "agent", "tokenizer", "pack"]
    # was every stage before it in DAG order: agent ran for the tokenizer
    assert upstream(dvc_yaml, ["tokenizer"]) == ["corpus", "tokenizer"]
    assert upstream(dvc_yaml, ["pack"]) == ["corpus", "agent", "tokenizer", "pack"]
    assert upstream(dvc_yaml, ["agent", "corpus"]) == ["corpus", "agent"]
    assert "agent" not in upstream(REPO / "dvc.yaml", ["tokenizer"])   # the project's own
    with pytest.raises(ValueError, match="unknown stage"):
        upstream(dvc_yaml, ["nosuch"])


def test_params_overridden_keeps_comments_and_restores(tmp_path):
    f = tmp_path / "params.yaml"
    text = "# top comment\npretrain:\n  steps: 100  # steps\n  lr: 0.001\ncorpus:\n  workers: 2\n"
    f.write_text(text)
    with params_overridden(f, ["pretrain.steps=50", 'corpus.extensions=[".py", ".pyi"]',
                               "dedup.threshold=0.8"]):
        during = f.read_text()
        data = yaml.safe_load(during)
        assert data["pretrain"] == {"steps": 50, "lr": 0.001}
        assert data["corpus"]["extensions"] == [".py", ".pyi"]
        assert data["dedup"]["threshold"] == 0.8   # (the section as validated: its defaults too)
        assert "# top comment" in during and "# steps" in during
    assert f.read_text() == text
    with pytest.raises(ConfigError, match="dedup.x"):   # validated before the file is touched
        with params_overridden(f, ["dedup.x=a"]):
            pass
    assert f.read_text() == text
    with params_overridden(f, ["pretrain.steps=70"]):
        f.write_text(text + "# edited by someone\n")
    assert f.read_text().endswith("# edited by someone\n")  # not clobbered


def _killed_while_overridden(f, overrides: list[str]) -> None:
    """A flow process killed (SIGKILL: OOM killer, power loss) while its overrides are in
    params.yaml: its `finally` never runs."""
    code = (f"import os, signal, sys; sys.path.insert(0, {str(Path(__file__).parents[1])!r})\n"
            "from pathlib import Path\nfrom flows.pipeline import params_overridden\n"
            f"with params_overridden(Path({str(f)!r}), {overrides!r}):\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def test_overrides_of_a_killed_flow_are_undone_by_the_next_run(tmp_path, capsys):
    """The next flow on the workspace puts params.yaml back as it was before the killed run's
    overrides (which it names), instead of running every later stage, and recording them in
    dvc.lock, with values nobody asked for (before: pretrain.steps stayed 50 for good)."""
    f = tmp_path / "params.yaml"
    text = "# top comment\npretrain:\n  steps: 100  # steps\n"
    f.write_text(text)
    _killed_while_overridden(f, ["pretrain.steps=50"])
    assert yaml.safe_load(f.read_text())["pretrain"]["steps"] == 50   # what the kill left
    with params_overridden(f, []):
        assert f.read_text() == text
    assert "pretrain.steps=50" in capsys.readouterr().out
    with params_overridden(f, ["pretrain.steps=70"]):   # and with overrides of its own
        assert yaml.safe_load(f.read_text())["pretrain"]["steps"] == 70
    assert f.read_text() == text
    # edited by hand after the kill: the edit stands, and the leftover overrides are named
    _killed_while_overridden(f, ["pretrain.steps=50"])
    f.write_text(f.read_text() + "# edited after the kill\n")
    edited = f.read_text()
    with params_overridden(f, []):
        pass
    assert f.read_text() == edited
    assert "pretrain.steps=50" in capsys.readouterr().out
    with params_overridden(f, []):   # said once
        pass
    assert "pretrain.steps" not in capsys.readouterr().out


def test_closing_the_pipeline_run_with_the_tracking_server_gone_does_not_raise(tmp_path,
                                                                              monkeypatch, capsys):
    """_end_parent_run runs in the flow's `finally`: raising there replaced the failed stage's
    own error (or failed a flow whose stages all succeeded) with an MlflowException."""
    import contextlib
    import socket

    import mlflow

    from codeworld.tracking import start_run
    from flows.pipeline import _end_parent_run

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.chdir(tmp_path)   # a sqlite store's artifacts go to ./mlruns
    start_run("pipeline", "codeworld-end-run", {})
    try:
        mlflow.set_tracking_uri(down)   # the server is gone by the end of the flow
        _end_parent_run("FAILED")
        assert mlflow.active_run() is None
        out = capsys.readouterr().out
        assert f"warning: MLflow pipeline run not closed at {down}" in out and "FAILED" in out
    finally:
        with contextlib.suppress(Exception):
            mlflow.end_run()
        mlflow.set_tracking_uri(None)


def test_dvc_lineage_reads_the_stage_entry(tmp_path):
    lock = {"schema": "2.0", "stages": {"dedup": {
        "cmd": "codeworld stage dedup",
        "deps": [{"path": "data/corpus", "hash": "md5", "md5": "aa.dir", "size": 1, "nfiles": 2},
                 {"path": "stages/dedup.py", "hash": "md5", "md5": "bb", "size": 3}],
        "params": {"params.yaml": {"dedup": {"threshold": 0.7}}},
        "outs": [{"path": "data/dedup", "hash": "md5", "md5": "cc.dir", "size": 4, "nfiles": 1}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    tags = dvc_lineage(tmp_path / "dvc.lock", "dedup")
    assert tags.pop("dvc.params.md5")
    assert tags == {"dvc.dep.data/corpus": "aa.dir", "dvc.dep.stages/dedup.py": "bb",
                    "dvc.out.data/dedup": "cc.dir"}
    assert dvc_lineage(tmp_path / "dvc.lock", "corpus") == {}
    assert dvc_lineage(tmp_path / "missing.lock", "dedup") == {}


# --- served deployments on a real Prefect server -------------------------------------------------

def _git(ws: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=ws, check=True,
                   capture_output=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory, request):
    if shutil.which("git") is None:
        pytest.skip("needs git")
    tmp = tmp_path_factory.mktemp("deploy")
    # The Prefect server starts in a thread while the MLflow server (shared with other modules)
    # and the workspace are made: each takes ~20 s on 2 cores.
    prefect_cm = prefect_server(tmp / "prefect")
    with ThreadPoolExecutor(1) as pool:
        api_future = pool.submit(prefect_cm.__enter__)
        try:
            mlflow_url = request.getfixturevalue("mlflow_url")
            # its own MLflow experiment: test_flow_e2e counts the runs of "codeworld" on the
            # same shared server
            ws = make_workspace(tmp / "ws", make_tree(tmp), tracking={"experiment": EXPERIMENT})
        except BaseException:
            with contextlib.suppress(Exception):
                api_future.result()
                prefect_cm.__exit__(None, None, None)
            raise
        api = api_future.result()
    try:
        dvc = yaml.safe_load((ws / "dvc.yaml").read_text())
        dvc["stages"] = {k: v for k, v in dvc["stages"].items() if k in ("corpus", "dedup")}
        (ws / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
        _git(ws, "add", "-A")
        _git(ws, "commit", "-qm", "workspace")
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws, capture_output=True,
                                text=True).stdout.strip()
        env = base_env()
        env.update(PREFECT_API_URL=api, MLFLOW_TRACKING_URI=mlflow_url, PREFECT_HOME=str(tmp / "home"),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false")
        log = tmp / "serve.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "flows.deploy", "serve", "--root", str(ws)],
                                    cwd=ws, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            yield {"api": api, "ws": ws, "log": log, "proc": proc, "mlflow": mlflow_url, "commit": commit}
        finally:
            stop_process(proc, grace=20)
    finally:
        prefect_cm.__exit__(None, None, None)


def _client(api: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class _Ctx:
        def __enter__(self):
            self._s = temporary_settings({PREFECT_API_URL: api})
            self._s.__enter__()
            self._c = get_client(sync_client=True)
            return self._c.__enter__()

        def __exit__(self, *exc):
            self._c.__exit__(*exc)
            self._s.__exit__(*exc)
    return _Ctx()


def _wait_for_deployments(served, names: set[str], timeout: float = 120) -> dict:
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with _client(served["api"]) as c:
        while True:
            found = {}
            for n in names:
                try:
                    found[n] = c.read_deployment_by_name(f"{FLOW}/{n}")
                except ObjectNotFound:
                    pass
            if set(found) == names:
                return found
            if served["proc"].poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"deployments {sorted(names - set(found))} not served:\n"
                            f"{served['log'].read_text(errors='replace')[-6000:]}")
            time.sleep(1)


def _wait_for_runs(served, ids: list, timeout: float = RUN_TIMEOUT) -> list:
    deadline = time.monotonic() + timeout
    with _client(served["api"]) as c:
        while True:
            runs = [c.read_flow_run(i) for i in ids]
            if all(r.state and r.state.is_final() for r in runs):
                return runs
            if served["proc"].poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"flow runs not finished: {[r.state_name for r in runs]}\n"
                            f"{served['log'].read_text(errors='replace')[-8000:]}")
            time.sleep(1)


@pytest.fixture(scope="module")
def deployed(served):
    """Three runs of the `data` deployment submitted at once: one with an override, the same
    again (DVC finds it up to date), and one with an invalid override."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deployments = _wait_for_deployments(served, {"all", "data"})
    params_before = (served["ws"] / "params.yaml").read_bytes()
    ids = []
    with temporary_settings({PREFECT_API_URL: served["api"]}):
        for overrides in (["corpus.shard_files=5"], ["corpus.shard_files=5"], ["corpus.shard_filez=5"]):
            fr = run_deployment(f"{FLOW}/data", parameters={"overrides": overrides}, timeout=0)
            ids.append(fr.id)
            time.sleep(0.5)  # keep the submission order
    runs = _wait_for_runs(served, ids)
    return {**served, "deployments": deployments, "runs": runs, "params_before": params_before}


def test_deployments_served_with_schedule_and_limit(deployed):
    deps = deployed["deployments"]
    assert "train" not in deps  # this workspace's dvc.yaml has no training stage
    all_, data = deps["all"], deps["data"]
    assert data.parameters["group"] == "data" and data.parameters["overrides"] == []
    assert [s.schedule.cron for s in all_.schedules] == [SCHEDULES["all"]] and all_.schedules[0].active
    assert not data.schedules
    for d in deps.values():
        assert d.global_concurrency_limit is not None and d.global_concurrency_limit.limit == 1


def test_data_deployment_runs_the_stages_with_overrides(deployed):
    ok, again, bad = deployed["runs"]
    log = deployed["log"].read_text(errors="replace")[-8000:]
    assert ok.state.is_completed(), (ok.state, log)
    assert again.state.is_completed(), (again.state, log)
    assert bad.state.is_failed(), (bad.state, log)
    # queued, never overlapping on the workspace
    spans = sorted((r.start_time, r.end_time) for r in (ok, again, bad))
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start, spans
    ws = deployed["ws"]
    assert (ws / "params.yaml").read_bytes() == deployed["params_before"]  # restored
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    assert lock["stages"]["corpus"]["params"]["params.yaml"]["corpus"]["shard_files"] == 5
    corpus = json.loads((ws / "data" / "corpus" / "manifest.json").read_text())
    assert len(corpus["shards"]) == -(-corpus["stats"]["counts"]["candidates"] // 5) > 1


def _artifacts(api: str, flow_run_id) -> dict:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _client(api) as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in arts}


def test_stage_artifacts_link_to_mlflow(deployed):
    from mlflow import MlflowClient

    ok, again, _ = deployed["runs"]
    arts = _artifacts(deployed["api"], ok.id)
    for stage in ("corpus", "dedup"):
        assert arts[f"{stage}-metrics"].type == "table"
        assert arts[f"{stage}-lineage"].type == "table"
        link = arts[f"{stage}-mlflow-run"].data  # a link artifact: markdown [text](url)
        url = link[link.index("](") + 2:-1]
        assert url.startswith(deployed["mlflow"] + "/#/experiments/"), link
        run_id = url.rsplit("/", 1)[1]
        assert MlflowClient(deployed["mlflow"]).get_run(run_id).data.tags["codeworld.stage"] == stage
    rows = json.loads(arts["corpus-metrics"].data)
    assert {r["metric"] for r in rows} >= {"records", "shards", "seconds_total"}
    summary = arts["pipeline-summary"].data
    assert f"[pipeline run]({deployed['mlflow']}/#/experiments/" in summary, summary
    assert summary.count("[run](") == 2, summary
    # the up-to-date run links the runs that made the outputs it found
    again_arts = _artifacts(deployed["api"], again.id)
    assert again_arts["dedup-mlflow-run"].data == arts["dedup-mlflow-run"].data


def test_mlflow_runs_carry_lineage(deployed):
    from mlflow import MlflowClient

    ok = deployed["runs"][0]
    client = MlflowClient(deployed["mlflow"])
    exp = client.get_experiment_by_name(EXPERIMENT)
    parents = client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{ok.id}'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["prefect.deployment"] == f"{FLOW}/data"
    assert json.loads(parent.data.tags["codeworld.overrides"]) == ["corpus.shard_files=5"]
    assert parent.data.tags["git.commit"] == deployed["commit"]
    children = {r.data.tags["codeworld.stage"]: r for r in client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    assert set(children) == {"corpus", "dedup"}
    lock = yaml.safe_load((deployed["ws"] / "dvc.lock").read_text())["stages"]
    for stage, run in children.items():
        tags = run.data.tags
        assert tags["git.commit"] == deployed["commit"]
        assert run.data.params["corpus.shard_files" if stage == "corpus" else "dedup.threshold"]
        for kind, key in (("dep", "deps"), ("out", "outs")):
            for item in lock[stage][key]:
                assert tags[f"dvc.{kind}.{item['path']}"] == item["md5"], (stage, item["path"])
        assert tags["dvc.params.md5"]
    assert children["corpus"].data.params["corpus.shard_files"] == "5"
    # the chain: dedup's input is exactly corpus's output
    assert children["dedup"].data.tags["dvc.dep.data/corpus"] == children["corpus"].data.tags["dvc.out.data/corpus"]


# --- make serve / serve-stop: the pid files -------------------------------------------------------

def test_serve_stop_stops_only_its_own_processes(tmp_path):
    """`stop` ends the process of each pid file and its children, and leaves alone a process
    whose pid file does not match it (a pid reused after a reboot)."""
    import psutil

    from flows import serve

    run_dir = tmp_path / ".serve"
    run_dir.mkdir()
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    parent = [sys.executable, "-c", "import subprocess, sys, time; "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"]
    ours = serve._start(run_dir, "deployments", parent, dict(os.environ), tmp_path)
    other = subprocess.Popen(sleeper, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not ours.children() and time.monotonic() < deadline:
            time.sleep(0.1)
        child = ours.children()[0]
        # a stale pid file naming a live process that is not the one it recorded
        (run_dir / "prefect.pid").write_text(json.dumps({"pid": other.pid, "create_time": 1.0}))
        assert serve.status(tmp_path) == 1
        assert serve._running(run_dir, "deployments").pid == ours.pid
        assert serve._running(run_dir, "prefect") is None
        serve.stop(tmp_path, grace=10)
        assert not ours.is_running() and not child.is_running()
        assert other.poll() is None and psutil.pid_exists(other.pid)
        assert not (run_dir / "deployments.pid").exists() and not (run_dir / "prefect.pid").exists()
    finally:
        stop_process(other)
        if ours.is_running():
            ours.kill()


def test_a_flow_waiting_for_the_workspace_says_who_holds_it(tmp_path, capsys):
    """A second `codeworld pipeline` on a workspace waits for the first (one flow at a time),
    and says so, naming the holder: before, it printed nothing and looked hung for as long as
    the first one ran (hours of training)."""
    from flows.pipeline import workspace_lock

    ready = tmp_path / "ready"
    code = (f"import sys, time; sys.path.insert(0, {str(Path(__file__).parents[1])!r})\n"
            "from pathlib import Path\nfrom flows.pipeline import workspace_lock\n"
            f"with workspace_lock(Path({str(tmp_path)!r})):\n"
            f"    Path({str(ready)!r}).touch(); time.sleep(3)\n"
            f"    Path({str(ready)!r}).write_text('releasing')\n")
    holder = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert holder.poll() is None and time.monotonic() < deadline, "holder did not start"
            time.sleep(0.05)
        with workspace_lock(tmp_path):
            assert ready.read_text() == "releasing"   # waited for it
    finally:
        stop_process(holder)
    out = capsys.readouterr().out
    assert f"waiting for the workspace: codeworld flow (pid {holder.pid}, since" in out, out
    with workspace_lock(tmp_path):   # free: no message
        pass
    assert "waiting" not in capsys.readouterr().out


GLOO_TAIL = ["[rank1]: RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] "
             "Read error [127.0.0.1]:29500: Connection reset by peer",
             "codeworld stage: error: stage 'pretrain': torchrun failed (exit 1): see its log"]
DVC_FAILED = "ERROR: failed to reproduce 'pretrain': failed to run: codeworld stage pretrain, exited with {}"


@pytest.mark.parametrize("output, transient", [
    # the stage's own verdict: exit 1 (a rank crashed; the other ranks' gloo saw the
    # connection drop), retried twice before, a whole training rerun each time
    ([*GLOO_TAIL, DVC_FAILED.format(1)], False),
    # exit 75 with more than the log tail after its message (worker and library logs at
    # exit), not retried before
    (["codeworld stage: transient error (retry): s3://b/x: cannot write: EndpointConnectionError",
      *[f"distributed.client - WARNING - closing {i}" for i in range(40)], DVC_FAILED.format(75)], True),
    (["ERROR: Unable to acquire lock. Most likely another DVC process is running or was "
      "terminated abruptly."], True),                       # DVC's own lock: the stage never ran
    (["codeworld stage: error: params.yaml: invalid parameters", DVC_FAILED.format(2)], False),
])
def test_a_stage_is_retried_when_it_exits_75_or_dvc_is_locked(output, transient, tmp_path, monkeypatch):
    """The flow retries a stage by the stage's own exit code (75, EX_TEMPFAIL, as DVC reports
    it) or DVC's lock, not by words anywhere in the last 25 lines of its output."""
    import logging

    import flows.pipeline as fp

    fake = tmp_path / "dvc"
    fake.write_text(f"#!{sys.executable}\nimport sys\nprint({chr(10).join(output)!r})\nsys.exit(255)\n")
    fake.chmod(0o755)
    monkeypatch.setattr(fp, "_dvc", lambda: str(fake))
    monkeypatch.setattr(fp, "get_run_logger", lambda: logging.getLogger("test"))
    (tmp_path / ".dvc").mkdir()
    with pytest.raises(fp.StageFailed) as err:
        fp.run_stage.fn("pretrain", str(tmp_path), False, None)
    assert err.value.transient is transient and "stage 'pretrain' failed (exit 255)" in str(err.value)


def test_serve_and_cluster_refuse_a_port_other_than_the_running_servers(tmp_path, capsys):
    """`make serve SERVE_MLFLOW_PORT=5001` while `make serve` runs on 5000: before, it said
    "already running", then wrote .serve/env and printed the UI at 5001, where nothing
    listens (the deployments log to 5000); `make cluster CLUSTER_PORT=...` likewise waited
    120 s for workers at a port no scheduler listens on. Now either names the running port."""
    from flows import cluster, serve

    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    started = []
    try:
        run_dir = tmp_path / ".serve"
        run_dir.mkdir()
        for name, port in (("mlflow", 5000), ("prefect", 4200)):
            p = serve._start(run_dir, name, sleeper, dict(os.environ), tmp_path)   # a stand-in
            started.append(p)
            rec = json.loads((run_dir / f"{name}.pid").read_text())
            rec["argv"] = [f"/venv/bin/{name}", "server", "--host", "127.0.0.1", "--port", str(port)]
            (run_dir / f"{name}.pid").write_text(json.dumps(rec))
        started.append(serve._start(run_dir, "deployments", sleeper, dict(os.environ), tmp_path))
        with pytest.raises(SystemExit, match=r"mlflow: already running on port 5000 \(pid \d+\), "
                                             r"not 5001.*SERVE_MLFLOW_PORT=5000"):
            serve.start(tmp_path, 4200, 5001, timeout=5)
        assert not (run_dir / "env").exists()
        serve.start(tmp_path, 4200, 5000, timeout=5)   # the running ports: as before
        assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in (run_dir / "env").read_text()

        cdir = tmp_path / ".cluster"
        cdir.mkdir()
        started.append(serve._start(cdir, "scheduler", sleeper, dict(os.environ), tmp_path))
        rec = json.loads((cdir / "scheduler.pid").read_text())
        rec["argv"] = ["/venv/bin/dask", "scheduler", "--host", "127.0.0.1", "--port", "8786"]
        (cdir / "scheduler.pid").write_text(json.dumps(rec))
        with pytest.raises(SystemExit, match=r"scheduler: already running on port 8786 .*not "
                                             r"8790.*CLUSTER_PORT=8786"):
            cluster.start(tmp_path, 8790, 0, timeout=5)
    finally:
        for p in started:
            p.kill()


def test_a_flow_stopped_mid_stage_stops_the_stage(tmp_path, monkeypatch):
    """A flow interrupted while a stage runs (Prefect's cancel and `make serve-stop` send
    SIGTERM, which Prefect raises in the flow; Ctrl-C) stops that stage's `dvc repro` and the
    stage under it. Before, they ran on unattended: the flow's lock and its overrides in
    params.yaml were released under them, and DVC then recorded in dvc.lock the params put
    back, not those the stage had run with."""
    import logging

    import psutil

    import flows.pipeline as fp

    pids = tmp_path / "pids"
    fake = tmp_path / "dvc"   # DVC, and the stage it runs, as a child
    fake.write_text(f"#!{sys.executable}\nimport os, subprocess, sys, time\n"
                    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
                    f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
                    "print('Running stage', flush=True)\ntime.sleep(120)\n")
    fake.chmod(0o755)
    monkeypatch.setattr(fp, "_dvc", lambda: str(fake))
    monkeypatch.setattr(fp, "get_run_logger", lambda: logging.getLogger("test"))
    (tmp_path / ".dvc").mkdir()

    class Stopped(BaseException):   # as Prefect's TerminationSignal
        pass

    def stop(*_):
        raise Stopped

    old = signal.signal(signal.SIGALRM, stop)
    procs = []
    try:
        signal.alarm(3)
        with pytest.raises(Stopped):
            fp.run_stage.fn("corpus", str(tmp_path), False, None)
        for pid in map(int, pids.read_text().split()):
            with contextlib.suppress(psutil.NoSuchProcess):   # (already gone)
                procs.append(psutil.Process(pid))
        gone, alive = psutil.wait_procs(procs, timeout=10)
        assert not alive, f"still running: {alive}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.kill()


def test_a_killed_flows_overrides_are_refused_outside_a_flow_until_undone(tmp_path, capsys):
    """After a flow was killed with its overrides in params.yaml, only the next flow put the
    file back: `codeworld check-params`, `codeworld stage X` and `dvc repro` (which runs
    `codeworld stage X`) read pretrain.steps=50 as if the user had set it. They now refuse,
    naming the overrides and the record, until `codeworld check-params --undo-killed-overrides`
    (or the next flow) puts the file back; a live flow's own stages read them as meant."""
    from codeworld import cli
    from flows.pipeline import overrides_journal, workspace_lock

    f = tmp_path / "params.yaml"
    text = "# top comment\npretrain:\n  steps: 100  # steps\n"
    f.write_text(text)
    _killed_while_overridden(f, ["pretrain.steps=50"])
    for argv in (["check-params"], ["stage", "corpus", "--no-track"]):
        assert cli.main([*argv, "--params", str(f)]) == cli.EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert "pretrain.steps=50" in err and str(overrides_journal(f)) in err, err
        assert "--undo-killed-overrides" in err
    with workspace_lock(tmp_path):   # a running flow's journal is live: its stages read it
        assert cli.main(["check-params", "--params", str(f)]) == 0
        assert json.loads(capsys.readouterr().out)["pretrain"]["steps"] == 50
        # and it is not undone under the flow's feet
        assert cli.main(["check-params", "--undo-killed-overrides", "--params", str(f)]) == \
            cli.EXIT_BAD_INPUT
        assert "a flow holds" in capsys.readouterr().err
    assert cli.main(["check-params", "--undo-killed-overrides", "--params", str(f)]) == 0
    assert f.read_text() == text and not overrides_journal(f).exists()
    said = capsys.readouterr()
    assert json.loads(said.out)["pretrain"]["steps"] == 100 and "put back" in said.err
