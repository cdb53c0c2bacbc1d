"""End to end: `codeworld pipeline --stage dedup` (the Prefect flow, with Prefect's temporary
server, running `dvc repro` for corpus then dedup) as a subprocess in a fresh git+DVC repository
built from this repository's dvc.yaml, tracking to a real `mlflow server`.

Each flow run costs ~30-60 s on 2 cores (most of it the temporary Prefect server and imports),
so one successful run is shared by the assertions, and the runs that must fail are started in
the background while the MLflow server starts and the successful run works (each flow has a
repository and PREFECT_HOME of its own).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.helpers import make_tree, write_params
from tests.servers import stop_process

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FLOW_TIMEOUT = 420
# The stages under test: `codeworld pipeline --stage dedup` runs dedup and what it needs; stages
# that dvc.yaml has after dedup are left out (they have tests of their own).
LAST_STAGE = "dedup"
STAGES = ("corpus", "dedup")

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


# --- building a workspace ------------------------------------------------------------------------

def tree_expectations(src: Path) -> dict:
    """What the stages must make of tests.helpers.make_tree with tests.helpers.write_params
    (max_bytes 200 kB, 20 files per shard)."""
    py = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.py"))
    skipped = {"bad/latin1.py": "non_utf8", "bad/blob.py": "binary", "bad/huge.py": "too_large"}
    return {"candidates": len(py), "kept": len(py) - len(skipped), "shards": -(-len(py) // 20),
            "skipped": skipped, "paths": set(py) - set(skipped)}


def dvc_deps() -> list[str]:
    """Source files and folders the real dvc.yaml lists as deps (outs of stages excluded)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    outs = {next(iter(o)) if isinstance(o, dict) else o for s in stages.values()
            for o in [*s.get("outs", []), *s.get("metrics", []), *s.get("plots", [])]}
    deps = {d for s in stages.values() for d in s.get("deps", [])}
    # a dep inside another stage's output (evaluate's data/pack/manifest.json) is that output
    return sorted(d for d in deps if not any(d == o or d.startswith(o + "/") for o in outs))


def make_workspace(root: Path, src: Path, sources: list[dict] | None = None, **overrides) -> Path:
    """A git+DVC repository with the project's own dvc.yaml (and the sources it lists as deps,
    at the same paths) and a params.yaml from tests.helpers.write_params (storage root `data`,
    as dvc.yaml's outs expect; the sections it does not write, such as those of stages after
    dedup, as in the project's params.yaml)."""
    root.mkdir(parents=True)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    for dep in dvc_deps():
        if (REPO / dep).is_dir():
            shutil.copytree(REPO / dep, root / dep, ignore=shutil.ignore_patterns("__pycache__"))
        elif (REPO / dep).exists():  # a later stage's dep may not be written yet
            (root / dep).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / dep, root / dep)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=root, check=True, env=base_env())
    (root / ".dvc" / "config").write_text("[core]\n    analytics = false\n")
    sources = sources or [{"kind": "dir", "path": str(src), "name": "src"}]
    params = yaml.safe_load(write_params(root / "params.yaml", Path("data"), sources, **overrides).read_text())
    for section, values in yaml.safe_load((REPO / "params.yaml").read_text()).items():
        params.setdefault(section, values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def base_env() -> dict:
    env = dict(os.environ)
    for k in ("CODEWORLD_PARENT_RUN_ID", "PREFECT_API_URL", "PREFECT_PROFILE", "MLFLOW_TRACKING_URI",
              "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        env.pop(k, None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


# --- running flows -------------------------------------------------------------------------------

@dataclass
class Flow:
    """`codeworld pipeline` running in the background; `.result()` waits for it."""

    cwd: Path
    proc: subprocess.Popen
    log: Path
    started: float

    @classmethod
    def start(cls, cwd: Path, tracking_uri: str, prefect_home: Path, *args: str) -> "Flow":
        env = base_env()
        env.update(MLFLOW_TRACKING_URI=tracking_uri, PREFECT_HOME=str(prefect_home),
                   PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300",
                   PREFECT_SERVER_ANALYTICS_ENABLED="false")
        log = cwd.parent / f"{cwd.name}-flow-{time.monotonic_ns()}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen([str(BIN / "codeworld"), "pipeline", "--stage", LAST_STAGE, *args],
                                    cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        return cls(cwd, proc, log, time.monotonic())

    def result(self) -> tuple[int, str]:
        try:
            code = self.proc.wait(FLOW_TIMEOUT)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)
            pytest.fail(f"flow in {self.cwd} did not finish in {FLOW_TIMEOUT}s:\n"
                        f"{self.log.read_text(errors='replace')[-6000:]}")
        return code, self.log.read_text(errors="replace")

    def stop(self) -> None:
        """Stop the flow (and its temporary Prefect server) if it still runs."""
        stop_process(self.proc, grace=20)


def runs_by_name(client, experiment: str) -> dict[str, list]:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    out: dict[str, list] = {}
    for r in client.search_runs([exp.experiment_id], max_results=1000):
        out.setdefault(r.info.run_name, []).append(r)
    return out


@dataclass
class E2E:
    ok: Path
    ok_code: int
    ok_out: str
    runs: dict  # MLflow runs of experiment "codeworld" right after the successful flow
    bad_key: tuple[int, str, Path]
    missing: tuple[int, str, Path]
    missing_path: Path
    mlflow_url: str
    prefect_home: Path
    want: dict  # tree_expectations of the sources


@pytest.fixture
def ok_run(e2e) -> E2E:
    """The shared successful run (failure tests do not depend on it succeeding)."""
    assert e2e.ok_code == 0, f"pipeline failed ({e2e.ok_code}):\n{e2e.ok_out[-8000:]}"
    return e2e


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, request) -> E2E:
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("e2e")
    src = make_tree(tmp)

    # Bad key: fails while loading params, before MLflow or any stage; start it right away.
    bad = make_workspace(tmp / "bad-key", src, corpus={"shard_filez": 4})
    bad_db = tmp / "bad-key-mlflow.db"
    flows = [Flow.start(bad, f"sqlite:///{bad_db}", tmp / "prefect-bad")]
    try:
        mlflow_url = request.getfixturevalue("mlflow_url")  # starts the server meanwhile

        ok = make_workspace(tmp / "ok", src)
        missing_path = tmp / "does-not-exist"
        miss = make_workspace(tmp / "missing", src, [{"kind": "dir", "path": str(missing_path), "name": "gone"}],
                              tracking={"experiment": "codeworld-failing"})
        flows.append(Flow.start(ok, mlflow_url, tmp / "prefect-ok"))
        flows.append(Flow.start(miss, mlflow_url, tmp / "prefect-missing"))
        (bad_code, bad_out), (ok_code, ok_out), (miss_code, miss_out) = [f.result() for f in flows]
    finally:
        for f in flows:
            f.stop()
    # Snapshot of the successful run's MLflow runs, before any later flow adds to them.
    runs = runs_by_name(MlflowClient(mlflow_url), "codeworld") if ok_code == 0 else {}
    return E2E(ok, ok_code, ok_out, runs, (bad_code, bad_out, bad_db), (miss_code, miss_out, miss),
               missing_path, mlflow_url, tmp / "prefect-ok", tree_expectations(src))


def manifest(root: Path, name: str) -> dict:
    return json.loads((root / "data" / name / "manifest.json").read_text())


def records(root: Path, name: str) -> list[dict]:
    from codeworld.shards import Dataset

    return list(Dataset.open(str(root / "data" / name)))


# --- the successful run --------------------------------------------------------------------------

def test_pipeline_outputs(ok_run):
    ok, want = ok_run.ok, ok_run.want
    corpus = manifest(ok, "corpus")
    assert corpus["records"] == want["kept"] and len(corpus["shards"]) == want["shards"]
    counts = corpus["stats"]["counts"]
    assert counts["candidates"] == want["candidates"] and counts["kept"] == want["kept"]
    for reason in want["skipped"].values():
        assert counts[f"skipped_{reason}"] == 1, counts
    corpus_recs = records(ok, "corpus")
    assert sorted(r["path"] for r in corpus_recs) == sorted(want["paths"])
    assert corpus_recs[0]["id"].startswith("src/")

    ded = manifest(ok, "dedup")
    st = ded["stats"]
    assert st["documents"] == want["kept"] == st["kept"] + st["removed_exact"] + st["removed_near"]
    assert ded["records"] == st["kept"] and ded["source"] == corpus["fingerprint"]
    report = json.loads((ok / "data" / "dedup" / "report.json").read_text())
    removed = {r["id"]: r["step"] for r in report["removed"]}
    # the exact copies (the copies/ folder sorts first, so its files are the representatives),
    # one of the two empty __init__.py, and the edited encoder as a near duplicate
    assert removed["src/json/decoder.py"] == "exact" and removed["src/json/encoder.py"] == "exact"
    assert removed.get("src/copies/__init__.py") == "exact" or removed.get("src/email/mime/__init__.py") == "exact"
    assert list(removed.values()).count("near") == st["removed_near"] >= 1
    kept_ids = {r["id"] for r in records(ok, "dedup")}
    assert len(kept_ids) == st["kept"] and not kept_ids & set(removed)
    assert kept_ids | set(removed) == {r["id"] for r in corpus_recs}

    mc = json.loads((ok / "metrics" / "corpus.json").read_text())
    assert mc["records"] == want["kept"] and mc["candidates"] == want["candidates"]
    assert mc["shards"] == want["shards"] and mc["skipped_too_large"] == 1
    assert mc["seconds_total"] > 0
    md = json.loads((ok / "metrics" / "dedup.json").read_text())
    assert (md["documents"], md["kept"], md["removed_exact"], md["removed_near"]) == \
        (st["documents"], st["kept"], st["removed_exact"], st["removed_near"])
    lock = yaml.safe_load((ok / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    assert "Running stage 'corpus'" in ok_run.ok_out and "Running stage 'dedup'" in ok_run.ok_out


def test_pipeline_tracked_in_mlflow(ok_run):
    e2e = ok_run
    from mlflow import MlflowClient

    runs = e2e.runs
    assert len(runs.get("pipeline", [])) == 1, runs
    assert len(runs.get("corpus", [])) == 1 and len(runs.get("dedup", [])) == 1, runs
    parent = runs["pipeline"][0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags.get("codeworld.stages") == ",".join(STAGES)
    assert "mlflow.parentRunId" not in parent.data.tags
    client = MlflowClient(e2e.mlflow_url)
    for stage in ("corpus", "dedup"):
        child = runs[stage][0]
        assert child.info.status == "FINISHED"
        assert child.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        assert child.data.tags.get("codeworld.stage") == stage
        assert child.data.params["storage.root"] == "data"
        assert "seconds_total" in child.data.metrics
        arts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"params.json", f"{stage}_report.json"} <= arts, arts
    corpus, dedup = runs["corpus"][0], runs["dedup"][0]
    want = e2e.want
    assert corpus.data.params["corpus.workers"] == "1"
    assert corpus.data.params["corpus.shard_files"] == "20"
    assert corpus.data.params["corpus.max_bytes"] == "200000"
    assert corpus.data.metrics["records"] == want["kept"]
    assert corpus.data.metrics["candidates"] == want["candidates"]
    assert corpus.data.metrics["skipped_non_utf8"] == 1 and corpus.data.metrics["skipped_binary"] == 1
    assert dedup.data.params["dedup.threshold"] == "0.7"
    md = json.loads((e2e.ok / "metrics" / "dedup.json").read_text())
    for key in ("documents", "kept", "removed_exact", "removed_near"):
        assert dedup.data.metrics[key] == md[key], key


def test_dvc_repro_after_flow_is_a_noop(ok_run):
    e2e = ok_run
    before = (e2e.ok / "dvc.lock").read_bytes()
    res = subprocess.run([str(BIN / "dvc"), "repro", LAST_STAGE], cwd=e2e.ok, env=base_env(),
                         capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "Stage 'corpus' didn't change, skipping" in out, out
    assert "Stage 'dedup' didn't change, skipping" in out, out
    assert "up to date" in out, out
    assert (e2e.ok / "dvc.lock").read_bytes() == before


def test_second_flow_run_reruns_nothing(ok_run):
    e2e = ok_run
    from mlflow import MlflowClient

    ok = e2e.ok
    stamp = {p: p.stat().st_mtime_ns for p in (ok / "data" / "corpus" / "manifest.json",
                                               ok / "data" / "dedup" / "manifest.json",
                                               ok / "metrics" / "corpus.json")}
    flow = Flow.start(ok, e2e.mlflow_url, e2e.prefect_home)
    try:
        code, out = flow.result()
    finally:
        flow.stop()
    assert code == 0, out[-8000:]
    assert "corpus | Stage 'corpus' didn't change, skipping" in out, out[-8000:]
    assert "dedup | Stage 'dedup' didn't change, skipping" in out, out[-8000:]
    assert "> codeworld stage" not in out  # no stage command ran
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    runs = runs_by_name(MlflowClient(e2e.mlflow_url), "codeworld")
    # A new parent run, but no new stage run: nothing was recomputed.
    assert len(runs["pipeline"]) == len(e2e.runs["pipeline"]) + 1
    assert len(runs["corpus"]) == len(e2e.runs["corpus"])
    assert len(runs["dedup"]) == len(e2e.runs["dedup"])


# --- failures ------------------------------------------------------------------------------------

def test_bad_param_key_fails_naming_it(e2e):
    code, out, db = e2e.bad_key
    assert code == 2, out[-4000:]  # EXIT_BAD_INPUT
    # the command's own error message (after Prefect's logs) names the file and the key path
    message = out[out.index("codeworld pipeline: error:"):]
    assert "bad-key/params.yaml: invalid parameters" in message, out[-4000:]
    assert "corpus.shard_filez: Extra inputs are not permitted" in message, out[-4000:]
    # rejected before any work: no stage ran, no MLflow run was started
    assert "Running stage" not in out
    assert not (e2e.bad_key[2].parent / "bad-key" / "data").exists()
    assert not db.exists()


def test_failing_stage_is_named_with_its_error(e2e):
    from mlflow import MlflowClient

    code, out, ws = e2e.missing
    assert code != 0, out[-4000:]
    assert "stage 'corpus' failed" in out, out[-4000:]
    assert str(e2e.missing_path) in out, out[-4000:]
    assert "Running stage 'dedup'" not in out  # the flow stopped at the failed stage
    assert not (ws / "data" / "corpus" / "manifest.json").exists()
    runs = runs_by_name(MlflowClient(e2e.mlflow_url), "codeworld-failing")
    assert [r.info.status for r in runs["pipeline"]] == ["FAILED"]
    corpus = runs["corpus"]
    assert [r.info.status for r in corpus] == ["FAILED"]
    assert corpus[0].data.tags["mlflow.parentRunId"] == runs["pipeline"][0].info.run_id
    assert str(e2e.missing_path) in corpus[0].data.tags["codeworld.error"]
    assert "dedup" not in runs
