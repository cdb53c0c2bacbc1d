"""One GRPO update made of model.rl's own parts, forced to train, in the phase's precision: RL's
FP8 path on a GPU (the `rl` lines of bench/gpu_check.sh), which no CPU run can take.

    torchrun --standalone --nproc-per-node=1 bench/rl_step_check.py --params params.yaml \
        --pool data/checkpoints/rl/pool.jsonl --init-from DIR [--set rl.precision=fp8] [--unpadded]

RL samples with the model it trains. In FP8 that model's GEMMs need aligned row counts, and
decoding feeds rows of n tokens: model.rl samples without FP8 (model/generate.fp8_off) and pads
its training rows to multiples of model/grpo.FP8_WIDTH. Here: the first step's prompts are
sampled for real with the model set up for the precision, their completions get advantages of
+1 and -1 in turn (a tiny model's rewards are mostly 0, and a group whose rewards are all equal
would not train) and one optimizer step is taken on rows padded as model.rl pads them.
--unpadded then tries one more step on rows of any width: in FP8 it should fail TE's alignment
check, which is why the padding is there. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codeworld.config import load_params  # noqa: E402
from codeworld.overrides import apply_overrides  # noqa: E402
from model.grpo import FP8_WIDTH, Sample, microbatches  # noqa: E402
from model.rl import (Rollouts, check_rl_layout, initial_policy, load_policy,  # noqa: E402
                      policy_trainer, step_plan)
from model.trainer import init_distributed  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--pool", required=True)
    ap.add_argument("--init-from", required=True, help="a checkpoint directory (any phase)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON")
    ap.add_argument("--unpadded", action="store_true")
    args = ap.parse_args()
    params = apply_overrides(load_params(args.params), args.set)
    cfg = params.rl
    check_rl_layout(params)
    init_distributed(params.parallel.backend)
    import torch

    from stages.rl_tasks import read_pool

    trainer, tok, vocab = policy_trainer(params)
    load_policy(trainer, initial_policy(Path(args.init_from))[1])
    roll = Rollouts(params, trainer.chunks[0].module, tok, vocab)
    groups = [roll.text_group(i, item, 1) for i, item in enumerate(step_plan(cfg, read_pool(Path(args.pool)), 1))]
    samples = [Sample(g["prompt"], c, 1.0 if j % 2 == 0 else -1.0)
               for g in groups for j, c in enumerate(g["completions"]) if c]
    fp8 = trainer.precision.name == "fp8"
    out = {"precision": trainer.precision.name, "samples": len(samples),
           "completion_tokens": sum(len(s.completion) for s in samples)}
    batches = microbatches(samples, cfg.micro_batch_size, FP8_WIDTH if fp8 else 1)
    out["width"] = [b["tokens"].shape[1] for b in batches]
    row = trainer.train_step(batches)
    out["padded"] = {k: row[k] for k in ("loss", "grad_norm", "skipped")}
    out["finite"] = row["loss"] is not None and bool(torch.isfinite(torch.tensor(row["loss"])))
    if args.unpadded:
        try:
            row = trainer.train_step(microbatches(samples, cfg.micro_batch_size))
            out["unpadded"] = {k: row[k] for k in ("loss", "grad_norm", "skipped")}
        except Exception as err:   # the failure is the finding
            out["unpadded"] = {"error": f"{type(err).__name__}: {err}"[:400]}
    print("RL_STEP " + json.dumps(out), flush=True)
    torch.distributed.destroy_process_group()
    return 0 if out["finite"] and not out["padded"]["skipped"] else 1


if __name__ == "__main__":
    sys.exit(main())
