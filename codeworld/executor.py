"""Fanning a stage's independent jobs out to an existing Dask cluster (`executor.kind: dask`).

`codeworld.parallel.pool_map` calls `dask_map` when params.yaml's `executor` section says so;
the default (`kind: local`) never imports this module's Dask side.

Why a plain `distributed.Client`, not a Prefect sub-flow on `DaskTaskRunner(address=...)`: a
stage is a `codeworld stage NAME` subprocess of `dvc repro`, which the pipeline flow already
runs as one Prefect task. A sub-flow per fan-out would create flow and task runs through the
Prefect API for every job -- the API must then be reachable from every Dask worker machine,
and without a configured server each stage process would start Prefect's temporary one -- and
would add a state round-trip per job, for nothing the Client does not give directly: the
DaskTaskRunner is itself a Client on the same scheduler. What we need from the cluster is a
map with retries, results in job order and the worker of each job, which is this module.

What makes a cluster run give the same bytes as an in-process one:
* results are put back in job order (jobs complete in any order);
* every job checks, on its worker, that the worker runs the same code and interpreter as this
  machine (`environment`) and sees the same inputs (`Witness`: the storage root through a
  probe file written here, one input file per local corpus source): a worker on a machine with
  another checkout, a private disk or a relative storage root that resolves elsewhere fails
  with a message naming the worker and what differs, instead of writing shards nobody reads or
  counting files it cannot see as unreadable;
* a failed job is rerun `executor.retries` times (a worker that dies mid-job is replaced by the
  scheduler on its own); a job that still fails stops the map, naming the job and the worker.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
import re
import socket
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from codeworld.code import ROOT, hash_files
from codeworld.config import ConfigError, ExecutorConfig
from codeworld.progress import progress
from codeworld.storage import Storage

log = logging.getLogger(__name__)

J = TypeVar("J")
R = TypeVar("R")

CODE_PACKAGES = ("codeworld", "stages")  # what a data-stage job runs; training code is not sent
PROBE_DIR = ".work/executor"


class ExecutorUnreachable(ConnectionError):
    """No scheduler (or no worker) at executor.address. A ConnectionError: the CLI exits with
    its transient code, so the flow retries the stage (a cluster may still be starting)."""


class WorkerMismatch(ConfigError):
    """A worker runs other code or sees other inputs than this machine: its results could
    differ from an in-process run, so it is refused."""


@dataclass(frozen=True)
class Witness:
    """Something every worker must read exactly as this machine does: `read()` gives bytes
    (it runs here once, then on each worker that takes a job)."""

    what: str
    read: Callable[[], bytes]


def _digest_of(read: Callable[[], bytes]) -> str:
    try:
        return hashlib.sha256(read()).hexdigest()
    except Exception as exc:  # noqa: BLE001 - the same failure on both sides is the same view
        return f"unreadable ({type(exc).__name__})"


@functools.lru_cache(maxsize=1)
def environment() -> dict[str, str]:
    """What a job's output depends on besides its inputs: the interpreter and our code. Cached:
    computed once per process (a worker checks it for every job it takes)."""
    code = hash_files(ROOT, (f for pkg in CODE_PACKAGES for f in sorted((ROOT / pkg).rglob("*.py"))))
    import numpy

    return {"python": platform.python_version(), "numpy": numpy.__version__,
            "code": code[:16]}


@dataclass(frozen=True)
class Expect:
    """What each worker must match, shipped with every job."""

    env: dict[str, str]
    witnesses: tuple[tuple[Witness, str], ...] = ()
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def problem(self) -> str | None:
        """None when this process matches, else what differs (a match is remembered per
        process and map, so a worker reads the witnesses once per map)."""
        return _problem(self)


_MATCHED: set[str] = set()  # tokens of the maps this process was found to match


def _problem(expect: Expect) -> str | None:
    if expect.token in _MATCHED:
        return None
    here = environment()
    diff = [f"{k} {here.get(k)!r} (expected {v!r})" for k, v in expect.env.items() if here.get(k) != v]
    if diff:
        return ("runs other code than the machine that submitted the jobs: " + ", ".join(diff)
                + " (install the same commit of the project)")
    for w, want in expect.witnesses:
        if (got := _digest_of(w.read)) != want:  # not cached: a read may fail only this time
            return f"sees {w.what} differently: sha256 {got} here, {want} on the submitting machine"
    _MATCHED.add(expect.token)
    return None


def _where() -> str:
    from distributed import get_worker

    return f"Dask worker {get_worker().address} ({socket.gethostname()})"


def _named(exc: BaseException, prefix: str) -> BaseException:
    """`exc` with `prefix` in its message, same type and attributes (the CLI's error handling
    keys on them: a StorageError's `transient`): rebuilt when its type takes one message
    argument, else the prefix becomes a note."""
    if len(exc.args) <= 1:
        try:
            new = type(exc)(f"{prefix}: {exc}")
        except Exception:  # noqa: BLE001 - a constructor with another signature
            new = None
        if new is not None and str(new).startswith(prefix):
            new.__dict__.update(exc.__dict__)
            return new.with_traceback(exc.__traceback__)
    exc.add_note(prefix)
    return exc


def _run_job(job: J, name: str, *, fn: Callable[[J], R], expect: Expect) -> tuple[R, str]:
    """On the worker: check the worker, run the job, return its result and the worker's
    address (the submitting side logs how the jobs spread)."""
    where = _where()
    if (problem := expect.problem()) is not None:
        raise WorkerMismatch(f"{name}: {where} {problem}")
    try:
        result = fn(job)
    except Exception as exc:
        raise _named(exc, f"{name} on {where}") from None
    from distributed import get_worker

    return result, get_worker().address


def connect(cfg: ExecutorConfig):
    """A Client on the scheduler at cfg.address with at least one worker, or a clear error."""
    from distributed import Client

    try:
        client = Client(cfg.address, timeout=cfg.connect_seconds, set_as_default=False)
    except (OSError, TimeoutError) as err:
        raise ExecutorUnreachable(
            f"executor.address {cfg.address!r}: no Dask scheduler answered within "
            f"{cfg.connect_seconds:g} s ({err}). Start one (`make cluster`, or `dask scheduler` "
            f"and `dask worker {cfg.address}`) or set executor.kind: local in params.yaml") from None
    try:
        client.wait_for_workers(1, timeout=cfg.connect_seconds)
    except (OSError, TimeoutError):
        client.close()
        raise ExecutorUnreachable(
            f"executor.address {cfg.address!r}: the Dask scheduler has no worker (waited "
            f"{cfg.connect_seconds:g} s); start some with `dask worker {cfg.address} "
            f"--nthreads 1` from the project's root") from None
    return client


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-") or "job"


def dask_map(fn: Callable[[J], R], jobs: Sequence[J], cfg: ExecutorConfig, label: str,
             name: Callable[[J], str] | None = None, storage: Storage | None = None,
             witnesses: Sequence[Witness] = ()) -> list[R]:
    """`[fn(j) for j in jobs]` on the cluster at cfg.address, results in job order. `storage`:
    the storage the jobs read and write (each worker must see a probe file written here);
    `witnesses`: other inputs each worker must see as this machine does."""
    if not jobs:
        return []
    from distributed import as_completed

    names = [f"{label} {name(j) if name else f'job {i}'}" for i, j in enumerate(jobs)]
    probe = f"{PROBE_DIR}/probe-{uuid.uuid4().hex}"
    checks = list(witnesses)
    if storage is not None:
        storage.write_bytes(probe, probe.encode())
        relative = "" if storage.is_s3 or "://" in storage.root or Path(storage.root).is_absolute() else (
            ", a relative path: each worker resolves it against its working directory, so start "
            "workers from the project's root")
        checks.insert(0, Witness(f"the storage root {storage.root!r} (probe file {probe}{relative})",
                                 functools.partial(storage.read_bytes, probe)))
    expect = Expect(environment(), tuple((w, _digest_of(w.read)) for w in checks))
    token = uuid.uuid4().hex[:8]
    try:
        with connect(cfg) as client:
            futures = client.map(_run_job, list(jobs), names, fn=fn, expect=expect, pure=False,
                                 key=[f"{_slug(label)}-{i}-{token}" for i in range(len(jobs))],
                                 retries=cfg.retries)
            index = {f.key: i for i, f in enumerate(futures)}
            results: list = [None] * len(jobs)
            placed: Counter = Counter()
            try:
                for fut in progress(as_completed(futures, loop=client.loop), len(futures), label):
                    i = index[fut.key]
                    results[i], worker = _result(fut, names[i], cfg)
                    placed[worker] += 1
            finally:
                client.cancel(futures)  # a no-op once all are done; stops the rest on an error
    finally:
        if storage is not None:
            storage.remove(probe)
    log.info("%s: %d jobs on %d Dask workers at %s (%s)", label, len(jobs), len(placed),
             cfg.address, ", ".join(f"{w}: {n}" for w, n in sorted(placed.items())))
    return results


def _result(fut, name: str, cfg: ExecutorConfig):
    from distributed import KilledWorker

    try:
        return fut.result()
    except KilledWorker as exc:  # the scheduler gave up after several workers died on it
        raise RuntimeError(f"{name}: every Dask worker that ran it died ({exc}); "
                           f"see the workers' logs") from None
    except Exception as exc:
        exc.add_note(f"{name} failed on the Dask cluster at {cfg.address} "
                     f"(tried {cfg.retries + 1} times)")
        raise
