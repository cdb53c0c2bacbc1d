"""Stage `traces`: CWM-format execution traces of the deduped corpus's functions.

Programs come from `stages.programs` (standalone functions with inputs from annotations,
defaults, harvested literal calls, doctests and a mutation fuzzer); each is traced in the
sandbox (`stages.trace_runner`). Kept: traces that ran to a return or an exception within the
limits and show a behaviour (function + sequence of line events) not already kept. Programs are
cut into fixed groups, one shard each, so a killed run resumes at the first unfinished group.
With `executor.kind: dask` a group's programs are traced on the cluster's workers, each in its
own machine's sandbox (`trace_all`); selection and dedup of behaviours stay here, in order.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from codeworld.code import Code
from codeworld.config import ExecutorConfig, Params, TracesConfig
from codeworld.parallel import pool_map
from codeworld.progress import progress
from codeworld.shards import Dataset, DatasetWriter, fingerprint
from codeworld.storage import Storage
from codeworld.tracking import StageRun
from stages.programs import iter_programs
from stages.programs.parallel import parallel_harvest
from stages.trace_runner import trace_requests
from stages.tracer.frames import pack_frame_dicts
from stages.tracer.untraced import REPR_SIDE_EFFECT

CODE = Code(("stages.traces",))

KEEP = ("ok", "exception")
# On a cluster, a shard's programs go out in chunks of this many sandbox batches: whole
# batches, so every program shares its forked child with the same neighbours as in-process.
CHUNK_BATCHES = 4
REPO_CACHE = ".cache/repos"  # fetched sdists (pinned by sha256), outside the DVC outputs


def behaviour(rec: dict, qualname: str) -> str:
    """Same function, same path through its lines = same behaviour (kept once). ``rec`` is a
    trace record, its frames packed ([kind, scope, line, locals, value] each)."""
    frames = rec.get("frames") or []
    path = [(f[0], f[2]) for f in frames] if frames else rec.get("trace")
    return hashlib.sha256(repr((qualname, path, rec["status"])).encode()).hexdigest()[:20]


def harvest_dataset(src: Dataset, workers: int) -> dict[str, list[str]]:
    """``harvest_corpus(iter(src))`` on ``workers`` processes (0: every core), one shard per
    job (see ``stages.programs.parallel``: the same result as one pass)."""
    return parallel_harvest((src.read_shard(info) for info in src.shards),
                            workers or os.cpu_count() or 1)


def programs_to_trace(src: Dataset, cfg: TracesConfig, stats: Counter):
    """The programs the stage traces from dataset `src`, in order (bench/trace_margin.py times
    the same ones); `stats` counts what the generator made and skipped."""
    harvested = harvest_dataset(src, cfg.workers)
    cases = iter_programs(iter(src), seed=cfg.seed, harvested=harvested,
                          max_inputs_per_function=cfg.max_inputs_per_function,
                          max_functions_per_module=cfg.max_functions_per_module, stats=stats,
                          workers=cfg.workers or os.cpu_count() or 1)
    return itertools.islice(cases, cfg.max_programs) if cfg.max_programs else cases


def _groups(cases, size: int):
    it = iter(cases)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


@dataclass(frozen=True)
class TraceChunk:
    """Programs traced in one job: on a cluster, in the sandbox of the worker's machine."""

    first: int
    requests: list
    cfg: TracesConfig
    frames: bool


def _trace_chunk(c: TraceChunk) -> list[dict]:
    # too_long records are dropped (as CWM dropped them): their partial text need not travel
    return trace_requests(c.requests, c.cfg.limits, c.cfg.workers, c.cfg.batch_size,
                          frames=c.frames, too_long_text=False, isolation=c.cfg.isolation)


def trace_all(requests: list[dict], cfg: TracesConfig, executor: ExecutorConfig | None,
              frames: bool = False) -> list[dict]:
    """`trace_requests` on this machine, or fanned out over the cluster in chunks of whole
    sandbox batches (results in request order either way). A worker runs them only in its own
    sandbox: one without bubblewrap fails the job with SandboxUnavailable."""
    if executor is None or executor.kind == "local":
        return _trace_chunk(TraceChunk(0, requests, cfg, frames))
    step = cfg.batch_size * CHUNK_BATCHES
    chunks = [TraceChunk(i, requests[i:i + step], cfg, frames) for i in range(0, len(requests), step)]
    parts = pool_map(_trace_chunk, chunks, 1, "traces: sandbox", executor,
                     name=lambda c: f"programs {c.first}..{c.first + len(c.requests) - 1}")
    return [rec for part in parts for rec in part]


def _reproducible(kept: list[dict], cfg: TracesConfig, counts: Counter,
                  executor: ExecutorConfig | None = None) -> list[dict]:
    """Trace every kept program a second time (another process, another address layout) and
    drop the ones whose trace differs: values that depend on addresses, clocks or the host
    are not facts about the code, and outputs must be byte-identical run after run. (Programs
    reading clocks or entropy are already excluded statically by stages.programs.)"""
    again = trace_all([{"id": r["id"], "code": r["code"], "call": r["call"]} for r in kept],
                      cfg, executor)
    same = [r for r, a in zip(kept, again)
            if (a.get("trace"), a.get("result"), a.get("status")) == (r["trace"], r["result"], r["status"])]
    counts["nondeterministic"] = len(kept) - len(same)
    return same


# Where the harness lives inside the sandbox (the tracer, the fork server's handler, the repo
# runner). A value that shows it, e.g. a captured call stack, is a fact about our harness, not
# about the code, and changes whenever the harness does.
HARNESS_PATH = "/sandbox/lib/"


def _exposes_harness(rec: dict) -> bool:
    return any(HARNESS_PATH in (rec.get(k) or "") for k in ("trace", "result", "error"))


def _failure(rec: dict) -> str:
    return (rec.get("error") or rec["status"]).split(":")[0]


def _meta(kept: list[dict], counts: Counter, failures: Counter, t0: float,
          signatures: list[str] = ()) -> dict:
    """A shard's completion record: what the report sums over shards (and a resume reuses)."""
    counts["kept"] = len(kept)
    return {"counts": dict(counts), "failures": dict(failures), "signatures": list(signatures),
            "events": [int(r.get("events") or 0) for r in kept],
            "seconds": round(time.perf_counter() - t0, 3)}


def trace_group(cases: list, cfg: TracesConfig, seen: set[str],
                executor: ExecutorConfig | None = None) -> tuple[list[dict], dict]:
    t0 = time.perf_counter()
    requests = [{"id": c.id, "code": c.code, "call": c.call} for c in cases]
    results = trace_all(requests, cfg, executor, frames=True)
    counts: Counter = Counter()
    failures: Counter = Counter()
    kept, sigs = [], []
    for case, res in zip(cases, results):
        status = res["status"]
        counts[f"status_{status}"] += 1
        counts[f"generator_{case.provenance.get('input_source')}"] += 1
        if status not in KEEP:
            failures[_failure(res)] += 1
            if _failure(res) == REPR_SIDE_EFFECT:   # (tracing changed what the program does)
                counts[REPR_SIDE_EFFECT] += 1
            continue
        if _exposes_harness(res):
            counts["exposes_harness"] += 1
            continue
        # frames stored packed (see frames.pack_frame_dicts; unpack_frames gives them whole)
        record = {"id": case.id, "code": case.code, "call": case.call, "prompt": res.get("prompt"),
                  "trace": res.get("trace"), "frames": pack_frame_dicts(res.get("frames")),
                  "result": res.get("result"), "error": res.get("error"), "status": status,
                  "events": res.get("events"), "provenance": case.provenance}
        sig = behaviour(record, f"{case.provenance.get('corpus_id')}:{case.provenance.get('qualname')}")
        if sig in seen:
            counts["duplicate_behaviour"] += 1
            continue
        seen.add(sig)
        sigs.append(sig)  # dropped ones below too: `seen` must be rebuilt identically on resume
        kept.append(record)
    kept = _reproducible(kept, cfg, counts, executor)
    return kept, _meta(kept, counts, failures, t0, sigs)


def trace_repo_group(repo, cfg: TracesConfig) -> tuple[list[dict], dict]:
    """One repository's traces (one shard). The suite runs twice; a trace is kept only when
    both runs agree (e.g. hash(None) is an address on 3.11)."""
    from stages.repo_traces import fetch_pypi_sdist, trace_repository
    from stages.tracer.frames import TraceLimits

    t0 = time.perf_counter()
    tree = Path(repo.path) if repo.path else fetch_pypi_sdist(repo.name, repo.version, repo.sha256, REPO_CACHE)
    limits = TraceLimits(max_events=cfg.limits.max_events, max_bytes=cfg.limits.max_bytes)
    runs = [trace_repository(tree, max_traces=cfg.repo_max_traces, max_per_function=cfg.repo_max_per_function,
                             limits=limits, wall_seconds=cfg.repo_wall_seconds, repo=repo.name,
                             version=repo.version, sha256=repo.sha256) for _ in range(2)]
    (first, stats), (second, _) = runs
    twin = {r["id"]: r for r in second}
    counts: Counter = Counter()
    failures: Counter = Counter()
    kept = []
    for r in first:
        counts[f"status_{r['status']}"] += 1
        counts["generator_repository"] += 1
        if r["status"] not in KEEP:
            failures[_failure(r)] += 1
        elif _exposes_harness(r):
            counts["exposes_harness"] += 1
        elif twin.get(r["id"]) != r:
            counts["nondeterministic"] += 1
        else:
            kept.append(r)
    counts["repo_tests_run"] = int(stats.get("tests_run", 0) or 0)
    # tests that read the clock, sleep, start threads or read os.urandom trace nothing
    counts["repo_tests_untraced"] = sum((stats.get("tests_untraced") or {}).values())
    return kept, _meta(kept, counts, failures, t0)


def _shard(writer: DatasetWriter, index: int, build) -> tuple:
    """Shard `index` of a resumed run as it was finished, or built now by `build()`."""
    done = writer.completed(index)
    if done is not None:
        return done
    kept, meta = build()
    return writer.write(index, kept, meta), meta


def run(params: Params, *, track: bool = True, metrics_path: str | None = "metrics/traces.json",
        source: str = "dedup", output: str = "traces") -> dict:
    cfg = params.traces
    storage = Storage(params.storage.root, params.storage.s3_endpoint_url)
    with StageRun("traces", params.model_dump(include={"storage", "traces"}),
                  params.tracking.experiment, metrics_path, track) as run_:
        src = Dataset(storage.sub(source))
        fp = fingerprint(CODE, "traces", 1, cfg.model_dump(exclude={"workers"}), src.manifest["fingerprint"])
        writer = DatasetWriter(storage, output, fp)
        finished = writer.prepare()
        if finished is not None:
            run_.log(**finished["stats"]["metrics"], **generation_metrics(finished["stats"]))
            return finished
        stats: Counter = Counter()
        seen: set[str] = set()
        infos, metas = [], []
        traced_seconds = 0.0
        groups = _groups(programs_to_trace(src, cfg, stats), cfg.programs_per_shard)
        for index, cases in enumerate(progress(groups, None, "traces")):
            info, meta = _shard(writer, index, lambda: trace_group(cases, cfg, seen, params.executor))
            seen.update(meta["signatures"])  # a no-op unless the shard came from a killed run
            traced_seconds += meta["seconds"]
            infos.append(info)
            metas.append(meta)
        first, repo_seconds = len(infos), 0.0
        # repo_max_traces 0: no repository traces, so their suites need not run at all
        for k, repo in enumerate(cfg.repositories if cfg.repo_max_traces else ()):
            info, meta = _shard(writer, first + k, lambda: trace_repo_group(repo, cfg))
            repo_seconds += meta["seconds"]
            infos.append(info)
            metas.append(meta)
        report = summarize(metas, stats)
        manifest = writer.finish(infos, {"stats": report})  # no timings: bytes stay reproducible
        # throughput of the function-level tracing (programs through the sandbox)
        traced = report["metrics"]["programs"] - report["metrics"].get("generator_repository", 0)
        run_.log(**report["metrics"], **generation_metrics(report), seconds_tracing=round(traced_seconds, 3),
                 seconds_repositories=round(repo_seconds, 3),
                 traces_per_second=round(traced / traced_seconds, 1) if traced_seconds else 0.0)
        run_.artifact(report, "traces_report.json")
        return manifest


def generation_metrics(report: dict) -> dict[str, int]:
    """What the program generator made and passed over (functions skipped for I/O, a
    dependency, a decorator...), as metrics beside the tracing's: `generated_skipped_io`."""
    return {"generated_" + k.replace(":", "_"): v for k, v in report["programs"].items()}


def summarize(metas: list[dict], programs: Counter) -> dict:
    counts: Counter = Counter()
    failures: Counter = Counter()
    events: list[int] = []
    for m in metas:
        counts.update(m["counts"])
        failures.update(m["failures"])
        events += m["events"]
    traced = sum(v for k, v in counts.items() if k.startswith("status_"))
    metrics = {**{k: v for k, v in sorted(counts.items())}, "programs": traced,
               "events_mean": round(statistics.fmean(events), 2) if events else 0.0,
               "events_median": statistics.median(events) if events else 0,
               "events_max": max(events, default=0)}
    return {"metrics": metrics, "top_failures": dict(failures.most_common(10)),
            "programs": dict(sorted(programs.items()))}
