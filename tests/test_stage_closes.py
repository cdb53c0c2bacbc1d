"""MLflow runs of the stages other than the training phases, when the tracking server goes down
before their close: the close waits (codeworld.tracking.keep_stage_close, the file format and
the sending loop the phases' unsent steps use) and the next stage run on that server, or
`codeworld send-steps`, ends the run as its stage meant."""

from __future__ import annotations

import time
import uuid

import pytest

from codeworld.config import load_params
from stages import corpus, dedup
from tests.helpers import make_tree, write_params

KEPT = "mlflow.unclosed.json"   # codeworld.tracking.STAGE_CLOSES, at the repository root


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """tmp_path as the repository root the stages run in (dvc.yaml's wdir), and a params file
    with a corpus of a small tree, in an experiment of its own on the shared server."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    src = make_tree(tmp_path)
    path = write_params(tmp_path / "params.yaml", tmp_path / "data",
                        [{"kind": "dir", "path": str(src), "name": "t"}],
                        tracking={"experiment": f"stage-closes-{uuid.uuid4().hex[:8]}"})
    return load_params(path)


def _cut_mid_run(monkeypatch, proxy) -> None:
    """The tracking server goes down once corpus has started its run: while it lists files
    (the first listing only)."""
    listing = corpus.list_candidates
    cuts = []

    def cut_then_list(*args, **kwargs):
        if not cuts:
            cuts.append(proxy.fail("reset", times=None))
        return listing(*args, **kwargs)
    monkeypatch.setattr(corpus, "list_candidates", cut_then_list)


def _runs(uri: str, experiment: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return {r.data.tags["codeworld.stage"]: r for r in client.search_runs([exp.experiment_id])}


def test_a_stage_run_closed_in_an_outage_is_closed_by_the_next_stage_run(
        tracking_proxy, mlflow_url, workspace, monkeypatch, tmp_path):
    """corpus with the server stopped mid-run: its shards written, its report artifact meets
    the outage, so the stage is the outage error (exit 75: the flow retries it), and its run
    stayed RUNNING in MLflow forever (before: the non-phase stages had no on_unclosed). Now
    the close waits in mlflow.unclosed.json, and dedup's run, once the server is back, ends
    corpus's run as corpus meant: FAILED by the outage, at its end time, with its timings."""
    from codeworld.tracking import TrackingUnavailable

    experiment = workspace.tracking.experiment
    _cut_mid_run(monkeypatch, tracking_proxy)
    with pytest.raises(TrackingUnavailable):
        corpus.run(workspace, track=True, metrics_path=None)
    ended = int(time.time() * 1000)
    assert (tmp_path / "data" / "corpus" / "manifest.json").exists()   # the work was done
    run = _runs(mlflow_url, experiment)["corpus"]   # past the proxy: what the server holds
    assert run.info.status == "RUNNING"

    tracking_proxy.heal()
    dedup.run(workspace, track=True, metrics_path=None)
    runs = _runs(mlflow_url, experiment)
    closed = runs["corpus"]
    assert closed.info.status == "FAILED" and run.info.start_time < closed.info.end_time <= ended
    assert closed.data.tags["codeworld.error"].startswith("TrackingUnavailable: MLflow tracking "
                                                          f"server {tracking_proxy.url} unreachable")
    assert closed.data.metrics["seconds_listing"] >= 0 and "seconds_total" in closed.data.metrics
    assert runs["dedup"].info.status == "FINISHED"
    assert not (tmp_path / KEPT).exists()


def test_a_failed_stage_runs_kept_close_goes_with_codeworld_send_steps(
        tracking_proxy, mlflow_url, workspace, tmp_path, capsys):
    """A stage that failed while the server was down: its run is closed FAILED, with its error,
    by `codeworld send-steps` (exit 75 while the server is still down)."""
    from codeworld import cli
    from codeworld.tracking import StageRun

    experiment = workspace.tracking.experiment
    with pytest.raises(RuntimeError, match="disk full"):
        with StageRun("traces", {}, experiment):
            tracking_proxy.fail("reset", times=None)
            raise RuntimeError("disk full")
    assert _runs(mlflow_url, experiment)["traces"].info.status == "RUNNING"
    params = str(tmp_path / "params.yaml")
    assert cli.main(["send-steps", "--params", params]) == cli.EXIT_TRANSIENT
    assert (tmp_path / KEPT).exists()
    tracking_proxy.heal()
    assert cli.main(["send-steps", "--params", params]) == 0
    assert "stages: closed 1 MLflow runs" in capsys.readouterr().out
    run = _runs(mlflow_url, experiment)["traces"]
    assert run.info.status == "FAILED"
    assert run.data.tags["codeworld.error"] == "RuntimeError: disk full"
    assert not (tmp_path / KEPT).exists()


def test_the_flows_own_run_closed_in_an_outage_is_closed_by_the_next_stage_run(
        tracking_proxy, mlflow_url, workspace, tmp_path):
    """The flow's parent run (flows/pipeline._start_parent_run) with the server gone before the
    flow ends it: _end_parent_run warned and the run stayed RUNNING in MLflow forever. Its close
    now waits in mlflow.unclosed.json like a stage's, and the next stage run, once the server is
    back, ends it as the flow meant (FINISHED, at the flow's end)."""
    from flows.pipeline import _end_parent_run, _start_parent_run

    experiment = workspace.tracking.experiment
    parent = _start_parent_run(["corpus"], experiment)
    tracking_proxy.fail("reset", times=None)           # the server goes down mid-flow
    _end_parent_run("FINISHED")                         # a warning, never the flow's failure
    ended = int(time.time() * 1000)
    from mlflow.tracking import MlflowClient

    assert MlflowClient(mlflow_url).get_run(parent).info.status == "RUNNING"
    assert (tmp_path / KEPT).exists()
    tracking_proxy.heal()
    corpus.run(workspace, track=True, metrics_path=None)   # the next stage run
    run = MlflowClient(mlflow_url).get_run(parent)
    assert run.info.status == "FINISHED" and run.info.start_time < run.info.end_time <= ended
    assert not (tmp_path / KEPT).exists()
