"""Running one function over independent jobs, results in job order: in this machine's
processes (the default), or on an existing Dask cluster when params.yaml's `executor.kind` is
`dask` (codeworld/executor.py). The corpus, dedup and traces stages fan out only through here."""

from __future__ import annotations

import multiprocessing as mp
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar

from codeworld.progress import progress

if TYPE_CHECKING:
    from codeworld.config import ExecutorConfig
    from codeworld.executor import Witness
    from codeworld.storage import Storage

J = TypeVar("J")
R = TypeVar("R")


def pool_map(fn: Callable[[J], R], jobs: Sequence[J], workers: int, label: str,
             executor: "ExecutorConfig | None" = None, *, name: Callable[[J], str] | None = None,
             storage: "Storage | None" = None, witnesses: "Sequence[Witness]" = ()) -> list[R]:
    """`[fn(j) for j in jobs]`. Locally: in `workers` spawned processes when there is more than
    one job (spawn, not fork: the parent may hold threads or an open MLflow/sqlite connection).
    With a dask executor: one task per job on the cluster (`workers` is then the cluster's
    business); `name` names a job in errors, `storage` and `witnesses` are what every worker
    must see as this machine does (see codeworld.executor.dask_map)."""
    if executor is not None and executor.kind == "dask":
        from codeworld.executor import dask_map

        return dask_map(fn, jobs, executor, label, name=name, storage=storage, witnesses=witnesses)
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            return list(progress(pool.imap(fn, jobs), len(jobs), label))
    return [fn(j) for j in progress(jobs, len(jobs), label)]
