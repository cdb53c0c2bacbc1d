"""What keeps a training phase's folder safe around the torchrun (no Megatron run needed): one
run at a time, the training dies with its stage, damaged metadata never deletes checkpoints,
a damaged pack file is named before the ranks start, a setup this machine lacks fails before
the phase's folder is touched."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.checkpoint import LATEST, latest
from model.metrics import StepLog
from stages.train_phase import RUN, TrainingFailed, claim, phase_lock, read_steps

REPO = Path(__file__).resolve().parents[1]


def _iters(root: Path, *its: int) -> None:
    for it in its:
        (root / f"iter_{it:07d}").mkdir(parents=True)


def test_latest_without_latest_json_is_the_newest_complete_checkpoint(tmp_path):
    assert latest(tmp_path) is None
    _iters(tmp_path, 10, 20)
    (tmp_path / "iter_0000030.tmp").mkdir()     # a save killed midway is not a checkpoint
    assert latest(tmp_path) == (20, tmp_path / "iter_0000020")
    (tmp_path / LATEST).write_text('{"iter": 10}')
    with pytest.raises(ValueError, match=r"latest\.json: needs \{\"iteration\": N, \"dir\": "
                                         r"\"iter_N\"\}, got \{\"iter\": 10\} \(KeyError"):
        latest(tmp_path)


def test_checkpoints_with_a_damaged_or_missing_run_json_are_kept_not_deleted(tmp_path):
    out = tmp_path / "checkpoints" / "pretrain"
    _iters(out, 5, 10)
    (out / LATEST).write_text(json.dumps({"iteration": 10, "dir": "iter_0000010"}))
    (out / RUN).write_text('{"phase": "pre')
    with pytest.raises(TrainingFailed, match=r"run\.json: unreadable .*restore it to resume, or remove"):
        claim(out, "fp")
    (out / RUN).unlink()
    with pytest.raises(TrainingFailed, match=r"run\.json: missing; it records which params"):
        claim(out, "fp")
    assert sorted(p.name for p in out.iterdir()) == ["iter_0000005", "iter_0000010", LATEST]
    # the same run resumes; another run's checkpoints are cleared; no checkpoint: nothing to keep
    (out / RUN).write_text(json.dumps({"fingerprint": "fp"}))
    claim(out, "fp")
    assert (out / "iter_0000010").is_dir()
    claim(out, "other")
    assert not out.exists()
    out.mkdir(parents=True)
    (out / RUN).write_text("{")
    claim(out, "fp")
    assert not out.exists()


STAGE = """
import sys
from pathlib import Path
from stages.train_phase import phase_lock, run_in_own_group
out = Path(sys.argv[1])
out.parent.mkdir(parents=True, exist_ok=True)
with phase_lock(out) as fd:
    # stands for torchrun: it holds the lock by the inherited descriptor
    run_in_own_group(["bash", "-c", f"echo $$ > {out.parent}/child.pid; exec sleep 120"],
                     pass_fds=(fd,), stdout=open(out.parent / "log", "w"))
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too
    return not Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")


def test_one_run_per_phase_folder_and_the_training_dies_with_its_stage(tmp_path):
    out = tmp_path / "data" / "checkpoints" / "pretrain"
    stage = subprocess.Popen([sys.executable, "-c", STAGE, str(out)], cwd=REPO)
    pid_file = out.parent / "child.pid"
    for _ in range(200):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        time.sleep(0.05)
    child = int(pid_file.read_text())
    with pytest.raises(TrainingFailed, match=rf"pid {stage.pid} on \S+ is training this phase "
                                             r"already \(lock \S+/\.work/locks/pretrain\.lock\)"):
        with phase_lock(out):
            pass
    os.kill(stage.pid, signal.SIGKILL)        # the stage dies without any cleanup of its own
    stage.wait()
    for _ in range(100):
        if not _alive(child):
            break
        time.sleep(0.05)
    assert not _alive(child), "the training outlived its stage"
    with phase_lock(out):                      # free again once the training is gone
        pass


def test_half_written_step_lines_are_dropped_not_fatal(tmp_path):
    out = tmp_path
    rows = [json.dumps({"step": i, "loss": 1.0}) for i in (1, 2, 3, 4)]
    (out / "steps.jsonl").write_text("\n".join(rows[:2]) + '\n{"step": 3, "lo\n' + rows[3] + "\n")
    assert [r["step"] for r in read_steps(out)] == [1, 2, 4]
    log = StepLog(out / "steps.jsonl", True, resume_after=2, run_id=None)   # a resume at step 2
    log.f.close()
    assert [json.loads(l)["step"] for l in (out / "steps.jsonl").read_text().splitlines()] == [1, 2]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from tests.train_fixtures import build_training_root

    root = tmp_path_factory.mktemp("guards")
    build_training_root(root)
    return root


def test_a_held_phase_is_one_error_line_from_the_command(root):
    from codeworld.config import parse_params
    from stages.train_phase import phase_dir
    from tests.train_fixtures import tiny_params

    with phase_lock(phase_dir(parse_params(tiny_params(root)), "pretrain")):
        proc = subprocess.run([sys.executable, "-m", "codeworld.cli", "stage", "pretrain", "--params",
                               str(root / "params.yaml"), "--no-track"], cwd=root,
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"codeworld stage: error: {root}/checkpoints/pretrain: pid {os.getpid()} on " in proc.stderr


MIDTRAIN = {"blend": {"code": 1.0}, "init_from": "pretrain", "steps": 2, "seq_length": 32,
            "micro_batch_size": 2, "global_batch_size": 4, "warmup_steps": 1}


def test_what_a_phase_needs_first_is_one_error_line_naming_it(root, tmp_path):
    """A missing or unreadable parent checkpoint, a blend source not packed, a garbled
    latest.json: the stage says which file and what to run, without a traceback."""
    import yaml

    from tests.train_fixtures import tiny_params

    def stage(name: str, **sections) -> subprocess.CompletedProcess:
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump(tiny_params(root, **sections)))
        return subprocess.run([sys.executable, "-m", "codeworld.cli", "stage", name, "--params",
                               str(params), "--no-track"], cwd=root, capture_output=True,
                              text=True, timeout=300)

    proc = stage("midtrain", midtrain=MIDTRAIN)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert (f"codeworld stage: error: {root}/checkpoints/pretrain: midtrain starts from pretrain's "
            "checkpoint and there is none (run the pretrain stage first)") in proc.stderr
    proc = stage("midtrain", midtrain={**MIDTRAIN, "blend": {"agent": 1.0, "nope": 1.0}})
    assert proc.returncode == 2   # a blend naming no pack source at all: the params are wrong
    parent = root / "checkpoints" / "pretrain"
    (parent / "iter_0000004").mkdir(parents=True)
    (parent / LATEST).write_text('{"iteration": 4}')
    try:
        proc = stage("midtrain", midtrain=MIDTRAIN)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert f"codeworld stage: error: {parent}/latest.json: needs" in proc.stderr
    finally:
        shutil.rmtree(parent)


@pytest.mark.parametrize("sections, needle", [
    ({"pretrain": {"precision": "fp8"}}, "pretrain.precision fp8 needs Transformer Engine"),
    ({"pretrain": {"cuda_graph": "full_iteration"}}, "pretrain.cuda_graph='full_iteration' needs a GPU"),
    ({"parallel": {"backend": "nccl"}}, "parallel.backend='nccl' needs CUDA GPUs"),
], ids=["fp8", "cuda_graph", "nccl"])
def test_a_setup_this_machine_lacks_keeps_the_finished_checkpoints(root, tmp_path, monkeypatch,
                                                                   sections, needle):
    """precision and cuda_graph are in the phase's fingerprint: a new value made open_phase
    clear the finished phase's checkpoints, and only then did torchrun find that this machine
    cannot run it. The stage checks the machine first."""
    import torch

    from codeworld.config import parse_params
    from model.build import TrainingSetupError
    from stages.train_phase import phase_dir, run_phase
    from tests.train_fixtures import tiny_params

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # a CPU machine
    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    params = parse_params(tiny_params(tmp_path, **sections))
    out = phase_dir(params, "pretrain")
    _iters(out, 4)
    (out / LATEST).write_text(json.dumps({"iteration": 4, "dir": "iter_0000004"}))
    (out / RUN).write_text(json.dumps({"fingerprint": "the finished run's"}))
    with pytest.raises(TrainingSetupError, match=re.escape(needle)):
        run_phase(params, "pretrain", track=False, metrics_path=None, plot_path=None)
    assert (out / "iter_0000004").is_dir()
    assert json.loads((out / RUN).read_text()) == {"fingerprint": "the finished run's"}


def test_a_checkpoint_of_auto_precision_is_no_resume_point_on_a_machine_that_resolves_it_otherwise(
        root, monkeypatch):
    """precision "auto" is fp32 on a CPU and bf16 on a GPU: the same params there must not
    resume the other's checkpoint (its optimizer state is of another layout)."""
    import torch

    from codeworld.config import parse_params
    from model import build
    from stages.train_phase import phase_fingerprint
    from tests.train_fixtures import tiny_params

    params = parse_params(tiny_params(root))
    assert params.pretrain.precision == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    on_cpu = phase_fingerprint(params, "pretrain", parent={})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # an Ampere GPU, no TE
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(build, "have_te", lambda: False)
    assert build.resolve_precision(params.pretrain).name == "bf16"
    assert phase_fingerprint(params, "pretrain", parent={}) != on_cpu


def test_the_stage_resolves_the_precision_once(root, tmp_path, monkeypatch):
    """run_phase's check_machine resolved the precision ("auto": fp32 on a CPU, bf16 or fp8 on
    a GPU) and threw the answer away, then phase_fingerprint resolved it again (as stages/rl.py
    did): the fingerprint now takes the one check_machine resolved."""
    from codeworld.config import parse_params
    from model import build
    from stages import train_phase
    from tests.train_fixtures import tiny_params

    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    params = parse_params(tiny_params(tmp_path))
    calls = []
    real = build.resolve_precision
    monkeypatch.setattr(build, "resolve_precision",
                        lambda *a, **k: calls.append(a) or real(*a, **k))
    monkeypatch.setattr(train_phase, "check_pack", lambda *a: None)
    monkeypatch.setattr(train_phase, "torchrun_command", lambda *a: [])
    monkeypatch.setattr(train_phase, "train", lambda *a, **k: None)   # no torchrun
    result = train_phase.run_phase(params, "pretrain", track=False, metrics_path=None,
                                   plot_path=None)
    assert len(calls) == 1, calls
    # what a worker node computes (model/launch.finished: resolved there)
    assert result["fingerprint"] == train_phase.phase_fingerprint(params, "pretrain")


def test_a_setup_this_machine_lacks_is_one_error_line_from_the_command(root, tmp_path):
    import yaml

    from tests.train_fixtures import tiny_params

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(root, pretrain={"precision": "fp8"})))
    proc = subprocess.run([sys.executable, "-m", "codeworld.cli", "stage", "pretrain", "--params",
                           str(params), "--no-track"], cwd=root, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "codeworld stage: error: pretrain.precision fp8 needs Transformer Engine" in proc.stderr


def test_a_damaged_pack_file_is_named_before_torchrun(root, tmp_path):
    from codeworld.config import parse_params
    from stages.train_phase import check_pack
    from tests.train_fixtures import tiny_params

    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    params = parse_params(tiny_params(tmp_path))
    out = tmp_path / "checkpoints" / "pretrain"
    out.mkdir(parents=True)
    check_pack(params, "pretrain", out)
    stamp = json.loads((out / ".pack_verified.json").read_text())["files"]   # fetch's stamp format
    assert set(stamp) == {f for n in params.pretrain.blend for f in (f"{n}.bin", f"{n}.idx")}
    name = sorted(stamp)[0]
    path = tmp_path / "pack" / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TrainingFailed, match=rf"pack/{name}: its sha256 differs from the pack manifest"):
        check_pack(params, "pretrain", out)
    path.unlink()
    with pytest.raises(TrainingFailed, match=rf"pack/{name}: missing, the pack manifest names it"):
        check_pack(params, "pretrain", out)


def test_a_damaged_latest_checkpoint_resumes_from_the_newest_intact_one(tmp_path):
    from model.checkpoint import publish
    from stages.train_phase import resume_point

    out = tmp_path / "pretrain"
    for it in (10, 20):
        (out / f"iter_{it:07d}.tmp").mkdir(parents=True)
        (out / f"iter_{it:07d}.tmp" / "__0_0.distcp").write_bytes(b"x" * it)
        publish(out, it, keep=2)
    assert resume_point(out, "pretrain") == (20, out / "iter_0000020")
    (out / "iter_0000020" / "__0_0.distcp").write_bytes(b"x")      # cut since it was saved
    assert resume_point(out, "pretrain") == (10, out / "iter_0000010")
    assert json.loads((out / LATEST).read_text()) == {"iteration": 10, "dir": "iter_0000010"}
    (out / "iter_0000010" / "__0_0.distcp").unlink()
    (out / LATEST).write_text(json.dumps({"iteration": 20, "dir": "iter_0000020"}))
    with pytest.raises(TrainingFailed, match=r"iter_0000020/__0_0\.distcp: 1 bytes, 20 when saved: "
                                             r"the latest checkpoint of pretrain is damaged and no "
                                             r"older one is intact; remove \S+ to train"):
        resume_point(out, "pretrain")
