"""Phase `rl` on this rank: GRPO with verifiable rewards. `torchrun ... -m model.rl --pool P ...`
(stages/rl.py prepares the pool and runs it).

Each step: the step's prompts (a function of the step number: a seeded pool, taken in turn by
kind in the proportions of `rl.tasks`) are shared out over the data-parallel ranks; each rank
samples `group_size` completions of each of its prompts from the model being trained (its own
chunk, model/generate.py's sampler, seeded per step and prompt) and scores them
(stages/rl_tasks.py); every `agent_interval` steps one mutate-fix task is also tried
`agent_group_size` times with the model as the agent's policy and scored by its hidden tests.
All ranks then see every group (all_gather_object), compute group-normalised advantages, and
take one optimizer step on -advantage x log-prob of the completions' tokens (model/trainer.py).

Choices (documented in README): one update per batch of samples, so the PPO ratio is 1 and no
clip is computed; groups whose rewards are all equal carry no signal and are left out of the
update, as DAPO's dynamic sampling does (without resampling); a step where no group has signal
takes no optimizer step (the LR schedule still advances); KL to the initial policy only when
rl.kl_coef > 0 (DAPO: none). Sampling needs tensor = pipeline = context = 1.

Checkpoints every save_interval steps; a rerun resumes from the latest and continues bit for
bit (the prompts and sampling seeds of a step depend on the step only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from codeworld.config import Params, RLConfig, load_params
from codeworld.tokens import EOD_ID, ROLE_TOKENS, SPECIAL_TOKENS, TRACE_TOKENS
from model import checkpoint
from model.build import TrainingSetupError, resolve_precision
from model.generate import sample
from model.grpo import FP8_WIDTH, Sample, empty_microbatch, group_advantages, microbatches
from model.metrics import StepLog, memory_over_ranks, read_rows, tracking_run_id
from model.seeds import seed_of
from model.trainer import PolicyLoss, Trainer, finish_step, init_distributed, policy_nll, shutdown
from stages.rl_figures import add_step, run_totals

END_OF_TURN_ID = SPECIAL_TOKENS.index(ROLE_TOKENS[4])
FRAME_SEP_ID = SPECIAL_TOKENS.index(TRACE_TOKENS[1])
STOPS = {"output": {END_OF_TURN_ID, EOD_ID}, "next_frame": {FRAME_SEP_ID, EOD_ID},
         "agent": {END_OF_TURN_ID, EOD_ID}}


def check_rl_layout(params: Params) -> None:
    par = params.parallel
    if (par.tensor, par.pipeline, par.context) != (1, 1, 1) or par.virtual_pipeline:
        raise TrainingSetupError(
            f"rl samples from each process's whole model: it needs parallel.tensor = pipeline = "
            f"context = 1 and no virtual_pipeline (got tensor={par.tensor}, pipeline="
            f"{par.pipeline}, context={par.context}, virtual_pipeline={par.virtual_pipeline}); "
            f"use data parallel (parallel.nproc) for rl")


def allocate(n: int, weights: dict[str, float]) -> dict[str, int]:
    """n prompts shared by weight (largest remainder; ties in the order given)."""
    total = sum(weights.values())
    exact = {k: n * w / total for k, w in weights.items()}
    counts = {k: int(v) for k, v in exact.items()}
    order = sorted(weights, key=lambda k: -(exact[k] - counts[k]))
    for k in order[:n - sum(counts.values())]:
        counts[k] += 1
    return counts


def step_plan(cfg: RLConfig, pool: dict[str, list[dict]], step: int) -> list[dict]:
    """The prompts of step `step` (1-based): each kind's pool taken in turn. The run's prompts
    up to this step are shared by weight (allocate on the running total), and this step gets
    the difference: a kind with under half a prompt a step still comes every few steps, where
    rounding each step alone never gave it one. (With KINDS' two kinds the running shares
    never shrink, so the differences are counts.)"""
    from stages.rl_tasks import KINDS

    weights = {k: cfg.tasks[k] for k in KINDS if cfg.tasks.get(k, 0) > 0 and pool.get(k)}
    n = cfg.prompts_per_step
    before, upto = allocate((step - 1) * n, weights), allocate(step * n, weights)
    plan = []
    for kind in upto:
        items = pool[kind]
        plan += [items[(before[kind] + j) % len(items)] for j in range(upto[kind] - before[kind])]
    return plan


def agent_task(cfg: RLConfig, pool: dict[str, list[dict]], step: int) -> dict | None:
    if not cfg.agent_interval or step % cfg.agent_interval or not pool.get("agent"):
        return None
    items = pool["agent"]
    return items[(step // cfg.agent_interval - 1) % len(items)]


class Rollouts:
    """Sampling and scoring on this rank, with its own chunk as the policy."""

    def __init__(self, params: Params, model, tok, vocab_size: int):
        self.params, self.cfg, self.model, self.tok, self.vocab = params, params.rl, model, tok, vocab_size

    def generate(self, prompt: list[int], *, n: int, max_new: int, stops: set[int], seed: int):
        return sample(self.model, prompt, vocab_size=self.vocab, n=n, max_new_tokens=max_new,
                      stop_ids=stops, temperature=self.cfg.temperature, seed=seed)

    def text_group(self, index: int, item: dict, step: int) -> dict:
        from stages.rl_tasks import reward

        prompt = self.tok.encode(item["prompt"]).ids
        outs = self.generate(prompt, n=self.cfg.group_size, max_new=self.cfg.max_new_tokens,
                             stops=STOPS[item["kind"]],
                             seed=seed_of(self.cfg.seed, step, f"text:{index}"))
        rewards = [reward(item, self.tok, o) for o in outs]
        return {"index": index, "kind": item["kind"], "id": item["id"], "prompt": prompt,
                "completions": outs, "rewards": rewards,
                "finished": [bool(o) and o[-1] in STOPS[item["kind"]] for o in outs]}

    def agent_episode(self, item: dict, episode: int, step: int) -> dict:
        from codeworld.sandbox import SandboxUnavailable
        from stages.agent import REPO_CACHE
        from stages.agent.envs import build_env
        from stages.agent.loop import run_episode
        from stages.agent.policies import ModelPolicy

        task, cfg, acfg = item["task"], self.cfg, self.params.agent
        base = seed_of(cfg.seed, step, f"agent:{episode}")
        policy = ModelPolicy(
            lambda prompt, turn: self.generate(prompt, n=1, max_new=cfg.agent_max_new_tokens,
                                               stops=STOPS["agent"], seed=base + turn)[0],
            self.tok, max_context=cfg.agent_seq_length, max_new_tokens=cfg.agent_max_new_tokens)
        try:
            repo = next(r for r in acfg.repositories if r.name == task["repo"])
            env = build_env(repo, REPO_CACHE)
            ep = run_episode(task, env, policy, max_turns=cfg.agent_max_turns,
                             max_tokens=acfg.max_tokens,
                             observation_chars=cfg.agent_observation_chars,
                             tool_wall_seconds=acfg.tool_wall_seconds,
                             test_wall_seconds=acfg.test_wall_seconds,
                             max_workdir_mb=acfg.max_workdir_mb)
        except SandboxUnavailable:
            raise
        except Exception as err:   # one broken episode is counted, never fatal
            return {"episode": episode, "broken": f"{type(err).__name__}: {err}"[:300]}
        return {"episode": episode, "reward": float(ep["reward"]), "turns": policy.turns,
                "submitted": ep["submitted"], "stop_reason": ep["stop_reason"]}


def gather(obj: list) -> list:
    """Every rank's list, concatenated (ranks in order)."""
    from megatron.core import parallel_state as ps

    group = ps.get_data_parallel_group()
    parts: list = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(parts, obj, group=group)
    return [x for part in parts for x in part]


def build_samples(groups: list[dict], episodes: list[dict], cfg: RLConfig) -> tuple[list[Sample], dict]:
    """The step's samples with their advantages (every rank computes the same list), and the
    step's reward statistics."""
    samples: list[Sample] = []
    advs: list[float] = []
    informative = 0
    for g in sorted(groups, key=lambda g: g["index"]):
        a = group_advantages(g["rewards"], cfg.advantage_eps)
        advs += a
        informative += any(a)
        if any(a) or cfg.kl_coef > 0:
            samples += [Sample(g["prompt"], c, x) for c, x in zip(g["completions"], a) if c]
    stats: dict = {}
    rewards = [r for g in groups for r in g["rewards"]]
    lengths = [len(c) for g in groups for c in g["completions"]]
    finished = [f for g in groups for f in g["finished"]]
    if rewards:
        stats.update(reward_mean=statistics.fmean(rewards),
                     success_rate=statistics.fmean(float(max(g["rewards"]) > 0) for g in groups),
                     completion_tokens_mean=statistics.fmean(lengths),
                     completion_tokens_max=max(lengths),
                     unfinished=statistics.fmean(0.0 if f else 1.0 for f in finished))
        for kind in sorted({g["kind"] for g in groups}):
            stats[f"reward_{kind}"] = statistics.fmean(
                r for g in groups if g["kind"] == kind for r in g["rewards"])
    ok = [e for e in sorted(episodes, key=lambda e: e["episode"]) if "broken" not in e]
    if episodes:
        stats.update(agent_episodes=len(ok), agent_broken=len(episodes) - len(ok))
        broken = [e["broken"] for e in sorted(episodes, key=lambda e: e["episode"]) if "broken" in e]
        if broken:   # counted, and why (the first one), in steps.jsonl and train.log
            stats["agent_broken_reason"] = broken[0]
    if ok:
        a = group_advantages([e["reward"] for e in ok], cfg.advantage_eps) if len(ok) > 1 \
            else [0.0]
        advs += a
        informative += any(a)
        stats.update(agent_reward_mean=statistics.fmean(e["reward"] for e in ok),
                     agent_submitted=statistics.fmean(float(e["submitted"]) for e in ok),
                     agent_turns_mean=statistics.fmean(len(e["turns"]) for e in ok))
        for e, x in zip(ok, a):
            if x or cfg.kl_coef > 0:
                samples += [Sample(p, c, x) for p, c in e["turns"] if c]
    stats["advantage_std"] = statistics.pstdev(advs) if advs else 0.0
    stats["informative_groups"] = informative
    stats["train_samples"] = len(samples)
    stats["train_tokens"] = sum(len(s.completion) for s in samples)
    return samples, stats


def recorded_tokenizer(out: Path) -> str:
    """The sha256 of the tokenizer the stage read once for this run (stages/rl.py: in its
    fingerprint, its pool and out/run.json's tokenizer_sha256, written before torchrun).
    TrainingSetupError naming the file when run.json is unreadable or records none."""
    from stages.train_phase import RUN

    try:
        sha = json.loads((out / RUN).read_text()).get("tokenizer_sha256")
    except (OSError, ValueError, AttributeError) as err:
        raise TrainingSetupError(f"{out / RUN}: unreadable ({type(err).__name__}: {err}); the "
                                 f"rl stage writes it before its ranks start: rerun it") from None
    if not isinstance(sha, str) or not sha:
        raise TrainingSetupError(f"{out / RUN}: records no tokenizer_sha256 (got {sha!r}); the "
                                 f"rl stage records the tokenizer its run uses: rerun it")
    return sha


def policy_trainer(params: Params, tokenizer_sha256: str | None = None):
    """(trainer, tokenizer, vocabulary size) of phase rl on this rank: the phase's Trainer with
    the policy-gradient loss. The process group is up (init_distributed). `tokenizer_sha256`:
    the one the stage recorded (recorded_tokenizer), so that every rank of the run uses the
    tokenizer its run.json and fingerprint name, or fails naming the file if it was replaced
    since; without it (bench/rl_step_check.py, no stage), the one the manifest names now."""
    from codeworld.storage import Storage
    from stages.tokenizer import load as load_tokenizer

    tok = load_tokenizer(Storage(params.storage.root, params.storage.s3_endpoint_url),
                         tokenizer_sha256)
    vocab = tok.get_vocab_size()
    trainer = Trainer(params, "rl", vocab)
    trainer.policy = PolicyLoss(vocab, params.rl.temperature, params.rl.kl_coef)
    return trainer, tok, vocab


def initial_policy(init_from: Path) -> tuple[int, Path]:
    """The latest checkpoint of the phase RL starts from (``checkpoint.latest``)."""
    start = checkpoint.latest(init_from)
    if start is None:
        raise FileNotFoundError(f"{init_from}: no checkpoint to start from")
    return start


def load_policy(trainer: Trainer, path: Path) -> None:
    """The weights at ``path`` into the trainer's model, and into its optimizer's FP32 main
    copies (a fresh optimizer state: RL's first step)."""
    checkpoint.load(path, trainer.chunks)
    trainer.optimizer.reload_model_params()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--pool", required=True, help="the task pool (stages/rl_tasks.py)")
    ap.add_argument("--out", required=True, help="checkpoint directory of this phase")
    ap.add_argument("--init-from", required=True, help="checkpoint directory of the initial policy")
    ap.add_argument("--steps-log", required=True, help="per-step metrics (JSON lines)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    if args.set:
        from codeworld.overrides import apply_overrides

        params = apply_overrides(params, args.set)
    if params.rl is None:
        raise TrainingSetupError(f"{args.params}: no rl section")
    cfg = params.rl
    check_rl_layout(params)
    resolve_precision(cfg)   # a precision this machine lacks fails before the process group
    out = Path(args.out)
    tokenizer_sha256 = recorded_tokenizer(out)   # so does a run.json without its tokenizer
    init_distributed(params.parallel.backend)
    from megatron.core import parallel_state as ps

    from stages.rl_tasks import read_pool

    trainer, tok, vocab = policy_trainer(params, tokenizer_sha256)
    iteration = 0
    start = initial_policy(Path(args.init_from))
    found = checkpoint.latest(out)
    if found is not None:
        iteration = checkpoint.load(found[1], trainer.chunks, trainer.optimizer, trainer.scheduler)
    else:
        load_policy(trainer, start[1])
    reference = None
    if cfg.kl_coef > 0:   # the initial policy, frozen
        from model.build import build_chunks
        from model.generate import _Wrapped

        reference = build_chunks(params.model, params.parallel, trainer.tcfg, trainer.precision,
                                 vocab, cfg.seq_length, cfg.seed)[0]
        checkpoint.load(start[1], [_Wrapped(reference)])
        reference.eval()

    pool = read_pool(Path(args.pool))
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    totals = resumed_totals(found, Path(args.steps_log))   # (before StepLog drops rows past it)
    log = StepLog(Path(args.steps_log), dp_rank == 0, resume_after=iteration,
                  run_id=tracking_run_id(Path(args.out)))
    roll = Rollouts(params, trainer.chunks[0].module, tok, vocab)   # samples without FP8
    width = FP8_WIDTH if trainer.precision.name == "fp8" else 1
    while iteration < cfg.steps:
        step = iteration + 1
        t0 = time.perf_counter()
        plan = step_plan(cfg, pool, step)
        mine = [roll.text_group(i, item, step) for i, item in enumerate(plan) if i % dp_size == dp_rank]
        task = agent_task(cfg, pool, step)
        eps = [roll.agent_episode(task, e, step) for e in range(cfg.agent_group_size)
               if e % dp_size == dp_rank] if task else []
        groups, episodes = gather(mine), gather(eps)
        samples, stats = build_samples(groups, episodes, cfg)
        t1 = time.perf_counter()
        if samples:
            batches = microbatches(samples[dp_rank::dp_size], cfg.micro_batch_size, width) \
                or [empty_microbatch(width)]
            if reference is not None:
                add_reference(reference, batches, vocab, cfg.temperature)
            row = trainer.train_step(batches)
            row["updated"] = 1 - row["skipped"]   # (a non-finite gradient skips the update)
        else:   # no group has signal: nothing to learn from this step's samples
            # (the lr logged is this step's, as train_step logs it, read before the schedule moves)
            row = {"loss": None, "grad_norm": None, "skipped": 0, "updated": 0, "lr": trainer.lr()}
            trainer.scheduler.step(increment=cfg.global_batch_size)
        iteration = step
        logged = iteration % cfg.log_interval == 0 or iteration == cfg.steps
        row = step_row(row, stats, step, t0, t1, logged)
        totals = add_step(totals, row)
        if task is not None:
            row["agent_task"] = task["id"]
        if logged:
            log.write({k: v for k, v in {**row, **totals}.items() if v is not None})
        finish_step(trainer, out, iteration, cfg.steps, cfg.save_interval, run_state=totals)
    shutdown(log)
    return 0


def resumed_totals(found: tuple[int, Path] | None, steps_log: Path) -> dict:
    """The run's totals (stages/rl_figures.TOTALS) at the checkpoint it resumes from: saved
    with it; for a checkpoint saved before they were, its log's rows up to it (every step's
    when each was logged, the default). {} for a run from its start."""
    if found is None:
        return {}
    saved = checkpoint.run_state(found[1])
    if saved is not None:
        return saved
    return run_totals([r for r in read_rows(steps_log) if r["step"] <= found[0]])


def step_row(row: dict, stats: dict, step: int, t0: float, t1: float, logged: bool) -> dict:
    """The step's metrics: the update's (`row`, train_step's or the no-update step's) and the
    rewards' (`stats`), with the step's times: `t0` its start, `t1` the end of sampling and
    scoring. step_seconds is the whole step, to now: sampling, scoring, gathering, batching and
    the update (train_step's own figure is the update's only), and sample_seconds +
    train_seconds add up to it. On a `logged` step the memory figures, the maximum over all
    ranks as the training phases log them: a collective, so every rank calls this with the
    same `logged`."""
    t2 = time.perf_counter()
    out = {k: v for k, v in row.items() if k != "step_seconds"}
    out.update(stats, step=step, sample_seconds=round(t1 - t0, 3),
               train_seconds=round(t2 - t1, 3), step_seconds=round(t2 - t0, 3))
    if logged:
        out.update(memory_over_ranks())
    return out


@torch.no_grad()
def add_reference(reference, batches: list[dict], vocab: int, temperature: float) -> None:
    device = next(reference.parameters()).device
    for b in batches:
        logits = reference(b["tokens"].to(device), b["position_ids"].to(device), None)
        b["ref_logprob"] = -policy_nll(logits, b["labels"].to(device), vocab, temperature).cpu()


if __name__ == "__main__":  # dist_checkpointing's writer processes re-import this module
    sys.exit(main())
