"""Program generation over several processes, results in corpus order.

Both passes are pure functions of their inputs, so any process can do any part:

* the harvest (``harvest_corpus``, the bulk of the work: it parses the whole corpus), one job
  per group of records (a dataset shard), merged in order by ``merge_harvest`` -- the same
  result as one pass, since a name keeps its first distinct argument lists in corpus order
  either way;
* the programs (``module_programs``), in chunks of modules, the harvest sent once to each
  worker (the pool's initializer).

Results are taken back in submission order, never completion order, and lazily, with a bounded
lookahead (``LOOKAHEAD`` jobs per worker in flight): the stage stops after ``max_programs``
cases, usually a fraction of the corpus, and must not pay for the rest. Processes are spawned,
not forked (the parent may hold threads or an open MLflow/sqlite connection); the workers import
this package only (``stages.programs``: the standard library), so a spawn costs little.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor

CHUNK = 32  # modules per job: a few hundred ms of work, against a few ms of pickling
LOOKAHEAD = 2

_STATE: dict = {}  # in a worker: the harvest and the generation settings


def _pool(workers: int, initializer=None, initargs=()) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                               initializer=initializer, initargs=initargs)


def _ordered(pool: ProcessPoolExecutor, fn: Callable, jobs: Iterable, workers: int) -> Iterator:
    """``fn(job)`` for each job, in order, at most ``LOOKAHEAD * workers`` jobs ahead of the
    consumer. Closing the generator early cancels what is queued and shuts the pool down."""
    jobs = iter(jobs)
    pending: deque = deque()
    try:
        for job in itertools.islice(jobs, LOOKAHEAD * workers):
            pending.append(pool.submit(fn, job))
        while pending:
            result = pending.popleft().result()
            for job in itertools.islice(jobs, 1):
                pending.append(pool.submit(fn, job))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _harvest(records: list[dict]) -> dict[str, list[str]]:
    from .harvest import harvest_corpus

    return harvest_corpus(records)


def parallel_harvest(groups: Iterable[list[dict]], workers: int) -> dict[str, list[str]]:
    """``harvest_corpus`` of the concatenated ``groups`` (e.g. the shards of a dataset, read by
    the caller), one job per group on ``workers`` processes."""
    from .harvest import harvest_corpus, merge_harvest

    if workers <= 1:
        return harvest_corpus(r for group in groups for r in group)
    out: dict[str, list[str]] = {}
    for part in _ordered(_pool(workers), _harvest, groups, workers):
        merge_harvest(out, part)
    return out


def _init(harvested: dict[str, list[str]], caps: dict) -> None:
    _STATE["harvested"], _STATE["caps"] = harvested, caps


def _chunk(records: list[dict]) -> list:
    from .driver import module_programs

    return [module_programs(rec, harvested=_STATE["harvested"], **_STATE["caps"])
            for rec in records]


def _chunks(records: Iterable[dict], size: int) -> Iterator[list[dict]]:
    it = iter(records)
    while batch := list(itertools.islice(it, size)):
        yield batch


def parallel_modules(records: Iterable[dict], harvested: dict[str, list[str]], caps: dict,
                     workers: int, chunk: int = CHUNK) -> Iterator[tuple]:
    """``module_programs(rec, harvested=harvested, **caps)`` for each record, in order,
    computed by ``workers`` processes."""
    pool = _pool(workers, _init, (harvested, caps))
    for results in _ordered(pool, _chunk, _chunks(records, chunk), workers):
        yield from results
