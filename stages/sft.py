"""Stage `sft`: supervised fine-tuning from midtrain's final checkpoint (params `sft`): trace
prediction, output prediction and agent turns in the prompts of codeworld/prompts.py, the loss
on the answers only (the pack stage's sft_* formats)."""

from __future__ import annotations

from codeworld.config import Params
from stages.train_phase import CODE, run_phase  # noqa: F401  (CODE: the code of its outputs)


def run(params: Params, *, track: bool = True, metrics_path: str | None = "default",
        plot_path: str | None = "default") -> dict:
    return run_phase(params, "sft", track=track, metrics_path=metrics_path, plot_path=plot_path)
