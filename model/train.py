"""One training phase on this rank: `torchrun ... -m model.train --phase pretrain ...`.

Layout (tensor, pipeline, virtual pipeline, context, data parallel, sequence parallel, the
distributed optimizer) comes from params.yaml's `parallel`, the schedule from the phase's
section. The loss is summed over loss-masked tokens and divided by their count over the
global batch. Checkpoints every `save_interval` steps; a rerun resumes from the latest one and
continues bit for bit (the data position is a function of the iteration).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from codeworld.config import load_params
from codeworld.pack_cache import materialise
from model import checkpoint
from model.build import check_machine
from model.data import MicroBatches, build_datasets, plan_validation
from model.metrics import StepLog, memory_over_ranks, peak_flops, tracking_run_id
from model.trainer import Trainer, finish_step, init_distributed, shutdown


def timed_step(trainer: Trainer, data: MicroBatches, cfg, world: int, peak: float | None) -> dict:
    """One step on this rank, with its throughput figures (tokens/s over the global batch,
    TFLOP/s per GPU over `world` processes, MFU against `peak`). step_seconds is the whole
    step: reading and collating this rank's micro-batches of the global batch, then the update
    (train_step's own figure is the update's only), and the figures are per step_seconds."""
    t0 = time.perf_counter()
    row = trainer.train_step(list(data.next_global_batch()))
    seconds = time.perf_counter() - t0
    tps = cfg.global_batch_size * cfg.seq_length / seconds
    flops = trainer.flops_per_token * tps / world
    row.update(tokens_per_s=round(tps, 1), tflops_per_gpu=round(flops / 1e12, 4),
               step_seconds=round(seconds, 4))
    if peak:
        row["mfu"] = round(flops / peak, 4)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--phase", default="pretrain")
    ap.add_argument("--pack", required=True, help="directory of the pack stage's datasets")
    ap.add_argument("--out", required=True, help="checkpoint directory of this phase")
    ap.add_argument("--init-from", help="checkpoint directory of the phase this one starts from")
    ap.add_argument("--steps-log", required=True, help="per-step metrics (JSON lines)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON",
                    help="override a parameter (tests and benchmarks)")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    if args.set:
        from codeworld.overrides import apply_overrides

        params = apply_overrides(params, args.set)
    cfg = getattr(params, args.phase)
    check_machine(params, args.phase)   # before any process group: what this machine lacks
    # With an S3 storage root, --pack is this node's cache: the pack is fetched into it and
    # verified (one local rank downloads, the others wait on its lock) before Megatron maps it.
    materialise(params.storage, Path(args.pack))
    pack_dir = Path(args.pack)
    pack = json.loads((pack_dir / "manifest.json").read_text())
    evals = cfg.steps // cfg.eval_interval + 1
    # Before the process group: each node builds the indices its ranks read into its own
    # cache (Megatron would build them on global rank 0 only; see ensure_index_cache).
    train_ds, valid_ds = build_datasets(
        pack_dir, cfg.blend, cfg.seq_length, cfg.seed, cfg.steps * cfg.global_batch_size,
        cfg.eval_iters * evals * cfg.global_batch_size, pack["vocab_size"],
        # Megatron names its cached indices by paths and params, not file contents: one cache
        # per pack fingerprint, so a repacked source never reuses stale indices.
        pack_dir.parent / ".work" / "megatron-index" / pack["fingerprint"][:16],
        blend_unit=cfg.blend_unit)
    init_distributed(params.parallel.backend)
    from megatron.core import parallel_state as ps

    trainer = Trainer(params, args.phase, pack["vocab_size"])
    out = Path(args.out)
    iteration = 0
    found = checkpoint.latest(out)
    if found is not None:
        iteration = checkpoint.load(found[1], trainer.chunks, trainer.optimizer, trainer.scheduler)
    elif args.init_from:
        # A new phase: the parent's weights, this phase's fresh optimizer and LR schedule.
        start = checkpoint.latest(Path(args.init_from))
        if start is None:
            raise FileNotFoundError(f"{args.init_from}: no checkpoint to start from")
        checkpoint.load(start[1], trainer.chunks)
        # An optimizer with its own main (fp32) copies of the weights made them at init:
        # copy the loaded weights into them (a no-op for plain fp32).
        trainer.optimizer.reload_model_params()
        if torch.distributed.get_rank() == 0:
            print(f"init from {start[1]} (iteration {start[0]})", flush=True)

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    # the split build_datasets made, from the same document counts
    train_only = plan_validation({n: pack["sources"][n]["documents"] for n in cfg.blend})[1]
    if train_only and torch.distributed.get_rank() == 0:
        print(f"trained on but not validated (too few documents for a validation split): "
              f"{', '.join(train_only)}", flush=True)
    data = MicroBatches(train_ds, cfg.global_batch_size, cfg.micro_batch_size, dp_rank, dp_size,
                        start_iteration=iteration)
    logging_rank = (ps.is_pipeline_last_stage(ignore_virtual=True) and dp_rank == 0
                    and ps.get_tensor_model_parallel_rank() == 0
                    and ps.get_context_parallel_rank() == 0)
    log = StepLog(Path(args.steps_log), logging_rank, resume_after=iteration,
                  run_id=tracking_run_id(Path(args.out)))
    world = torch.distributed.get_world_size()
    peak = peak_flops(trainer.precision.name)
    while iteration < cfg.steps:
        row = timed_step(trainer, data, cfg, world, peak)
        iteration += 1
        row["step"] = iteration
        if iteration % cfg.eval_interval == 0 or iteration == cfg.steps:
            valid = MicroBatches(valid_ds, cfg.global_batch_size, cfg.micro_batch_size,
                                 dp_rank, dp_size)
            loss = trainer.evaluate([list(valid.next_global_batch()) for _ in range(cfg.eval_iters)])
            if loss is not None:
                row["valid_loss"] = loss
        if iteration % cfg.log_interval == 0 or iteration == cfg.steps:
            row.update(memory_over_ranks())   # a collective: every rank, logged steps only
            log.write(row)
        finish_step(trainer, out, iteration, cfg.steps, cfg.save_interval)
    shutdown(log)
    return 0


if __name__ == "__main__":  # dist_checkpointing's writer processes re-import this module
    sys.exit(main())
