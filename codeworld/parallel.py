"""Running one function over independent jobs, results in job order: in this machine's
processes (the default), or on an existing Dask cluster when params.yaml's `executor.kind` is
`dask` (codeworld/executor.py). The corpus, dedup and traces stages fan out only through here."""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Callable, Iterator, Sequence, TypeVar

from codeworld.config import StageFailed
from codeworld.progress import progress

if TYPE_CHECKING:
    from codeworld.config import ExecutorConfig
    from codeworld.executor import Witness
    from codeworld.storage import Storage

J = TypeVar("J")
R = TypeVar("R")


class WorkerDied(StageFailed):
    """A local worker process died mid-job (killed by a signal: the OOM killer, a kill -9).
    The message names the jobs it took down; the jobs finished before it keep their work."""


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
        return _process_map(fn, jobs, min(workers, len(jobs)), label, name)
    return [fn(j) for j in progress(jobs, len(jobs), label)]


def _process_map(fn: Callable[[J], R], jobs: Sequence[J], workers: int, label: str,
                 name: Callable[[J], str] | None) -> list[R]:
    # concurrent.futures, not multiprocessing.Pool: a Pool replaces a worker killed mid-job
    # and waits forever for that job's result; the executor fails every job in flight with
    # BrokenProcessPool instead.
    results: list = [None] * len(jobs)
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        for i, result in progress(_as_finished(pool, fn, jobs, workers, label, name),
                                  len(jobs), label):
            results[i] = result
    return results


def _as_finished(pool: ProcessPoolExecutor, fn: Callable[[J], R], jobs: Sequence[J], limit: int,
                 label: str, name: Callable[[J], str] | None) -> Iterator[tuple[int, R]]:
    """(index, result) of each job as it finishes. At most `limit` jobs are submitted at a
    time (one per worker), so the jobs in flight when a worker dies are the ones running."""
    queued = iter(enumerate(jobs))
    running: dict[Future, int] = {}

    def submit_next() -> None:
        for i, job in queued:
            running[pool.submit(fn, job)] = i
            return

    for _ in range(limit):
        submit_next()
    while running:
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        if any(isinstance(f.exception(), BrokenProcessPool) for f in done):
            raise _worker_died(running, jobs, label, name)
        for fut in sorted(done, key=running.get):
            i = running.pop(fut)
            yield i, fut.result()   # a job's own exception is raised here, as it was raised
            submit_next()


def _worker_died(running: dict[Future, int], jobs: Sequence[J], label: str,
                 name: Callable[[J], str] | None) -> WorkerDied:
    # A broken pool fails every job in flight at once: wait for all, then name those lost.
    wait(running, return_when=ALL_COMPLETED)
    lost = sorted(i for f, i in running.items() if isinstance(f.exception(), BrokenProcessPool))
    names = ", ".join(name(jobs[i]) if name else f"job {i}" for i in lost)
    return WorkerDied(
        f"{label}: a worker process died (killed by a signal, e.g. by the OOM killer when "
        f"memory ran out) while running {names}; those jobs are lost, the jobs finished before "
        "are kept: rerun to resume (with fewer workers if memory ran out)")
