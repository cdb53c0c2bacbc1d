"""The training engine on CPU through Megatron-Core: layouts agree, resume is exact, the
stage trains with falling loss, bad setups fail before work. Each run is a real torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from codeworld.config import ConfigError, parse_params
from stages.train_phase import run_in_own_group
from tests.train_fixtures import build_training_root, tiny_params

TOL = 2e-4   # TP/PP change the order of float sums; CWM-size drift would be far larger


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    build_training_root(root)
    return root


def train(root: Path, out: Path, nproc: int = 1, env: dict | None = None, check: bool = True,
          **sections) -> list[dict]:
    params = tiny_params(root, **sections)
    params.setdefault("parallel", {})["nproc"] = nproc
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "model.train", "--params", str(out / "params.yaml"),
           "--pack", str(root / "pack"), "--out", str(out / "ck"),
           "--steps-log", str(out / "steps.jsonl")]
    with open(out / "log", "w") as log:  # a file, not a pipe: leftovers cannot block a read
        proc = run_in_own_group(cmd, stdout=log, timeout=600,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert proc.returncode == 0, (out / "log").read_text()[-4000:]
    return steps(out)


def steps(out: Path) -> list[dict]:
    path = out / "steps.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def losses(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows}


def resume_copy(src: Path, iteration: int, dst: Path) -> None:
    """dst/ck holds only src's checkpoint of `iteration` as its latest."""
    name = f"iter_{iteration:07d}"
    (dst / "ck").mkdir(parents=True)
    shutil.copytree(src / "ck" / name, dst / "ck" / name)
    (dst / "ck" / "latest.json").write_text(json.dumps({"iteration": iteration, "dir": name}))


@pytest.fixture(scope="module")
def baseline(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp1")
    return out, train(root, out)


def test_each_step_logs_the_lr_its_update_used(baseline):
    """Warm-up over step 1 from 0, then cosine to min_lr over the 4 steps (the schedule counts
    samples: 4 a step). The row of step k is the lr at k - 1 steps: it was read after the
    scheduler's step, i.e. step k + 1's (0.003 at step 1, whose update used 0)."""
    import math

    _, rows = baseline
    lr, min_lr, warmup, total = 0.003, 3e-4, 4, 16

    def used(k: int) -> float:
        n = (k - 1) * 4
        if n <= warmup:
            return lr * n / warmup
        return min_lr + 0.5 * (math.cos(math.pi * (n - warmup) / (total - warmup)) + 1) * (lr - min_lr)

    assert [r["lr"] for r in rows] == pytest.approx([used(k) for k in (1, 2, 3, 4)])
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(lr)


def test_tensor_parallel_2_matches_a_single_process(root, baseline, tmp_path):
    _, base = baseline
    tp2 = train(root, tmp_path, nproc=2, parallel={"tensor": 2})
    assert len(tp2) == len(base) == 4
    for step, loss in losses(base).items():
        assert losses(tp2)[step] == pytest.approx(loss, abs=TOL)


def test_pipeline_parallel_2_from_scratch_matches_a_single_process(root, baseline, tmp_path):
    """Same seed, same initial weights: each layer draws from the seed and its global number,
    so the second stage's first layer is layer 1, not a copy of layer 0's draws (as when
    each stage seeded its RNG with the bare seed: step 1's loss differed by 0.0048)."""
    _, base = baseline
    pp2 = train(root, tmp_path, nproc=2, parallel={"pipeline": 2})
    assert sorted(losses(pp2)) == [1, 2, 3, 4]
    for step, loss in losses(base).items():
        assert losses(pp2)[step] == pytest.approx(loss, abs=TOL)


def test_pipeline_parallel_2_continues_a_single_process_checkpoint(root, baseline, tmp_path):
    # A checkpoint loaded under another layout takes the same steps.
    src, base = baseline
    resume_copy(src, 2, tmp_path)
    pp2 = train(root, tmp_path, nproc=2, parallel={"pipeline": 2})
    assert sorted(losses(pp2)) == [3, 4]
    for step in (3, 4):
        assert losses(pp2)[step] == pytest.approx(losses(base)[step], abs=TOL)


def test_virtual_pipeline_matches_a_single_process(root, tmp_path):
    # PP=2 x VP=2 (each rank holds two interleaved model chunks, numbered from layer 0 each):
    # from scratch, the same initial weights as one process (rank 0 holds layers 0 and 2);
    # then it loads a 4-layer single-process checkpoint and takes the same steps.
    four = {"num_layers": 4}
    base = train(root, tmp_path / "one", model=four)
    scratch = train(root, tmp_path / "scratch", nproc=2, model=four,
                    parallel={"pipeline": 2, "virtual_pipeline": 2})
    assert sorted(losses(scratch)) == [1, 2, 3, 4]
    for step, loss in losses(base).items():
        assert losses(scratch)[step] == pytest.approx(loss, abs=TOL)
    resume_copy(tmp_path / "one", 2, tmp_path / "vp")
    vp = train(root, tmp_path / "vp", nproc=2, model=four,
               parallel={"pipeline": 2, "virtual_pipeline": 2})
    assert sorted(losses(vp)) == [3, 4]
    for step in (3, 4):
        assert losses(vp)[step] == pytest.approx(losses(base)[step], abs=TOL)
    assert (tmp_path / "vp" / "ck" / "iter_0000004").is_dir()   # and it saves in that layout


def test_a_vocabulary_padded_for_tp2_continues_the_same_under_one_process(root, tmp_path):
    """A 650-id tokenizer (the pack's vocab_size; its ids are the same): the output layer
    and embedding are padded past it, and Megatron's cross-entropy normalises over every
    padded column. Padded per layout (to 64 x TP) the model had 768 columns under TP=2 and
    704 under one process: a TP=2 checkpoint loaded silently with 64 columns cut, and the
    resumed steps' loss was 0.086 lower than TP=2's own. Padded by the model (64 x its query
    groups, which every allowed TP divides), a layout change continues the same steps."""
    vocab = tmp_path / "v650"
    vocab.mkdir()
    shutil.copytree(root / "pack", vocab / "pack", ignore=shutil.ignore_patterns(".work"))
    manifest = json.loads((vocab / "pack" / "manifest.json").read_text())
    (vocab / "pack" / "manifest.json").write_text(json.dumps({**manifest, "vocab_size": 650}))
    tp2 = train(vocab, tmp_path / "tp2", nproc=2, parallel={"tensor": 2})
    resume_copy(tmp_path / "tp2", 2, tmp_path / "one")
    one = train(vocab, tmp_path / "one")
    assert sorted(losses(one)) == [3, 4]
    for step in (3, 4):
        assert losses(one)[step] == pytest.approx(losses(tp2)[step], abs=TOL)


def test_data_parallel_2_with_distributed_optimizer_matches(root, baseline, tmp_path):
    # Same seed, same CPU initialisation: two data-parallel ranks sharding the optimizer
    # state take the same steps as one process (the loss is summed over both ranks' tokens).
    _, base = baseline
    dp2 = train(root, tmp_path, nproc=2, parallel={"distributed_optimizer": True})
    for step, loss in losses(base).items():
        assert losses(dp2)[step] == pytest.approx(loss, abs=TOL)
    assert (tmp_path / "ck" / "iter_0000004").is_dir()


def test_a_distributed_optimizer_checkpoint_resumed_without_one_is_a_clear_error(root, tmp_path):
    """The two optimizers keep their state in other formats, which Megatron does not convert:
    the resume failed deep in its load with "KeyError: 'pre_wd_mult'". Said before the load,
    naming the setting and the value the checkpoint needs."""
    run = {"pretrain": {"steps": 4, "save_interval": 2, "eval_interval": 2}}
    train(root, tmp_path / "dp2", nproc=2, parallel={"distributed_optimizer": True}, **run)
    resume_copy(tmp_path / "dp2", 2, tmp_path / "one")
    assert train(root, tmp_path / "one", check=False, **run) == []
    log = (tmp_path / "one" / "log").read_text()
    assert "saved with parallel.distributed_optimizer=true; this run has false" in log, log[-3000:]


def test_killed_training_resumes_bit_for_bit(root, tmp_path):
    run = {"pretrain": {"steps": 6, "save_interval": 2, "eval_interval": 3}}
    whole = train(root, tmp_path / "whole", **run)
    killed = train(root, tmp_path / "killed", check=False,
                   env={"CODEWORLD_FAULT_KILL_AFTER_STEP": "5"}, **run)
    assert [r["step"] for r in killed] == [1, 2, 3, 4, 5]  # killed after step 5, saved at 4
    assert json.loads((tmp_path / "killed" / "ck" / "latest.json").read_text())["iteration"] == 4
    resumed = train(root, tmp_path / "killed", **run)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(whole, resumed):
        assert (a["loss"], a["grad_norm"], a["lr"], a.get("valid_loss")) == \
               (b["loss"], b["grad_norm"], b["lr"], b.get("valid_loss"))


def test_stage_trains_with_falling_loss_then_is_a_no_op(root, tmp_path):
    from stages import train_phase

    params = parse_params(tiny_params(root, pretrain={"steps": 30, "warmup_steps": 3,
                                                      "save_interval": 10, "eval_interval": 10}))
    metrics = tmp_path / "metrics.json"
    result = train_phase.run_phase(params, "pretrain", track=False, metrics_path=str(metrics),
                                   plot_path=str(tmp_path / "plot.json"))
    stats = json.loads(metrics.read_text())
    assert stats["steps"] == 30 and stats["loss_fell"] == 1, stats
    assert stats["final_loss"] < stats["first_loss"] - 0.5
    assert len(json.loads((tmp_path / "plot.json").read_text())) == 30
    assert Path(result["checkpoint"]).name == "iter_0000030"
    again = train_phase.run_phase(params, "pretrain", track=False, metrics_path=None, plot_path=None)
    assert "seconds_train" not in again["stats"] and again["checkpoint"] == result["checkpoint"]


def test_a_tracking_server_lost_during_training_loses_no_step(root, tmp_path, mlflow_url,
                                                               monkeypatch):
    """The stage's torchrun with the tracking server cut (tests/fault_proxy.py) from step 4's
    send on: training finishes all the same, with one warning in train.log; the stage then
    fails as for an outage (TrackingUnavailable, exit 75), its run left open. Its rerun, the
    server back, trains nothing and sends the missing steps to the run that trained them, each
    step once at the time it was logged, and closes that run as the stage ended it: FAILED."""
    import time

    import mlflow
    from mlflow.tracking import MlflowClient

    from codeworld.tracking import TrackingUnavailable
    from model.metrics import read_rows
    from stages import train_phase
    from tests.fault_proxy import FaultProxy

    params = parse_params(tiny_params(root, pretrain={"steps": 8, "save_interval": 4,
                                                      "eval_interval": 4}))
    out = train_phase.phase_dir(params, "pretrain")
    shutil.rmtree(out, ignore_errors=True)   # another test's (other params: cleared anyway)
    run = dict(metrics_path=str(tmp_path / "pretrain.json"), plot_path=None)
    with FaultProxy(mlflow_url) as proxy:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        # every request fails from step 4's send on (its row is written before it): the
        # steps', then the stage's own (the steps sent after training, the run's close)
        proxy.fail("reset", times=None,
                   match=lambda method, key: len(read_rows(out / "steps.jsonl")) >= 4)
        try:
            with pytest.raises(TrackingUnavailable, match=f"{proxy.url} unreachable: .*steps 4 on"):
                train_phase.run_phase(params, "pretrain", **run)
            assert [r["step"] for r in read_rows(out / "steps.jsonl")] == list(range(1, 9))
            log = (out / "train.log").read_text()
            assert log.count(f"MLflow tracking server {proxy.url} unreachable at step 4") == 1
            trained = json.loads((out / "run.json").read_text())["mlflow_run_id"]
            assert MlflowClient(mlflow_url).get_run(trained).info.status == "RUNNING"
            proxy.heal()
            again_started = int(time.time() * 1000)
            again = train_phase.run_phase(params, "pretrain", **run)
        finally:
            mlflow.set_tracking_uri(None)
        assert "seconds_train" not in again["stats"] and again["stats"]["steps"] == 8
        client = MlflowClient(proxy.url)
        logged = {r["step"]: r["timestamp_ms"] for r in read_rows(out / "steps.jsonl")}
        for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
            assert {m.step: m.timestamp for m in client.get_metric_history(trained, key)} == \
                logged, key
        info = client.get_run(trained)
        assert info.info.status == "FAILED" and info.info.end_time < again_started
        assert info.data.tags["codeworld.error"].startswith("TrackingUnavailable: ")
        rerun = json.loads((out / "run.json").read_text())["mlflow_run_id"]
        assert rerun != trained and client.get_metric_history(rerun, "loss") == []


def test_a_cut_checkpoint_is_passed_over_and_training_redone_bit_for_bit(root, tmp_path):
    """The stage on real dist_checkpointing files: the latest checkpoint's shard cut since it
    was saved, the rerun resumes from the one before and trains the same steps again."""
    from stages import train_phase

    mine = tmp_path / "root"
    shutil.copytree(root, mine, ignore=shutil.ignore_patterns("checkpoints"))
    params = parse_params(tiny_params(mine, pretrain={"steps": 6, "save_interval": 2,
                                                      "eval_interval": 3}))
    out = train_phase.phase_dir(params, "pretrain")
    train_phase.run_phase(params, "pretrain", track=False, metrics_path=None, plot_path=None)
    first = steps(out)
    shard = sorted((out / "iter_0000006").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    train_phase.run_phase(params, "pretrain", track=False, metrics_path=None, plot_path=None)
    assert json.loads((out / "latest.json").read_text())["iteration"] == 6
    again = steps(out)
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(first, again):   # steps 5 and 6 trained again from iteration 4, the same
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"])
    assert "train.log" in {p.name for p in out.iterdir()}
    assert (out / "train.log").read_text().count("==== torchrun") == 2
    from model.checkpoint import damage

    assert damage(out / "iter_0000006") is None and shard.stat().st_size > 1000   # saved anew


def test_layouts_the_model_cannot_take_fail_at_load(root):
    with pytest.raises(ConfigError, match="must divide model.num_attention_heads"):
        parse_params(tiny_params(root, parallel={"nproc": 3, "tensor": 3}))
    with pytest.raises(ConfigError, match="num_layers 2 is not divisible"):
        parse_params(tiny_params(root, parallel={"nproc": 4, "pipeline": 4}))
    with pytest.raises(ConfigError, match="global_batch_size 4 is not a multiple"):
        parse_params(tiny_params(root, parallel={"nproc": 4},
                                 pretrain={"micro_batch_size": 2, "global_batch_size": 4}))


def refused(root: Path, tmp_path: Path, pretrain: dict) -> str:
    """model.train's stderr for a pretrain setup this CPU machine must refuse before any work."""
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(tiny_params(root, pretrain=pretrain)))
    proc = subprocess.run([sys.executable, "-m", "model.train", "--params", str(tmp_path / "p.yaml"),
                           "--pack", str(root / "pack"), "--out", str(tmp_path / "ck"),
                           "--steps-log", str(tmp_path / "s.jsonl")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert not (tmp_path / "ck").exists()
    return proc.stderr


def test_fp8_without_transformer_engine_is_refused_before_any_work(root, tmp_path):
    assert "precision fp8 needs Transformer Engine" in refused(root, tmp_path, {"precision": "fp8"})


@pytest.mark.parametrize("nproc, parallel", [
    # TP=2 with each rank's norms and residual stream on half of the sequence: the norm
    # weights' partial gradients are summed over the TP group (model/norm.py), else they differ
    (2, {"tensor": 2, "sequence_parallel": True}),
    # each rank holds chunks (i, 3 - i) of every sequence's 4 and attends to all keys gathered
    # from both (model/attention.py); loss and gradients are summed over both ranks' tokens
    (2, {"context": 2}),
    # both, each TP rank with one of the 2 KV groups
    (4, {"tensor": 2, "sequence_parallel": True, "context": 2}),
], ids=["sequence", "context", "tensor-sequence-context"])
def test_sequence_and_context_parallel_match_a_single_process(root, baseline, tmp_path, nproc, parallel):
    _, base = baseline
    rows = train(root, tmp_path, nproc=nproc, parallel=parallel)
    assert len(rows) == len(base) == 4
    for a, b in zip(base, rows):
        assert (b["loss"], b["grad_norm"], b.get("valid_loss", 0)) == pytest.approx(
            (a["loss"], a["grad_norm"], a.get("valid_loss", 0)), abs=TOL)


def test_cuda_graphs_without_a_gpu_are_refused_before_any_work(root, tmp_path):
    err = refused(root, tmp_path, {"cuda_graph": "full_iteration"})
    assert "pretrain.cuda_graph='full_iteration' needs a GPU" in err
    with pytest.raises(ConfigError, match="cuda_graph"):
        parse_params(tiny_params(root, pretrain={"cuda_graph": "whole_step"}))


def test_cuda_graph_modes_reach_megatron_as_its_own_settings(monkeypatch):
    """What Megatron keys off: an empty scope gives every layer a graph manager and the
    schedules create the graphs; the full_iteration scope leaves both to the trainer's
    FullCudaGraphWrapper. Graphs replay RNG states, so the tracker must be a graph-safe one."""
    import torch
    from megatron.core.transformer.enums import CudaGraphScope

    from codeworld.config import ModelConfig, ParallelConfig, PhaseConfig
    from model.build import Precision, TrainingSetupError, check_cuda_graph, transformer_config

    phase, te = PhaseConfig(), Precision("bf16", True)
    cfg = {g: transformer_config(ModelConfig(), ParallelConfig(), phase, te, g)
           for g in ("none", "layer", "full_iteration")}
    assert (cfg["none"].cuda_graph_impl, cfg["none"].use_te_rng_tracker) == ("none", False)
    assert (cfg["layer"].cuda_graph_impl, cfg["layer"].cuda_graph_scope) == ("local", [])
    assert cfg["full_iteration"].cuda_graph_scope == [CudaGraphScope.full_iteration]
    assert cfg["layer"].use_te_rng_tracker and cfg["full_iteration"].use_te_rng_tracker
    no_te = transformer_config(ModelConfig(), ParallelConfig(), phase, Precision("bf16", False),
                               "full_iteration")
    assert not no_te.use_te_rng_tracker   # Megatron's graph-safe tracker instead (trainer.py)

    check_cuda_graph("pretrain", "none", Precision("fp32", False))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(TrainingSetupError, match="cuda_graph='layer' needs Transformer Engine"):
        check_cuda_graph("sft", "layer", Precision("bf16", False))
    check_cuda_graph("sft", "full_iteration", Precision("bf16", False))


FINALIZE_PROBE = '''
import sys, torch, yaml
from codeworld.config import parse_params
from megatron.core.distributed import finalize_model_grads
from model.trainer import Trainer, finalize_grads, init_distributed

params = parse_params(yaml.safe_load(open(sys.argv[1])))
init_distributed("gloo")
trainer, cfg = Trainer(params, "pretrain", 600), params.pretrain
g = torch.Generator().manual_seed(torch.distributed.get_rank() % 2)   # DP ranks: other data
def batch():
    tokens = torch.randint(0, 600, (cfg.micro_batch_size, cfg.seq_length), generator=g)
    return {"tokens": tokens, "labels": tokens.roll(-1, 1), "position_ids":
            torch.arange(cfg.seq_length).expand_as(tokens).contiguous(),
            "loss_mask": (torch.rand(tokens.shape, generator=g) < 0.7).float()}
batches = [batch() for _ in range(cfg.global_batch_size // cfg.micro_batch_size)]
grads = []
for finalize in (finalize_model_grads, finalize_grads):
    trainer.tcfg.finalize_model_grads_func = finalize
    for c in trainer.chunks:
        c.zero_grad_buffer()
    trainer.run_batches(batches, forward_only=False)
    grads.append(torch.cat([b.grad_data.clone() for c in trainer.chunks for b in c.buffers]))
assert grads[0].abs().sum() > 0
assert torch.equal(grads[0], grads[1]), (grads[0] - grads[1]).abs().max()
print("same gradients", torch.distributed.get_rank(), flush=True)
torch.distributed.destroy_process_group()
'''


@pytest.mark.parametrize("parallel", [{"pipeline": 2}, {"distributed_optimizer": True}])
def test_gradient_finalisation_on_the_device_matches_megatrons(root, tmp_path, parallel):
    """finalize_grads divides by the loss-token count without reading it on the host (a CUDA
    graph captures it); the gradients must equal Megatron's finalize_model_grads' bit for bit,
    across pipeline stages (the count broadcast from the last) and data-parallel ranks (summed).
    The loss curves alone would not tell: Adam hides a wrong gradient scale."""
    params = tiny_params(root, parallel={"nproc": 2, **parallel})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "probe.py").write_text(FINALIZE_PROBE)
    with open(tmp_path / "log", "w") as log:
        proc = run_in_own_group([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc-per-node=2", str(tmp_path / "probe.py"), str(tmp_path / "p.yaml")],
                                stdout=log, timeout=300, cwd=Path(__file__).resolve().parents[1],
                                env={**os.environ, "OMP_NUM_THREADS": "1",
                                     "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    out = (tmp_path / "log").read_text()
    assert proc.returncode == 0, out[-3000:]
    assert out.count("same gradients") == 2


EVAL_PROBE = '''
import sys, torch, yaml
from codeworld.config import parse_params
from model.trainer import Trainer, init_distributed

params = parse_params(yaml.safe_load(open(sys.argv[1])))
init_distributed("gloo")
trainer, cfg = Trainer(params, "pretrain", 600), params.pretrain
g = torch.Generator().manual_seed(0)
def batch(share):
    tokens = torch.randint(2, 600, (cfg.micro_batch_size, cfg.seq_length), generator=g)
    return {"tokens": tokens, "labels": tokens.roll(-1, 1), "position_ids":
            torch.arange(cfg.seq_length).expand_as(tokens).contiguous(),
            "loss_mask": (torch.rand(tokens.shape, generator=g) < share).float()}
per_step = cfg.global_batch_size // cfg.micro_batch_size
# two evaluation batches: one with a few answer tokens (an SFT batch of long prompts), one full
batches = [[batch(0.05) for _ in range(per_step)], [batch(1.0) for _ in range(per_step)]]
got = trainer.evaluate(batches)
model, total, tokens = trainer.chunks[0].module, 0.0, 0.0
with torch.no_grad():
    for b in sum(batches, []):
        nll = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        total += float((nll.float() * b["loss_mask"]).sum())
        tokens += float(b["loss_mask"].sum())
print(f"evaluate {got:.6f} per token {total / tokens:.6f}", flush=True)
assert abs(got - total / tokens) < 1e-5, (got, total / tokens)
print("per token", flush=True)
torch.distributed.destroy_process_group()
'''


def test_the_validation_loss_is_per_token_over_all_its_batches(root, tmp_path):
    """Like the training loss: the masked tokens' loss summed over the eval_iters batches,
    divided by their count. A mean of each batch's mean weighed a batch of few loss tokens
    (SFT: long prompts, short answers) as much as a full one."""
    params = tiny_params(root)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "probe.py").write_text(EVAL_PROBE)
    with open(tmp_path / "log", "w") as log:
        proc = run_in_own_group([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc-per-node=1", str(tmp_path / "probe.py"), str(tmp_path / "p.yaml")],
                                stdout=log, timeout=300, cwd=Path(__file__).resolve().parents[1],
                                env={**os.environ, "OMP_NUM_THREADS": "1",
                                     "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    out = (tmp_path / "log").read_text()
    assert proc.returncode == 0 and "per token\n" in out, out[-3000:]
