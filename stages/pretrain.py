"""Stage `pretrain`: the first training phase (the code corpus and traces, params `pretrain`)."""

from __future__ import annotations

from codeworld.config import Params
from stages.train_phase import CODE, run_phase  # noqa: F401  (CODE: the code of its outputs)


def run(params: Params, *, track: bool = True, metrics_path: str | None = "default",
        plot_path: str | None = "default") -> dict:
    return run_phase(params, "pretrain", track=track, metrics_path=metrics_path, plot_path=plot_path)
