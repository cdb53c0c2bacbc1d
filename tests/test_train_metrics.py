"""model/metrics: the MFU peak per GPU model and the memory figures of a step row; the FLOP
count per token (model/build.py) that MFU and TFLOP/s divide."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from model.metrics import memory, peak_flops

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),    # SXM
    ("NVIDIA H100 80GB HBM3", "fp8", 1979e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12),         # not the SXM figure its name also matches
    ("NVIDIA H100 NVL", "fp8", 1671e12),
    ("NVIDIA H200", "bf16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100-SXM4-80GB", "fp8", None),        # no FP8 on Ampere
    ("Tesla T4", "bf16", None),
])
def test_peak_flops_by_device_name(name, precision, peak):
    assert peak_flops(precision, name) == peak


def test_memory_on_cpu_is_the_resident_set():
    import psutil

    m = memory()
    assert list(m) == ["memory_mb"]   # no reserved figure: that is the GPU caching allocator's
    rss = psutil.Process().memory_info().rss / 2**20
    assert 0.5 * rss < m["memory_mb"] < 2 * rss


def test_tied_embeddings_share_the_output_weight_not_its_flops():
    """The output layer multiplies every token by a vocab x hidden matrix whether or not it is
    the input embedding's: tying halves the embedding parameters, never the FLOPs (counted
    without it, MFU read ~25% low for a small tied model)."""
    from codeworld.config import ModelConfig
    from model.build import count_parameters, flops_per_token

    vocab, seq = 32000, 2048
    untied, tied = ModelConfig(), ModelConfig(tie_embeddings=True)
    h = untied.hidden_size
    assert count_parameters(untied, vocab) - count_parameters(tied, vocab) == vocab * h
    assert flops_per_token(tied, vocab, seq) == flops_per_token(untied, vocab, seq)
    # 6 x (all parameters but the input embedding) + attention, written out for the untied model
    n = count_parameters(untied, vocab) - vocab * h
    assert flops_per_token(untied, vocab, seq) == 6 * n + 12 * untied.num_layers * h * seq


MEMORY_PROBE = """
import json, sys, torch
from model import metrics

torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
metrics.memory = lambda: {"memory_mb": [300.0, 1200.5, 700.0][rank]}   # rank 1 holds the most
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:   # (one file each: prints interleave)
    json.dump(metrics.memory_over_ranks(), f)
torch.distributed.destroy_process_group()
"""


def test_logged_memory_is_the_maximum_over_all_ranks(tmp_path):
    """The logging rank is the last pipeline stage's: its own figure hid a rank nearer to its
    memory's limit. Every rank gets the maximum, over gloo on CPU."""
    from stages.train_phase import run_in_own_group

    (tmp_path / "probe.py").write_text(MEMORY_PROBE)
    with open(tmp_path / "log", "w") as log:
        proc = run_in_own_group([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc-per-node=3", str(tmp_path / "probe.py"), str(tmp_path)],
                                stdout=log, timeout=300, cwd=REPO,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    out = (tmp_path / "log").read_text()
    assert proc.returncode == 0, out[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert got == [{"memory_mb": 1200.5}] * 3


# --- a tracking server lost during training ---------------------------------------------------

ROWS = [{"step": s, "loss": round(10.0 / s, 4), "lr": 1e-3 * s, "tokens_per_s": 100.0 + s}
        for s in range(1, 9)]
KEYS = ("loss", "lr", "tokens_per_s")


def new_run(uri: str) -> str:
    import uuid

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return client.create_run(client.create_experiment(f"steps-{uuid.uuid4().hex[:8]}")).info.run_id


def without_time(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "timestamp_ms"}


def history(uri: str, run_id: str) -> dict[str, list[int]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return {k: sorted(m.step for m in client.get_metric_history(run_id, k))
            for k in KEYS}


def test_a_tracking_server_lost_mid_run_costs_training_nothing_and_its_steps_come_after(
        tracking_proxy, tmp_path, capsys):
    """StepLog on the logging rank with the server cut at step 4: training goes on (was: the
    MlflowException out of write ended the run, after minutes of MLflow's retries), one
    warning, every row in the JSONL, nothing more tried; the stage sends the missing steps
    when the server is back, each step once in the run's history."""
    from model.metrics import StepLog, read_rows

    proxy = tracking_proxy
    run_id = new_run(proxy.url)
    out = tmp_path / "checkpoints" / "pretrain"
    log = StepLog(out / "steps.jsonl", True, resume_after=0, run_id=run_id)
    for row in ROWS[:3]:
        log.write(row)
    proxy.fail("reset", times=None)   # the server down from here on
    for row in ROWS[3:]:
        log.write(row)
    log.close()
    assert [without_time(r) for r in read_rows(out / "steps.jsonl")] == ROWS
    warnings = [l for l in capsys.readouterr().err.splitlines() if "warning" in l.lower()]
    assert len(warnings) == 1, warnings
    assert f"MLflow tracking server {proxy.url} unreachable at step 4" in warnings[0]
    sends = [s.action for s in proxy.log if s.key.endswith("runs/log-batch")]
    assert sends == ["forwarded"] * 3 + ["reset"], sends   # given up at the first failure

    from codeworld.tracking import TrackingUnavailable
    from model.metrics import unsent_path
    from stages.train_phase import send_unsent_steps

    # after training, the server still down: the stage's outage error (exit 75), nothing lost
    with pytest.raises(TrackingUnavailable, match=f"{proxy.url} unreachable: .*steps 4 on of "
                                                   f"MLflow run {run_id} are not sent yet"):
        send_unsent_steps(out / "steps.jsonl")
    assert unsent_path(out / "steps.jsonl").exists()
    proxy.heal()
    send_unsent_steps(out / "steps.jsonl")
    assert history(proxy.url, run_id) == {k: list(range(1, 9)) for k in KEYS}
    assert not unsent_path(out / "steps.jsonl").exists()
    assert "sent MLflow the 5 training steps" in capsys.readouterr().err


def test_a_rerun_sends_an_earlier_runs_missing_steps_before_anything_else(tracking_proxy,
                                                                          tmp_path):
    """The rerun of a phase (open_phase, which a finished phase's rerun passes too) sends what
    an earlier run's ranks could not, to that run; before claim, which clears the folder for
    other params; a step that reached the run although its sender saw a failure is not sent
    twice. With the server still down the rerun is the outage error, the folder untouched."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from codeworld.tracking import TrackingUnavailable
    from model.metrics import unsent_path
    from stages.train_phase import open_phase, phase_lock

    proxy = tracking_proxy
    earlier, rerun = new_run(proxy.url), new_run(proxy.url)
    out = tmp_path / "checkpoints" / "pretrain"
    out.mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"fingerprint": "old", "mlflow_run_id": earlier}))
    (out / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    MlflowClient(proxy.url).log_batch(earlier, metrics=[
        Metric(k, float(v), 0, r["step"]) for r in ROWS[:4] for k, v in r.items() if k != "step"])
    unsent_path(out / "steps.jsonl").write_text(json.dumps(
        [{"run_id": earlier, "tracking_uri": proxy.url, "first": 4, "last": None}]))
    record = {"fingerprint": "new", "mlflow_run_id": rerun}
    proxy.fail("reset", times=None)
    with pytest.raises(TrackingUnavailable), phase_lock(out):
        open_phase(out, record)
    assert json.loads((out / "run.json").read_text())["fingerprint"] == "old"
    proxy.heal()
    with phase_lock(out):
        open_phase(out, record)
    assert not (out / "steps.jsonl").exists()   # claimed for the new fingerprint
    assert history(proxy.url, earlier) == {k: list(range(1, 9)) for k in KEYS}
    assert history(proxy.url, rerun) == {k: [] for k in KEYS}


def test_backfilled_steps_keep_the_time_they_were_logged(tracking_proxy, tmp_path):
    """The steps sent after an outage carried the time of their sending: on MLflow's wall-time
    axis the outage's steps were all at its end. Each row of steps.jsonl now holds the time
    the logging rank wrote it (timestamp_ms, no metric of its own), which the live send and
    the backfill both give MLflow."""
    import time

    from mlflow.tracking import MlflowClient

    from model.metrics import StepLog, read_rows
    from stages.train_phase import send_unsent_steps

    proxy = tracking_proxy
    run_id = new_run(proxy.url)
    steps = tmp_path / "steps.jsonl"
    log = StepLog(steps, True, resume_after=0, run_id=run_id)
    for row in ROWS[:3]:
        log.write(row)
    proxy.fail("reset", times=None)
    for row in ROWS[3:]:
        time.sleep(0.01)   # each step its own millisecond
        log.write(row)
    log.close()
    time.sleep(0.05)
    proxy.heal()
    sending = int(time.time() * 1000)
    send_unsent_steps(steps)
    logged = {r["step"]: r["timestamp_ms"] for r in read_rows(steps)}
    assert len(set(logged.values())) == len(ROWS) and max(logged.values()) < sending
    client = MlflowClient(proxy.url)
    for key in KEYS:
        assert {m.step: m.timestamp for m in client.get_metric_history(run_id, key)} == logged, key
    assert "timestamp_ms" not in client.get_run(run_id).data.metrics


@pytest.mark.parametrize("error, status", [(None, "FINISHED"),
                                           (RuntimeError("torchrun exited with 1"), "FAILED")])
def test_a_phase_run_closed_in_an_outage_is_closed_when_its_steps_are_sent(
        tracking_proxy, mlflow_url, tmp_path, error, status):
    """A phase's MLflow run whose close met the outage stayed RUNNING forever: its steps came
    later, its end never. The close the stage meant (status, end time, its metrics and error
    tag) waits in steps.jsonl.unsent behind the steps, and ends the run when they are sent."""
    import time
    import uuid
    from functools import partial

    from mlflow.tracking import MlflowClient

    from codeworld.tracking import StageRun, TrackingUnavailable
    from model.metrics import StepLog, close_later, unsent_path
    from stages.train_phase import phase_lock, send_unsent_steps

    proxy = tracking_proxy
    out = tmp_path / "checkpoints" / "pretrain"
    steps = out / "steps.jsonl"
    stage = StageRun("pretrain", {"pretrain": {"steps": 8}}, f"close-{uuid.uuid4().hex[:8]}",
                     track=True, on_unclosed=partial(close_later, steps))
    with pytest.raises(TrackingUnavailable if error is None else RuntimeError):
        with phase_lock(out), stage as run_:
            log = StepLog(steps, True, resume_after=0, run_id=run_.run_id)
            for row in ROWS[:3]:
                log.write(row)
            proxy.fail("reset", times=None)   # down from step 4 to after the stage's end
            for row in ROWS[3:]:
                log.write(row)
            log.close()
            run_.log(steps=8)
            closing = int(time.time() * 1000)
            if error is not None:
                raise error
    ended = int(time.time() * 1000)
    server = MlflowClient(mlflow_url)   # past the proxy: what the server holds meanwhile
    assert server.get_run(run_.run_id).info.status == "RUNNING"
    proxy.heal()
    send_unsent_steps(steps)
    run = server.get_run(run_.run_id)
    assert run.info.status == status and closing <= run.info.end_time <= ended
    assert run.data.metrics["steps"] == 8 and "seconds_total" in run.data.metrics
    assert run.data.tags.get("codeworld.error") == (error and f"RuntimeError: {error}")
    assert history(mlflow_url, run_.run_id) == {k: list(range(1, 9)) for k in KEYS}
    assert not unsent_path(steps).exists()


def test_a_run_the_outage_cuts_off_while_it_starts_is_closed_later(tracking_proxy,
                                                                  mlflow_url, tmp_path):
    """The server lost between creating the stage's run and logging its params: StageRun's
    __enter__ raised, no __exit__ followed, and the run stayed RUNNING (and active in the
    process). It is closed as a failed stage's, or its close kept for later like any other."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from codeworld.tracking import StageRun, TrackingUnavailable
    from model.metrics import close_later
    from stages.train_phase import send_unsent_steps

    proxy = tracking_proxy
    steps = tmp_path / "steps.jsonl"
    proxy.fail("reset", times=None, match=lambda method, key: key.endswith(
        ("runs/log-batch", "runs/update", "artifacts")))   # all but creating the run
    stage = StageRun("pretrain", {"pretrain": {"steps": 8}}, "starting", track=True,
                     on_unclosed=lambda *close: close_later(steps, *close))
    with pytest.raises(TrackingUnavailable):
        with stage:
            pass
    assert mlflow.active_run() is None
    run_id = MlflowClient(mlflow_url).search_runs(
        [MlflowClient(mlflow_url).get_experiment_by_name("starting").experiment_id])[0].info.run_id
    proxy.heal()
    send_unsent_steps(steps)
    run = MlflowClient(mlflow_url).get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["codeworld.error"].startswith("TrackingUnavailable: ")


def test_a_hand_run_torchruns_unsent_steps_go_with_codeworld_send_steps(tracking_proxy,
                                                                        tmp_path, capsys):
    """A torchrun started by hand on a phase's folder logs to the MLflow run its run.json
    names (the stage's last, closed) and, the server down, keeps its steps as the stage's
    ranks do; but no stage follows it to send them (only the stage's next run did).
    `codeworld send-steps` does, under the phase's lock: exit 75 while the server is down,
    each step once when it is back."""
    from mlflow.tracking import MlflowClient

    from codeworld.cli import main
    from codeworld.config import parse_params
    from model.metrics import StepLog, tracking_run_id, unsent_path
    from stages.train_phase import phase_dir, phase_lock
    from tests.train_fixtures import tiny_params, write_yaml

    proxy = tracking_proxy
    params = write_yaml(tmp_path / "params.yaml", tiny_params(tmp_path))
    out = phase_dir(parse_params(tiny_params(tmp_path)), "pretrain")
    stage_run = new_run(proxy.url)
    MlflowClient(proxy.url).set_terminated(stage_run)   # the stage's run, ended before
    out.mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"fingerprint": "f", "mlflow_run_id": stage_run}))
    log = StepLog(out / "steps.jsonl", True, resume_after=0, run_id=tracking_run_id(out))
    for row in ROWS[:3]:
        log.write(row)
    proxy.fail("reset", times=None)
    for row in ROWS[3:]:
        log.write(row)
    log.close()
    send = ["send-steps", "pretrain", "--params", str(params)]
    assert main(send) == 75
    assert f"steps 4 on of MLflow run {stage_run} are not sent yet" in capsys.readouterr().err
    proxy.heal()
    with phase_lock(out):   # a stage at work on the phase: not beside it
        assert main(send) == 1
    assert "training this phase already" in capsys.readouterr().err
    assert main(send) == 0
    assert history(proxy.url, stage_run) == {k: list(range(1, 9)) for k in KEYS}
    assert not unsent_path(out / "steps.jsonl").exists()
    assert main(["send-steps", "--params", str(params)]) == 0   # every phase: nothing left
    assert "pretrain: nothing unsent" in capsys.readouterr().out
    assert main(["send-steps", "pretrian", "--params", str(params)]) == 2


def test_a_resumed_run_keeps_only_the_unsent_steps_it_does_not_train_again(tmp_path):
    """StepLog on resume drops the rows after the checkpoint: an earlier run's unsent steps
    end there (what the new run trains again it logs itself), or go with them."""
    from model.metrics import StepLog, unsent_path, unsent_runs

    steps = tmp_path / "steps.jsonl"
    close = {"run_id": "r1", "tracking_uri": "u",
             "close": {"status": "FAILED", "end_time": 1, "metrics": {}, "tags": {}}}
    for resume_after, left in ((5, [{"run_id": "r1", "tracking_uri": "u", "first": 4, "last": 5}]),
                               (3, [])):
        steps.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
        unsent_path(steps).write_text(json.dumps(
            [{"run_id": "r1", "tracking_uri": "u", "first": 4, "last": None}, close]))
        StepLog(steps, True, resume_after=resume_after, run_id=None).close()
        assert unsent_runs(steps) == left + [close]   # r1's close, whatever was trained again


def test_ranks_wait_briefly_on_mlflow_unless_told_otherwise(tmp_path, monkeypatch):
    """MLflow's defaults (7 retries up to 2 minutes apart, 120 s a try) held the logging rank,
    and every rank with it, minutes per step while the tracking server was down."""
    from codeworld.config import parse_params
    from model import launch
    from tests.train_fixtures import tiny_params

    params = parse_params(tiny_params(tmp_path))
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    env = launch.worker_env(params)
    assert int(env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) <= 2
    assert int(env["MLFLOW_HTTP_REQUEST_TIMEOUT"]) <= 30
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    assert launch.worker_env(params)["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"


def test_step_seconds_and_throughput_cover_reading_the_batch():
    """step_seconds was train_step's own time: the global batch, read from the dataset and
    collated before it started, was in no figure, and tokens/s, TFLOP/s and MFU (divided by
    it) counted a step as shorter than it is. Now they cover the whole step."""
    import time
    from types import SimpleNamespace

    from model.train import timed_step

    class Data:
        def next_global_batch(self):
            for m in range(2):
                time.sleep(0.15)         # reading and collating a micro-batch
                yield {"m": m}

    class FakeTrainer:
        flops_per_token = 1e9

        def train_step(self, batches):
            assert batches == [{"m": 0}, {"m": 1}]
            return {"loss": 1.0, "step_seconds": 0.001}    # the update's own time

    cfg = SimpleNamespace(global_batch_size=4, seq_length=8)
    row = timed_step(FakeTrainer(), Data(), cfg, world=2, peak=1e12)
    assert 0.3 <= row["step_seconds"] < 2.0 and row["loss"] == 1.0
    assert row["tokens_per_s"] == pytest.approx(32 / row["step_seconds"], rel=1e-3)
    assert row["tflops_per_gpu"] == pytest.approx(1e9 * row["tokens_per_s"] / 2 / 1e12, rel=1e-3)
    assert row["mfu"] == pytest.approx(row["tflops_per_gpu"], rel=1e-3)
