"""The training step of one rank, apart from the loop around it (model/train.py) so the
benchmark measures exactly what training runs: Megatron's DDP-wrapped GPT chunks, its
optimizer and LR schedule, and micro-batches through its forward-backward schedule."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from functools import partial

import torch

from codeworld.config import Params
from model.build import (build_chunks, flops_per_token, resolve_precision, transformer_config)


def init_distributed(backend: str) -> None:
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        from model import cpu_compat

        cpu_compat.enable()
    torch.distributed.init_process_group(backend=backend)


@dataclass(frozen=True)
class PolicyLoss:
    """How a micro-batch with an `advantage` tensor (RL, model/rl.py) is scored: per token
    -advantage x log-prob of the label under the sampling distribution (logits over the
    tokenizer's vocabulary, divided by the sampling temperature), plus kl_coef x the k3
    estimate of KL to the reference policy when the batch has `ref_logprob`."""
    vocab_size: int
    temperature: float = 1.0
    kl_coef: float = 0.0


def forward_step(cp: int, policy: PolicyLoss, data_iterator, model):
    from megatron.core.utils import get_batch_on_this_cp_rank

    batch = next(data_iterator)
    if torch.cuda.is_available():
        batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
    if "advantage" in batch:
        # Megatron's fused cross-entropy sees the padded vocabulary at temperature 1; the
        # policy sampled from the real vocabulary at its temperature, so score exactly that.
        # (RL runs with tensor parallel 1: the logits are whole, not vocabulary shards.)
        logits = model(batch["tokens"], batch["position_ids"], None)
        output = policy_nll(logits, batch["labels"], policy.vocab_size, policy.temperature)
        return output, partial(policy_loss_func, batch["loss_mask"], batch["advantage"],
                               batch.get("ref_logprob"), policy.kl_coef)
    if cp > 1:
        batch = get_batch_on_this_cp_rank(batch)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def policy_nll(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
               temperature: float) -> torch.Tensor:
    """[batch, seq] -log p(label) under softmax(logits[:vocab_size] / temperature): the
    distribution model/generate.py samples from."""
    logp = torch.log_softmax(logits[..., :vocab_size].float() / temperature, dim=-1)
    return -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def policy_loss_func(loss_mask: torch.Tensor, advantage: torch.Tensor,
                     ref_logprob: torch.Tensor | None, kl_coef: float, output: torch.Tensor):
    """GRPO's token-level policy-gradient loss (DAPO's normalisation: the sum over completion
    tokens, divided by their count over the global batch, as loss_func does). One update per
    batch of samples: the PPO ratio is 1 where it is taken, so -A x log-prob has the clipped
    objective's gradient and no ratio or clip is computed."""
    mask = loss_mask.reshape(-1).float()
    nll = output.float().reshape(-1)
    per_token = advantage.reshape(-1).float() * nll
    if ref_logprob is not None and kl_coef > 0:
        delta = ref_logprob.reshape(-1).float() + nll     # log ref - log pi
        # zeroed out of the mask before exp: a prompt or pad label the policy finds 89+ nats
        # less likely than the reference overflows exp to inf, and inf x 0 (the mask, or
        # torch.where's unused branch in backward) is a NaN loss and gradient
        delta = torch.where(mask > 0, delta, torch.zeros_like(delta))
        per_token = per_token + kl_coef * (torch.exp(delta) - delta - 1)
    loss = torch.sum(per_token * mask)
    tokens = mask.sum().to(torch.int)
    report = torch.stack([loss.clone().detach(), tokens.clone().detach().float()])
    return loss, tokens, {"lm loss": report}


def loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(output.float().reshape(-1) * mask)
    tokens = mask.sum().to(torch.int)
    # clone: the schedule divides reported tensors in place
    report = torch.stack([loss.clone().detach(), tokens.clone().detach().float()])
    return loss, tokens, {"lm loss": report}


class Trainer:
    """Model chunks, optimizer and scheduler of this rank for one phase."""

    def __init__(self, params: Params, phase: str, vocab_size: int, total_steps: int | None = None):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import (DistributedDataParallel,
                                               DistributedDataParallelConfig)
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.params, self.phase_name = params, phase
        self.cfg = cfg = getattr(params, phase)
        par, mcfg = params.parallel, params.model
        self.precision = resolve_precision(cfg)
        # rl has no cuda_graph: it samples with the model it trains, at other shapes. (Whether
        # this machine can graph is checked by the entry points, before any process group.)
        graph = getattr(cfg, "cuda_graph", "none")
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(
                tensor_model_parallel_size=par.tensor, pipeline_model_parallel_size=par.pipeline,
                virtual_pipeline_model_parallel_size=par.virtual_pipeline,
                context_parallel_size=par.context)
        self.tcfg = transformer_config(mcfg, par, cfg, self.precision, graph)
        self.vocab_size = vocab_size
        # the same initial weights from the same seed on every layout (model/initial_weights.py)
        chunks = build_chunks(mcfg, par, self.tcfg, self.precision, vocab_size, cfg.seq_length,
                              cfg.seed)
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=par.distributed_optimizer,
            # the check reads each bucket's norm on the host: a captured step cannot
            check_for_nan_in_grad=graph != "full_iteration")
        self.chunks = [DistributedDataParallel(self.tcfg, ddp_cfg, c) for c in chunks]
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, clip_grad=cfg.clip_grad,
            bf16=self.precision.name != "fp32", params_dtype=self.precision.params_dtype,
            use_distributed_optimizer=par.distributed_optimizer), self.chunks)
        steps = total_steps or cfg.steps
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr,
            lr_warmup_steps=cfg.warmup_steps * cfg.global_batch_size,
            lr_decay_steps=steps * cfg.global_batch_size, lr_decay_style="cosine",
            start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=1,
            wd_incr_style="constant")
        self.tcfg.finalize_model_grads_func = finalize_grads
        self.tcfg.grad_scale_func = self.optimizer.scale_loss
        self._fwd_bwd = get_forward_backward_func()
        if graph == "full_iteration":
            from megatron.core.full_cuda_graph import FullCudaGraphWrapper

            # eager for the first warm-up steps, then captured once (train and evaluation
            # apart) and replayed; the micro-batches are copied into its static buffers.
            # Megatron keeps graphs, step counts and buffers in class state: one graphed
            # Trainer per process, as every caller here (model/train.py, the benchmark) makes.
            self._fwd_bwd = FullCudaGraphWrapper(
                self._fwd_bwd, cuda_graph_warmup_steps=self.tcfg.cuda_graph_warmup_steps)
        # RL (model/rl.py) sets its temperature and KL coefficient here
        self.policy = PolicyLoss(vocab_size)
        self.flops_per_token = flops_per_token(mcfg, vocab_size, cfg.seq_length)

    def run_batches(self, batches: list[dict], forward_only: bool) -> list[dict]:
        iters = [iter(batches) for _ in self.chunks]   # each virtual stage consumes its own
        one = len(self.chunks) == 1
        return self._fwd_bwd(
            forward_step_func=partial(forward_step, self.params.parallel.context, self.policy),
            data_iterator=iters[0] if one else iters,
            model=self.chunks[0] if one else self.chunks, num_microbatches=len(batches),
            seq_length=self.cfg.seq_length, micro_batch_size=self.cfg.micro_batch_size,
            forward_only=forward_only)

    def train_step(self, batches: list[dict]) -> dict:
        t0 = time.perf_counter()
        for c in self.chunks:
            c.train()
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self.run_batches(batches, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        lr = self.lr()   # the one this update used: the scheduler's step sets the next one
        self.scheduler.step(increment=self.cfg.global_batch_size)
        loss = reduce_loss(losses)
        return {"loss": loss, "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "skipped": int(not ok), "step_seconds": time.perf_counter() - t0}

    def lr(self) -> float:
        """The learning rate the optimizer's next update uses (what the scheduler set last)."""
        return self.scheduler.get_lr(self.optimizer.param_groups[0])

    @torch.no_grad()
    def evaluate(self, batches_list: list[list[dict]]) -> float | None:
        """The loss per token over all the batches, as training's: a mean of each batch's mean
        weighed a batch of few loss tokens (SFT: long prompts) as much as a full one."""
        for c in self.chunks:
            c.eval()
        losses = [entry for b in batches_list for entry in self.run_batches(b, forward_only=True)]
        return reduce_loss(losses)


def finalize_grads(model: list, num_tokens: torch.Tensor | None, pg_collection=None,
                   force_all_reduce: bool = False) -> None:
    """Megatron's finalize_model_grads (data-parallel gradient all-reduce, shared embedding and
    sequence-parallel norm reductions), then the division by the global batch's loss-token
    count, done on the device: Megatron's own division first asks `num_tokens > 0` on the
    host, which a CUDA-graph capture cannot do. The same operations otherwise; a batch with
    no loss token has zero gradients, which a divisor of 1 leaves as they are."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel.utils import get_pp_last_rank

    finalize_model_grads(model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce)
    if num_tokens is None:
        return
    if pg_collection is not None:
        pp, dp_cp = pg_collection.pp, pg_collection.dp_cp
    else:
        pp, dp_cp = ps.get_pipeline_model_parallel_group(), ps.get_data_parallel_group(with_context_parallel=True)
    # the count exists on the last pipeline stage: every stage needs it, then every DP rank's
    torch.distributed.broadcast(num_tokens, src=get_pp_last_rank(pp), group=pp)
    torch.distributed.all_reduce(num_tokens, group=dp_cp)
    scaling = 1.0 / num_tokens.clamp(min=1)
    for chunk in model:
        chunk.scale_gradients(scaling)


def reduce_loss(losses: list[dict]) -> float | None:
    """Mean loss per token over the global batch (None on ranks without the last stage)."""
    from megatron.core import parallel_state as ps

    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    total = torch.zeros(2, dtype=torch.float64)
    for entry in losses:
        total += entry["lm loss"].double().cpu()
    if torch.cuda.is_available():
        total = total.cuda()
    torch.distributed.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    return float(total[0] / total[1].clamp(min=1))


KILL_AFTER = "CODEWORLD_FAULT_KILL_AFTER_STEP"  # SIGKILL this rank after that step (tests)


def finish_step(trainer: Trainer, out, iteration: int, steps: int, save_interval: int,
                run_state: dict | None = None) -> None:
    """After a step of any phase: checkpoint on the interval and at the end (with the phase's
    `run_state`, checkpoint.RUN_STATE), then the fault injection the resume tests use."""
    from model import checkpoint

    if iteration % save_interval == 0 or iteration == steps:
        checkpoint.save(out, iteration, trainer.chunks, trainer.optimizer, trainer.scheduler,
                        run_state=run_state)
    if os.environ.get(KILL_AFTER) == str(iteration):
        os.kill(os.getpid(), signal.SIGKILL)


def shutdown(log) -> None:
    """Close the step log and leave the process groups together."""
    from megatron.core import parallel_state as ps

    log.close()
    torch.distributed.barrier()
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()
