"""Running one function over independent jobs in worker processes, results in job order."""

from __future__ import annotations

import multiprocessing as mp
from typing import Callable, Sequence, TypeVar

from codeworld.progress import progress

J = TypeVar("J")
R = TypeVar("R")


def pool_map(fn: Callable[[J], R], jobs: Sequence[J], workers: int, label: str) -> list[R]:
    """`[fn(j) for j in jobs]`, in `workers` spawned processes when there is more than one job
    (spawn, not fork: the parent may hold threads or an open MLflow/sqlite connection)."""
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            return list(progress(pool.imap(fn, jobs), len(jobs), label))
    return [fn(j) for j in progress(jobs, len(jobs), label)]
