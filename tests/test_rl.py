"""Phase `rl` (GRPO with verifiable rewards): the advantage and batch arithmetic, the policy
loss beside an untouched supervised loss, rewards that come from running the code in the
sandbox, the model as the agent's policy scored by hidden tests, and a tiny real run that
logs rewards, checkpoints and resumes bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from codeworld import prompts
from codeworld.config import ConfigError, load_params, parse_params
from codeworld.split import corpus_id, heldout
from codeworld.storage import Storage
from codeworld.tokens import encode
from model.grpo import FP8_WIDTH, Sample, empty_microbatch, group_advantages, microbatches
from model.rl import allocate, step_plan
from stages.rl_tasks import frame_reward, output_reward, prepare_pool, read_pool, reward, split_frames
from stages.train_phase import run_in_own_group
from tests.train_fixtures import (build_rl_root, calc_task, rl_program_records,
                                  write_dataset)

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None and not os.environ.get("CI"),
                                 reason="bubblewrap not installed")
TIMING = ("sample_seconds", "train_seconds", "step_seconds", "memory_mb", "memory_reserved_mb",
          "timestamp_ms")


def test_group_advantages():
    a = group_advantages([1.0, 0.0, 0.0, 0.0], eps=1e-6)
    assert a[0] == pytest.approx(3 ** 0.5, rel=1e-5) and a[1] == pytest.approx(-(3 ** -0.5), rel=1e-5)
    assert sum(a) == pytest.approx(0.0, abs=1e-9)
    assert group_advantages([1.0, 1.0, 1.0], eps=1e-6) == [0.0, 0.0, 0.0]   # no signal
    assert group_advantages([0.5, 0.0], eps=1e-6) == pytest.approx([1.0, -1.0], rel=1e-5)


def test_a_group_of_equal_rewards_has_no_signal_whatever_their_value():
    """The mean of equal floats need not be that float ((0.1 + 0.1 + 0.1) / 3 is not 0.1): the
    rounding residue over a residue-sized std came out as advantages of 1e-11, and
    build_samples took the group as informative and trained on it."""
    from model.rl import build_samples

    for value in (0.1, 0.7, 0.9):
        for n in (2, 3, 8):
            assert group_advantages([value] * n, eps=1e-6) == [0.0] * n, (value, n)
    cfg = parse_params({"pretrain": {}, "rl": {"init_from": "pretrain"}}).rl
    group = {"index": 0, "kind": "output", "id": "a", "prompt": [5, 6], "completions": [[7]] * 3,
             "rewards": [0.1] * 3, "finished": [True] * 3}
    samples, stats = build_samples([group], [], cfg)
    assert samples == [] and stats["informative_groups"] == 0


def test_microbatches_put_the_loss_on_completions_only():
    b, = microbatches([Sample([5, 6, 7], [8, 9], 2.0), Sample([5], [4], -1.0)], 4)
    assert b["tokens"].tolist() == [[5, 6, 7, 8], [5, 1, 1, 1]]        # right-padded with pad
    assert b["labels"].tolist() == [[6, 7, 8, 9], [4, 1, 1, 1]]
    assert b["loss_mask"].tolist() == [[0, 0, 1, 1], [1, 0, 0, 0]]     # labels 8, 9 and 4
    assert b["advantage"][0, 2].item() == 2.0 and b["advantage"][1, 0].item() == -1.0
    assert b["position_ids"].tolist() == [[0, 1, 2, 3]] * 2


def test_fp8_rows_are_padded_to_an_aligned_width_out_of_the_loss():
    samples = [Sample([5, 6, 7], [8, 9], 2.0), Sample([5], [4], -1.0)]
    plain, = microbatches(samples, 4)
    b, = microbatches(samples, 4, FP8_WIDTH)
    assert b["tokens"].shape == (2, FP8_WIDTH)        # TE's FP8 GEMMs need aligned rows
    for key in ("tokens", "labels", "loss_mask", "advantage", "position_ids"):
        assert b[key][:, :4].tolist() == plain[key].tolist()
    assert b["loss_mask"][:, 4:].sum() == 0 and set(b["tokens"][:, 4:].flatten().tolist()) == {1}
    assert b["position_ids"][0].tolist() == list(range(FP8_WIDTH))
    empty = empty_microbatch(FP8_WIDTH)
    assert empty["tokens"].shape == (1, FP8_WIDTH) and empty["loss_mask"].sum() == 0


def test_sampling_runs_without_fp8_and_restores_it():
    """RL samples with the model it trains: in FP8 decoding's rows of n tokens would fail TE's
    alignment check, so sampling turns FP8 off (Megatron reads config.fp8 at each forward)."""
    import torch

    from model.generate import sample

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(fp8="hybrid")
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def forward(self, tokens, pos, mask):
            self.seen.append(self.config.fp8)
            if len(self.seen) == 3:
                raise RuntimeError("boom")
            return torch.zeros(*tokens.shape, 8)

    m = Model()
    assert sample(m, [1, 2], vocab_size=8, max_new_tokens=2, cache=False) == [[0, 0]]
    assert m.seen == [None, None] and m.config.fp8 == "hybrid"
    with pytest.raises(RuntimeError):
        sample(m, [1, 2], vocab_size=8, max_new_tokens=2, cache=False)
    assert m.config.fp8 == "hybrid"


def test_step_plan_is_a_function_of_the_step():
    cfg = parse_params({"pretrain": {}, "rl": {"init_from": "pretrain", "prompts_per_step": 3,
                                               "tasks": {"output": 2.0, "next_frame": 1.0}}}).rl
    assert allocate(3, {"output": 2.0, "next_frame": 1.0}) == {"output": 2, "next_frame": 1}
    assert allocate(5, {"output": 1.0, "next_frame": 1.0}) == {"output": 3, "next_frame": 2}
    pool = {"output": [{"id": f"o{i}"} for i in range(5)], "next_frame": [{"id": "n0"}, {"id": "n1"}]}
    assert [x["id"] for x in step_plan(cfg, pool, 1)] == ["o0", "o1", "n0"]
    assert [x["id"] for x in step_plan(cfg, pool, 3)] == ["o4", "o0", "n0"]   # pools wrap


def test_the_task_mix_holds_over_the_run_when_a_step_has_too_few_prompts_for_it():
    """Each step's prompts were shared out by rl.tasks rounded on their own: a kind whose
    share is under half a prompt a step never came (75/25 at 2 prompts a step: 0 next_frame
    prompts in 100 steps; 50/50 at 1: none either), and 75/25 at 3 gave 33% next_frame."""
    from collections import Counter

    pool = {"output": [{"id": f"o{i}", "kind": "output"} for i in range(7)],
            "next_frame": [{"id": f"n{i}", "kind": "next_frame"} for i in range(5)]}
    for n, tasks in [(1, {"output": 0.5, "next_frame": 0.5}), (2, {"output": 0.75, "next_frame": 0.25}),
                     (3, {"output": 0.75, "next_frame": 0.25}), (4, {"output": 0.75, "next_frame": 0.25}),
                     (5, {"output": 0.3, "next_frame": 0.7})]:
        cfg = parse_params({"pretrain": {}, "rl": {"init_from": "pretrain", "prompts_per_step": n,
                                                   "tasks": tasks}}).rl
        plans = [step_plan(cfg, pool, s) for s in range(1, 101)]
        assert all(len(p) == n for p in plans)
        assert plans[41] == step_plan(cfg, pool, 42)      # still a function of the step
        for upto in range(1, 101):                        # the shares of every run prefix
            seen = Counter(x["kind"] for p in plans[:upto] for x in p)
            for kind, w in tasks.items():
                assert abs(seen[kind] - upto * n * w) <= 1, (n, tasks, upto, dict(seen))
        # each kind's pool still taken in turn across steps
        for kind, items in pool.items():
            ids = [x["id"] for p in plans for x in p if x["kind"] == kind]
            assert ids == [items[i % len(items)]["id"] for i in range(len(ids))], (n, kind)


def test_rl_params_are_checked_at_load():
    with pytest.raises(ConfigError, match="rl.init_from 'sft'"):
        parse_params({"rl": {}})            # the default parent, not in this params file
    with pytest.raises(ConfigError, match="max_new_tokens"):
        parse_params({"rl": {"init_from": "pretrain", "max_new_tokens": 600, "seq_length": 512}})
    assert parse_params({"rl": {"init_from": "pretrain"}}).rl.global_batch_size == 16
    from model.build import TrainingSetupError
    from model.rl import check_rl_layout

    tp2 = parse_params({"parallel": {"nproc": 2, "tensor": 2}, "rl": {"init_from": "pretrain"}})
    with pytest.raises(TrainingSetupError, match="tensor = pipeline = context = 1"):
        check_rl_layout(tp2)            # said by the stage before any work


TRAINER_CHECK = textwrap.dedent('''
    import torch
    from codeworld.config import parse_params
    from model.generate import init_single_process
    from model.trainer import PolicyLoss, Trainer

    init_single_process()
    model = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
             "ffn_hidden_size": 128, "max_position_embeddings": 64}
    params = parse_params({"model": model, "pretrain": {"seq_length": 16, "micro_batch_size": 2,
                          "global_batch_size": 2, "warmup_steps": 0, "steps": 5},
                          "rl": {"init_from": "pretrain", "seq_length": 16, "max_new_tokens": 4,
                                 "prompts_per_step": 1, "group_size": 2, "lr": 0.01,
                                 "min_lr": 0.01, "temperature": 0.7,
                                 "agent_interval": 0}})
    V = 600
    tr = Trainer(params, "rl", V)
    net = tr.chunks[0].module
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(20, V, (2, 12), generator=g)
    labels = torch.randint(20, V, (2, 12), generator=g)
    mask = (torch.rand(2, 12, generator=g) > 0.3).float()
    pos = torch.arange(12).expand(2, 12).contiguous()
    sup = {"tokens": tokens, "labels": labels, "loss_mask": mask, "position_ids": pos}
    with torch.no_grad():
        ce = net(tokens, pos, None, labels=labels)          # Megatron's own cross-entropy
        # summed in float32 per micro-batch, divided in float64, as reduce_loss does
        want = float(torch.sum(ce.float().reshape(-1) * mask.reshape(-1)).double()
                     / mask.sum().double())
    # supervised micro-batches take Megatron's labels path, whatever the policy settings
    tr.policy = PolicyLoss(V, 0.7, 0.5)
    assert tr.evaluate([[sup]]) == want, (tr.evaluate([[sup]]), want)
    adv = torch.tensor([[1.5] * 12, [-0.5] * 12])
    with torch.no_grad():
        logp = torch.log_softmax(net(tokens, pos, None)[..., :V].float() / 0.7, -1)
        logp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    pg = float((-adv * logp * mask).sum() / mask.sum())
    tr.policy = PolicyLoss(V, 0.7, 0.0)
    got = tr.evaluate([[{**sup, "advantage": adv}]])
    assert abs(got - pg) < 1e-5, (got, pg)
    # KL (k3) to a reference: zero where the reference is the policy, else its formula
    tr.policy = PolicyLoss(V, 0.7, 0.5)
    got = tr.evaluate([[{**sup, "advantage": adv, "ref_logprob": logp}]])
    assert abs(got - pg) < 1e-5, (got, pg)
    d = (logp - 0.3) - logp
    kl = float(((torch.exp(d) - d - 1) * mask).sum() / mask.sum())
    got = tr.evaluate([[{**sup, "advantage": adv, "ref_logprob": logp - 0.3}]])
    assert abs(got - (pg + 0.5 * kl)) < 1e-5, (got, pg, kl)
    # the sign: a step on +advantage makes the completion likelier, on -advantage less likely
    tr.policy = PolicyLoss(V, 0.7, 0.0)
    for sign in (1.0, -1.0):
        before = tr.evaluate([[{**sup, "advantage": torch.ones(2, 12)}]])   # = mean -log p
        tr.train_step([{**sup, "advantage": torch.full((2, 12), sign)}])
        after = tr.evaluate([[{**sup, "advantage": torch.ones(2, 12)}]])
        assert (after < before) == (sign > 0), (sign, before, after)
    print("TRAINER-OK")
''')


def test_policy_loss_beside_an_unchanged_supervised_loss(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(TRAINER_CHECK)
    with open(tmp_path / "log", "w") as log:
        proc = run_in_own_group([sys.executable, str(script)], stdout=log, timeout=600,
                                cwd=Path(__file__).resolve().parents[1],
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = (tmp_path / "log").read_text()
    assert proc.returncode == 0 and "TRAINER-OK" in out, out[-4000:]


def test_output_and_frame_rewards():
    assert output_reward("[1, 2]", "[1, 2]") == 1.0
    assert output_reward("[1,2]", "[1, 2]") == 1.0      # a literal, reformatted
    assert output_reward('"a"', "'a'") == 1.0
    assert output_reward("[1, 3]", "[1, 2]") == 0.0
    assert output_reward(None, "[1, 2]") == 0.0        # never ended its turn
    assert output_reward("__import__('os')", "0") == 0.0   # not a literal: no eval
    frame = '<|line_sep|>{"x": ".."}<|action_sep|>    y = x % 2\n<|frame_sep|>'
    before_sep = frame[:-len("<|frame_sep|>")]   # what rl_tasks.reward cuts at the separator
    assert frame_reward(before_sep, frame) == 1.0
    assert frame_reward(before_sep.replace("..", "3"), frame) == 0.0
    assert frame_reward(None, frame) == 0.0             # no separator: the frame never ended


@pytest.fixture(scope="module")
def rl_root(tmp_path_factory):
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not installed")
    root = tmp_path_factory.mktemp("rl")
    build_rl_root(root)
    return root


def _tokenizer(root: Path):
    from stages.tokenizer import load

    return load(Storage(str(root)))


@needs_bwrap
def test_pool_answers_come_from_the_sandbox(rl_root, tmp_path):
    params = load_params(rl_root / "params.yaml")
    records = rl_program_records(12)
    records[3] = {**records[3], "result": "'tampered'"}       # the dataset is not the truth
    write_dataset(tmp_path, "traces", records)
    data = params.model_dump()
    data["storage"]["root"] = str(tmp_path)
    data["rl"].update(tasks={"output": 1.0, "next_frame": 1.0}, max_new_tokens=48,
                      agent_interval=0)
    local = parse_params(data)
    tok = _tokenizer(rl_root)
    stats = prepare_pool(local, tok, tmp_path / "pool.jsonl")
    pool = read_pool(tmp_path / "pool.jsonl")
    assert stats["output_dropped_sandbox_ok"] == 1 and "p3" not in {i["id"] for i in pool["output"]}
    by_id = {r["id"]: r for r in records}
    for item in pool["output"]:
        rec = by_id[item["id"]]
        assert not heldout(corpus_id(rec), params.pack.heldout_percent, params.pack.seed)
        assert item["answer"] == repr(int(rec["call"][2:-1]) % 2)    # what running it gives
        # scored as RL scores a completion: its ids, as SFT taught the answer
        assert reward(item, tok, encode(tok, prompts.output_answer(item["answer"]))) == 1.0
        wrong = "1" if item["answer"] == "0" else "0"
        assert reward(item, tok, encode(tok, prompts.output_answer(wrong))) == 0.0
    assert pool["next_frame"] and stats["pool_next_frame"] == len(pool["next_frame"])
    for item in pool["next_frame"]:
        frames = split_frames(by_id[item["id"]]["trace"])
        assert item["answer"] == frames[item["frame"]]
        assert item["prompt"].endswith("".join(frames[:item["frame"]]))
        assert reward(item, tok, tok.encode(item["answer"]).ids) == 1.0


@needs_bwrap
def test_model_policy_is_scored_by_the_hidden_tests(rl_root, tmp_path):
    from stages.agent.envs import build_env
    from stages.agent.loop import run_episode
    from stages.agent.policies import ModelPolicy, call
    from stages.agent.tools import format_edit

    tok = _tokenizer(rl_root)
    params = load_params(rl_root / "params.yaml")
    env = build_env(params.agent.repositories[0], tmp_path / "cache")
    fix = call("edit", format_edit("calc/__init__.py", "    return total * len(xs)",
                                   "    return total / len(xs)"))
    for replies, reward in (([fix, call("submit")], 1.0), ([call("submit")], 0.0)):
        def generate(prompt, turn, replies=replies):   # stands in for the model's sampler
            return tok.encode(replies[turn] + "<|end_of_turn|>").ids
        policy = ModelPolicy(generate, tok, max_context=2048, max_new_tokens=64)
        ep = run_episode(calc_task(), env, policy, max_turns=4, max_tokens=20000,
                         observation_chars=2000, tool_wall_seconds=30, test_wall_seconds=60)
        assert ep["reward"] == reward and ep["submitted"]
        assert len(policy.turns) == len(replies)
        prompt, out = policy.turns[0]
        assert tok.decode(prompt, skip_special_tokens=False).endswith("<|assistant|>")
        assert tok.decode(out, skip_special_tokens=False) == replies[0] + "<|end_of_turn|>"


def _stage(root: Path, name: str, env: dict | None = None, check: bool = True):
    with open(root / f"{name}.log", "w") as log:
        proc = run_in_own_group([sys.executable, "-m", "codeworld.cli", "stage", name,
                                 "--params", str(root / "params.yaml"), "--no-track"],
                                cwd=root, stdout=log, timeout=900,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert proc.returncode == 0, (root / f"{name}.log").read_text()[-4000:]
    return proc


def _rows(root: Path) -> list[dict]:
    lines = (root / "checkpoints" / "rl" / "steps.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(l).items() if k not in TIMING} for l in lines]


@needs_bwrap
def test_tiny_rl_run_logs_rewards_checkpoints_and_resumes_bit_for_bit(rl_root):
    _stage(rl_root, "pretrain")                       # the stand-in SFT checkpoint
    _stage(rl_root, "rl")
    full = _rows(rl_root)
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    assert all(0.0 <= r["reward_mean"] <= 1.0 and "success_rate" in r for r in full)
    assert any(r["updated"] for r in full) and any(r["informative_groups"] for r in full)
    assert [r.get("agent_episodes") for r in full] == [None, 2, None, 2]   # every 2nd step
    out = rl_root / "checkpoints" / "rl"
    assert json.loads((out / "latest.json").read_text())["iteration"] == 4
    assert (out / "iter_0000002").is_dir() and (out / "iter_0000004").is_dir()
    run = json.loads((out / "run.json").read_text())
    assert run["parent"]["phase"] == "pretrain" and run["parent"]["iteration"] == 30
    metrics = json.loads((rl_root / "metrics" / "rl.json").read_text())
    assert metrics["steps"] == 4 and metrics["agent_episodes"] == 4 and "reward_last" in metrics
    assert len(json.loads((rl_root / "metrics" / "plots" / "rl.json").read_text())) == 4

    log_before = (out / "train.log").stat().st_mtime
    _stage(rl_root, "rl")                              # finished: nothing to do
    assert (out / "train.log").stat().st_mtime == log_before

    for p in out.glob("iter_*"):                      # same fingerprint, from the start again
        shutil.rmtree(p)
    (out / "latest.json").unlink()
    proc = _stage(rl_root, "rl", env={"CODEWORLD_FAULT_KILL_AFTER_STEP": "2"}, check=False)
    assert proc.returncode != 0
    assert json.loads((out / "latest.json").read_text())["iteration"] == 2
    _stage(rl_root, "rl")                              # resumes at step 3
    assert _rows(rl_root) == full


def test_the_fingerprint_holds_every_agent_param_the_episodes_use():
    # agent.max_workdir_mb ended episodes but was not in it: a changed value reran nothing
    import ast

    from stages.rl import AGENT_FIELDS
    tree = ast.parse((Path(__file__).parents[1] / "model" / "rl.py").read_text())
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id == "acfg"}
    assert used and used <= set(AGENT_FIELDS), used - set(AGENT_FIELDS)


def test_model_policy_keeps_the_task_and_the_latest_messages_that_fit(monkeypatch):
    # a conversation longer than the context ended the episode (policy_error): it is now cut
    # as SFT's per-turn documents are, the task kept, the oldest messages left out
    from stages.agent.policies import ModelPolicy
    from stages.documents import ASSISTANT, END_OF_TURN, ROLES

    class Tok:   # one token per character (role markers included)
        def encode(self, text):
            return SimpleNamespace(ids=[ord(c) for c in text])

        def encode_batch(self, texts):
            return [self.encode(t) for t in texts]

        def token_to_id(self, tok):
            assert tok == ASSISTANT
            return 7

        def decode(self, ids, skip_special_tokens=False):
            return "done"

    def enc(m):
        return [ord(c) for c in ROLES[m["role"]] + m["content"] + END_OF_TURN]

    # (its plain text, a message's content, needs no twin: no special token to leave unsplit)
    monkeypatch.setattr("codeworld.tokens._literal", lambda tok: tok)
    task = [{"role": "system", "content": "S" * 8}, {"role": "user", "content": "T" * 8}]
    later = [{"role": "assistant", "content": "a" * 8}, {"role": "tool", "content": "o" * 40},
             {"role": "assistant", "content": "b" * 8}, {"role": "tool", "content": "p" * 5}]
    head = enc(task[0]) + enc(task[1])
    fits = len(enc(later[2])) + len(enc(later[3]))     # the latest two, not the observation
    prompts = []
    policy = ModelPolicy(lambda prompt, turn: prompts.append(prompt) or [1], Tok(),
                         max_context=len(head) + fits + 1 + 10 + 30, max_new_tokens=10)
    policy.act(task)
    assert prompts[0] == head + [7]
    policy.act(task + later)
    assert prompts[1] == head + enc(later[2]) + enc(later[3]) + [7]
    policy.max_context += 200   # room for everything: nothing is left out
    policy.act(task + later)
    assert prompts[2] == head + [t for m in later for t in enc(m)] + [7]
    with pytest.raises(ValueError, match="no room for a reply"):
        ModelPolicy(lambda p, t: [1], Tok(), max_context=len(head) + 10,
                    max_new_tokens=10).act(task + later)


@needs_bwrap
def test_the_device_plans_rl_step_check_runs(rl_root):
    # bench/rl_step_check.py is what a GPU session runs for RL in FP8 (bench/gpu_plans): it must
    # not rot between the rare sessions that have a GPU, so it runs here in FP32
    _stage(rl_root, "pretrain")
    pool = rl_root / "check_pool.jsonl"
    prepare_pool(load_params(rl_root / "params.yaml"), _tokenizer(rl_root), pool)
    script = Path(__file__).resolve().parents[1] / "bench" / "rl_step_check.py"
    with open(rl_root / "rl_step_check.log", "w") as log:
        proc = run_in_own_group(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
             str(script), "--params", str(rl_root / "params.yaml"), "--pool", str(pool),
             "--init-from", str(rl_root / "checkpoints" / "pretrain"), "--unpadded",
             "--set", "rl.precision=fp32"],
            cwd=rl_root, stdout=log, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = (rl_root / "rl_step_check.log").read_text()
    assert proc.returncode == 0, text[-4000:]
    out = json.loads(next(ln for ln in text.splitlines() if ln.startswith("RL_STEP "))[8:])
    assert out["precision"] == "fp32" and out["samples"] > 0 and out["finite"]
    assert out["padded"]["skipped"] == 0 and out["unpadded"]["loss"] is not None


# --- the stage's own work before torchrun (stages/rl.py), torchrun and the pool stubbed -----

PARENT = {"phase": "pretrain", "checkpoint": "ckpt", "iteration": 4, "fingerprint": "parent"}


def _stage_root(root: Path, **rl) -> "Params":
    """A storage root with what stages/rl.py reads itself: a (tiny) tokenizer and its
    manifest, the traces dataset's manifest."""
    import hashlib

    from tokenizers import Tokenizer, models

    body = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).to_str().encode()
    (root / "tokenizer").mkdir(parents=True)
    (root / "tokenizer" / "tokenizer.json").write_bytes(body)
    (root / "tokenizer" / "manifest.json").write_text(json.dumps(
        {"sha256": hashlib.sha256(body).hexdigest(), "fingerprint": "tok"}))
    (root / "traces").mkdir()
    (root / "traces" / "manifest.json").write_text(json.dumps({"fingerprint": "traces"}))
    return parse_params({"storage": {"root": str(root)}, "pretrain": {},
                         "rl": {"init_from": "pretrain", "agent_interval": 0, **rl}})


def _run_stage(params, monkeypatch) -> dict:
    from stages import rl, rl_tasks

    def pool(params, tok, path):
        path.write_text("")
        return {"pool_output": 0}

    monkeypatch.setattr(rl, "parent_record", lambda params: dict(PARENT))
    monkeypatch.setattr(rl_tasks, "prepare_pool", pool)
    monkeypatch.setattr(rl, "torchrun_command", lambda *a: [])
    monkeypatch.setattr(rl, "train", lambda *a, **k: None)
    return rl.run(params, track=False, metrics_path=None, plot_path=None)


def _count_manifest_reads(monkeypatch) -> list[str]:
    reads: list[str] = []
    real = Storage.read_bytes

    def read_bytes(self, rel):
        if self.path(rel).endswith(os.path.join("tokenizer", "manifest.json")):
            reads.append(rel)
        return real(self, rel)

    monkeypatch.setattr(Storage, "read_bytes", read_bytes)
    return reads


def test_the_stage_reads_the_tokenizer_sha256_once_through_its_helper(tmp_path, monkeypatch):
    # rl_fingerprint read the manifest itself (json, ["sha256"]) and run.json's
    # tokenizer_sha256 read it again (train_phase.tokenizer_of): two reads that could disagree
    from stages import rl

    params = _stage_root(tmp_path)
    first = _run_stage(params, monkeypatch)               # makes the pool
    reads = _count_manifest_reads(monkeypatch)
    again = _run_stage(params, monkeypatch)               # the same fingerprint: the pool kept
    assert again["fingerprint"] == first["fingerprint"]
    assert len(reads) == 1, reads
    sha = json.loads((tmp_path / "tokenizer" / "manifest.json").read_text())["sha256"]
    run_json = json.loads((tmp_path / "checkpoints" / "rl" / "run.json").read_text())
    assert run_json["tokenizer_sha256"] == sha and run_json["fingerprint"] == again["fingerprint"]
    # what a worker node computes (model/launch.finished: nothing passed, all read here)
    assert rl.rl_fingerprint(params, PARENT) == again["fingerprint"]
    # the helper's error, which names the file, for a manifest that is not a tokenizer's
    (tmp_path / "tokenizer" / "manifest.json").write_text(json.dumps({"fingerprint": "tok"}))
    with pytest.raises(ValueError, match="manifest.json: not a tokenizer manifest"):
        rl.rl_fingerprint(params, PARENT)


def test_the_stage_resolves_the_precision_once(tmp_path, monkeypatch):
    # check_machine resolved it (and threw the answer away), then rl_fingerprint again
    from model import build

    calls = []
    real = build.resolve_precision
    monkeypatch.setattr(build, "resolve_precision", lambda *a, **k: calls.append(a) or real(*a, **k))
    _run_stage(_stage_root(tmp_path), monkeypatch)
    assert len(calls) == 1, calls


def test_the_sandbox_settings_that_can_change_the_pool_are_in_fingerprint_and_dvc_yaml(tmp_path):
    # traces.isolation and traces.batch_size decide which programs share a process when the
    # pool's answers are checked in the sandbox ("shared": a program can change its
    # neighbours' state), so which items the pool keeps; traces.workers never does
    # (forkserver.map_requests: batches follow the input order only). None was in either.
    import ast

    import yaml

    from stages import rl

    params = _stage_root(tmp_path)
    base = rl.rl_fingerprint(params, PARENT)

    def changed(**traces) -> bool:
        data = params.model_dump()
        data["traces"].update(traces)
        return rl.rl_fingerprint(parse_params(data), PARENT) != base

    assert changed(isolation="process") and changed(batch_size=1)
    assert not changed(workers=params.traces.workers + 3)
    repo = Path(__file__).resolve().parents[1]
    listed = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["rl"]["params"]
    assert {f"traces.{f}" for f in rl.SANDBOX_FIELDS} <= set(listed)
    assert "traces" not in listed and "traces.workers" not in listed
    # every traces setting the pool reads is one of the two kinds
    tree = ast.parse((repo / "stages" / "rl_tasks.py").read_text())
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Attribute) and n.value.attr == "traces"}
    assert used == set(rl.SANDBOX_FIELDS) | {"workers"}, used


RL_ROW_PROBE = """
import json, sys, time, torch
from model import metrics

torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
metrics.memory = lambda: {"memory_mb": [300.0, 1200.5][rank]}   # rank 1 holds the most
from model.rl import step_row

now = time.perf_counter()
row = step_row({"loss": 1.0, "step_seconds": 0.01}, {"reward_mean": 0.5}, 3, now - 2.0, now - 0.5,
               logged=True)
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump(row, f)
torch.distributed.destroy_process_group()
"""


def test_rl_logs_the_memory_peak_over_all_ranks_and_the_whole_step(tmp_path):
    """The logging rank (data-parallel rank 0) logged its own peak only, where the training
    phases log the maximum over ranks (model/metrics.memory_over_ranks); step_seconds runs from
    the step's start (sampling, scoring, batching) to the end of its update, as
    sample_seconds + train_seconds do."""
    (tmp_path / "probe.py").write_text(RL_ROW_PROBE)
    repo = Path(__file__).resolve().parents[1]
    with open(tmp_path / "log", "w") as log:
        proc = run_in_own_group([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc-per-node=2", str(tmp_path / "probe.py"), str(tmp_path)],
                                stdout=log, timeout=300, cwd=repo,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, (tmp_path / "log").read_text()[-3000:]
    for r in range(2):
        row = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert row["memory_mb"] == 1200.5, row
        assert row["step"] == 3 and row["loss"] == 1.0 and row["reward_mean"] == 0.5
        assert 2.0 <= row["step_seconds"] < 5.0 and 1.5 <= row["sample_seconds"] < 1.6
        assert row["sample_seconds"] + row["train_seconds"] == pytest.approx(row["step_seconds"],
                                                                             abs=0.0015)


def test_the_pool_is_made_with_the_tokenizer_the_fingerprint_names(tmp_path, monkeypatch):
    # the stage read the manifest for its fingerprint, then load() read it again for the
    # tokenizer it made the pool with: a tokenizer replaced in between made the pool while
    # run.json named the other. Now one read serves all three, and load checks the file
    # against it.
    from stages import rl

    params = _stage_root(tmp_path)
    reads = _count_manifest_reads(monkeypatch)
    _run_stage(params, monkeypatch)                        # makes the pool
    assert len(reads) == 1, reads
    shutil.rmtree(tmp_path / "checkpoints")
    read_once = rl.recorded_sha256

    def then_replaced(storage):
        import hashlib

        from tokenizers import Tokenizer, models

        sha = read_once(storage)
        other = Tokenizer(models.WordLevel({"b": 0, "[UNK]": 1}, unk_token="[UNK]")).to_str()
        (tmp_path / "tokenizer" / "tokenizer.json").write_text(other)    # another tokenizer,
        (tmp_path / "tokenizer" / "manifest.json").write_text(json.dumps(   # its manifest too
            {"sha256": hashlib.sha256(other.encode()).hexdigest(), "fingerprint": "other"}))
        return sha

    monkeypatch.setattr(rl, "recorded_sha256", then_replaced)
    with pytest.raises(ValueError, match="sha256 differs"):
        _run_stage(params, monkeypatch)
    assert not (tmp_path / "checkpoints" / "rl" / "pool.jsonl").exists()


def test_the_ranks_train_with_the_tokenizer_the_stage_recorded(tmp_path, monkeypatch):
    # the stage read the tokenizer's sha256 once (fingerprint, run.json, the pool), but each
    # rank loaded the storage root's tokenizer as its manifest then said: a tokenizer retrained
    # while the pool was made (or on another node's view of an S3 root) trained the parent's
    # weights with other ids, under a run.json naming the first. Now the ranks load the one
    # run.json records, and a replaced file fails naming it.
    import hashlib

    from tokenizers import Tokenizer, models

    import model.rl as rank

    params = _stage_root(tmp_path)
    _run_stage(params, monkeypatch)                       # run.json, as the stage writes it
    out = tmp_path / "checkpoints" / "rl"
    recorded = json.loads((out / "run.json").read_text())["tokenizer_sha256"]
    other = Tokenizer(models.WordLevel({"b": 0, "[UNK]": 1}, unk_token="[UNK]")).to_str()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text(other)        # retrained since,
    (tmp_path / "tokenizer" / "manifest.json").write_text(json.dumps(      # its manifest too
        {"sha256": hashlib.sha256(other.encode()).hexdigest(), "fingerprint": "other"}))
    assert hashlib.sha256(other.encode()).hexdigest() != recorded

    class Built(Exception):
        pass

    def trainer(params, phase, vocab):   # how far the rank got: it has a tokenizer by now
        raise Built(vocab)

    monkeypatch.setattr(rank, "init_distributed", lambda backend: None)
    monkeypatch.setattr(rank, "Trainer", trainer)
    (tmp_path / "params.json").write_text(json.dumps(params.model_dump()))
    args = ["--params", str(tmp_path / "params.json"), "--pool", str(out / "pool.jsonl"),
            "--out", str(out), "--init-from", str(tmp_path / "checkpoints" / "pretrain"),
            "--steps-log", str(out / "steps.jsonl")]
    with pytest.raises(ValueError, match=r"tokenizer\.json: sha256 differs from the recorded "
                                         + recorded[:12]):
        rank.main(args)
    # the file the stage recorded: the rank goes on to build its trainer
    (tmp_path / "tokenizer" / "tokenizer.json").write_bytes(
        Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).to_str().encode())
    with pytest.raises(Built):
        rank.main(args)
    (out / "run.json").write_text(json.dumps({"fingerprint": "fp"}))   # no record: refused
    with pytest.raises(rank.TrainingSetupError, match=r"run\.json: records no tokenizer_sha256"):
        rank.main(args)


def test_kl_out_of_the_mask_never_reaches_the_loss_or_its_gradient():
    """The k3 term exp(log ref - log pi) overflows float32 past 88 nats. Where the mask is 0
    (prompt tokens, pads: tokens no one sampled) it must count for nothing, neither as an
    inf x 0 = NaN in the loss nor in the gradient (Megatron's NaN check then stops the run)."""
    import torch

    from model.trainer import policy_loss_func

    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])     # prompt label, two completion labels, pad
    adv = torch.full((1, 4), 0.5)
    ref = torch.tensor([[-1.0, -2.0, -1.5, -0.5]])
    nll = torch.tensor([[95.0, 2.5, 1.0, 120.0]], requires_grad=True)   # -log pi per label
    loss, tokens, _ = policy_loss_func(mask, adv, ref, 0.1, nll)
    loss.backward()
    d = ref[0, 1:3] + nll.detach()[0, 1:3]
    want = float((0.5 * nll.detach()[0, 1:3] + 0.1 * (torch.exp(d) - d - 1)).sum())
    assert int(tokens) == 2
    assert torch.isfinite(loss) and float(loss.detach()) == pytest.approx(want, rel=1e-6)
    assert torch.isfinite(nll.grad).all() and nll.grad[0, 0] == 0 and nll.grad[0, 3] == 0


@needs_bwrap
def test_rl_figures_count_every_step_whatever_the_log_interval(rl_root):
    """rl.log_interval 3 logs steps 3 and 4 only: the figures summed the logged rows, so the
    agent episodes of step 2 and the updates of steps 1-2 were missing from metrics/rl.json.
    The run's totals ride in each logged row and in each checkpoint (a run killed after step 2,
    before any row was logged, resumes them), so its figures are the log_interval 1 run's."""
    _stage(rl_root, "pretrain")
    params_file = rl_root / "params.yaml"
    original = params_file.read_text()
    counts = ("steps", "updates", "agent_episodes", "agent_broken_episodes", "agent_success_rate")
    try:
        _stage(rl_root, "rl")                          # every step logged (the default)
        every = json.loads((rl_root / "metrics" / "rl.json").read_text())
        every_rows = _rows(rl_root)
        assert every["agent_episodes"] == 4 and every["updates"] == sum(r["updated"] for r in every_rows)
        data = yaml.safe_load(original)
        data["rl"]["log_interval"] = 3
        params_file.write_text(yaml.safe_dump(data, sort_keys=False))
        proc = _stage(rl_root, "rl", env={"CODEWORLD_FAULT_KILL_AFTER_STEP": "2"}, check=False)
        assert proc.returncode != 0
        out = rl_root / "checkpoints" / "rl"
        assert json.loads((out / "latest.json").read_text())["iteration"] == 2
        assert not (out / "steps.jsonl").exists() or _rows(rl_root) == []   # none logged yet
        _stage(rl_root, "rl")                          # resumes at step 3
        sparse = json.loads((rl_root / "metrics" / "rl.json").read_text())
        rows = _rows(rl_root)
        assert [r["step"] for r in rows] == [3, 4]
        assert {k: sparse.get(k) for k in counts} == {k: every.get(k) for k in counts}
        # the logged steps themselves are the default run's, bit for bit
        assert [{k: v for k, v in r.items() if not k.startswith("total_")} for r in rows] == \
            [{k: v for k, v in r.items() if not k.startswith("total_")} for r in every_rows[2:]]
    finally:
        params_file.write_text(original)


def test_the_figures_of_a_sparse_log_are_its_totals_and_an_old_log_sums_its_rows():
    """The figures from rows that carry the run's totals (log_interval 3: steps 3, 6) are the
    every-step log's; a log written before rows carried them sums its rows, as before."""
    from stages.rl_figures import add_step, summary

    steps = [{"step": s, "updated": s % 2, "agent_episodes": 2 if s % 2 == 0 else None,
              "agent_broken": s // 5, "agent_reward_mean": 0.5 if s % 4 else 1.0}
             for s in range(1, 7)]
    every = [{k: v for k, v in r.items() if v is not None} for r in steps]
    old = summary(every)
    assert (old["updates"], old["agent_episodes"], old["agent_broken_episodes"],
            old["agent_success_rate"]) == (3, 6, 2, 0.6667)
    totals, sparse = {}, []
    for r in every:
        totals = add_step(totals, r)
        if r["step"] % 3 == 0:
            sparse.append({**r, **totals})
    assert summary(sparse) == {**old, "steps": 6}
