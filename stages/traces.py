"""Stage `traces`: CWM-format execution traces of the deduped corpus's functions.

Programs come from `stages.programs` (standalone functions with inputs from annotations,
defaults, harvested literal calls, doctests and a mutation fuzzer); each is traced in the
sandbox (`stages.trace_runner`). Kept: traces that ran to a return or an exception within the
limits and show a behaviour (function + sequence of line events) not already kept. Programs are
cut into fixed groups, one shard each, so a killed run resumes at the first unfinished group.
"""

from __future__ import annotations

import hashlib
import itertools
import statistics
import time
from collections import Counter

from codeworld.config import Params, TracesConfig
from codeworld.progress import progress
from codeworld.shards import Dataset, DatasetWriter, fingerprint
from codeworld.storage import Storage
from codeworld.tracking import StageRun
from stages.programs import harvest_corpus, iter_programs
from stages.trace_runner import trace_requests

KEEP = ("ok", "exception")


def behaviour(rec: dict, qualname: str) -> str:
    """Same function, same path through its lines = same behaviour (kept once)."""
    frames = rec.get("frames") or []
    path = [(f["kind"], f["line"]) for f in frames] if frames else rec.get("trace")
    return hashlib.sha256(repr((qualname, path, rec["status"])).encode()).hexdigest()[:20]


def _cases(src: Dataset, cfg: TracesConfig, stats: Counter):
    harvested = harvest_corpus(iter(src))
    cases = iter_programs(iter(src), seed=cfg.seed, harvested=harvested,
                          max_inputs_per_function=cfg.max_inputs_per_function,
                          max_functions_per_module=cfg.max_functions_per_module, stats=stats)
    return itertools.islice(cases, cfg.max_programs) if cfg.max_programs else cases


def _groups(cases, size: int):
    it = iter(cases)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def trace_group(cases: list, cfg: TracesConfig, seen: set[str]) -> tuple[list[dict], dict]:
    t0 = time.perf_counter()
    requests = [{"id": c.id, "code": c.code, "call": c.call} for c in cases]
    results = trace_requests(requests, cfg.limits, cfg.workers, cfg.batch_size, frames=True)
    counts: Counter = Counter()
    failures: Counter = Counter()
    kept, sigs, events = [], [], []
    for case, res in zip(cases, results):
        status = res["status"]
        counts[f"status_{status}"] += 1
        counts[f"generator_{case.provenance.get('input_source')}"] += 1
        if status not in KEEP:
            failures[(res.get("error") or status).split(":")[0]] += 1
            continue
        sig = behaviour(res, f"{case.provenance.get('corpus_id')}:{case.provenance.get('qualname')}")
        if sig in seen:
            counts["duplicate_behaviour"] += 1
            continue
        seen.add(sig)
        sigs.append(sig)
        events.append(int(res.get("events") or 0))
        kept.append({"id": case.id, "code": case.code, "call": case.call, "prompt": res.get("prompt"),
                     "trace": res.get("trace"), "frames": res.get("frames"), "result": res.get("result"),
                     "error": res.get("error"), "status": status, "events": res.get("events"),
                     "provenance": case.provenance})
    counts["kept"] = len(kept)
    meta = {"counts": dict(counts), "failures": dict(failures), "signatures": sigs, "events": events,
            "seconds": round(time.perf_counter() - t0, 3)}
    return kept, meta


def run(params: Params, *, track: bool = True, metrics_path: str | None = "metrics/traces.json",
        source: str = "dedup", output: str = "traces") -> dict:
    cfg = params.traces
    storage = Storage(params.storage.root, params.storage.s3_endpoint_url)
    with StageRun("traces", params.model_dump(include={"storage", "traces"}),
                  params.tracking.experiment, metrics_path, track) as run_:
        src = Dataset(storage.sub(source))
        fp = fingerprint("traces", 1, cfg.model_dump(exclude={"workers"}), src.manifest["fingerprint"])
        writer = DatasetWriter(storage, output, fp)
        finished = writer.prepare()
        if finished is not None:
            run_.log(**finished["stats"]["metrics"])
            return finished
        stats: Counter = Counter()
        seen: set[str] = set()
        infos, metas = [], []
        traced_seconds = 0.0
        for index, cases in enumerate(progress(_groups(_cases(src, cfg, stats), cfg.programs_per_shard),
                                               None, "traces")):
            done = writer.completed(index)
            if done is None:
                kept, meta = trace_group(cases, cfg, seen)
                info = writer.write(index, kept, meta)
            else:
                info, meta = done
                seen.update(meta["signatures"])
            traced_seconds += meta["seconds"]
            infos.append(info)
            metas.append(meta)
        report = summarize(metas, stats)
        manifest = writer.finish(infos, {"stats": report})  # no timings: bytes stay reproducible
        traced = report["metrics"]["programs"]
        run_.log(**report["metrics"], seconds_tracing=round(traced_seconds, 3),
                 traces_per_second=round(traced / traced_seconds, 1) if traced_seconds else 0.0)
        run_.artifact(report, "traces_report.json")
        return manifest


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
