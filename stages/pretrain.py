"""Stage `pretrain`: the first training phase (the code corpus and traces, params `pretrain`)."""

from __future__ import annotations

from codeworld.config import Params
from stages.train_phase import CODE, run_phase  # noqa: F401  (CODE: the code of its outputs)


def run(params: Params, *, track: bool = True) -> dict:
    return run_phase(params, "pretrain", track=track)
