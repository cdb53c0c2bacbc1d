"""Stage `dedup`: exact dedup, then MinHash-LSH near-dedup with verified pairs.

1. Per input shard (in parallel, resumable): the sha256 of each document's normalised text and
   its MinHash signature. Only these stay in memory, so memory grows with the number of
   documents, not their text.
2. Exact dedup: the first document (corpus order) of each normalised-content hash is kept.
3. Near dedup on the survivors: LSH candidate pairs, each verified with the exact Jaccard of its
   shingle sets (re-read from the shards for candidate documents only), then star clusters
   around the lowest-index document: no chaining into giant components.
4. Per input shard: the kept records, in order, into the output shard of the same index.

Documents with fewer tokens than the shingle size: one shingle of all their tokens, so
token-identical short files still cluster; documents with no token at all (empty or
punctuation-only files, ~2,000 `__init__.py` in the default corpus) take part in exact dedup
only: one of each normalised content is kept.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np

from codeworld.code import Code
from codeworld.config import DedupConfig, ExecutorConfig, Params
from codeworld.parallel import pool_map
from codeworld.progress import progress
from codeworld.shards import Dataset, DatasetWriter, ShardInfo, dumps, fingerprint
from codeworld.storage import Storage
from codeworld.tracking import StageRun
from stages.near_dedup import (NearDedupConfig, candidate_pairs, choose_bands, cluster,
                               shingle_set, signatures, verify_pairs)
from stages import exact_dedup
from stages.exact_dedup import RULES, content_key_as

CODE = Code(("stages.dedup",))

REPORT = "report.json"

log = logging.getLogger(__name__)


def output_fingerprint(cfg: DedupConfig, source: Dataset) -> str:
    """What a dedup output is a function of: its params (not the worker count), its input, and
    the Python whose tokenizer normalises its exact keys (exact_dedup.TOKENIZER)."""
    return fingerprint(CODE, "dedup", 1, cfg.model_dump(exclude={"workers"}), source.manifest["fingerprint"],
                       exact_dedup.TOKENIZER)


def near_config(cfg: DedupConfig) -> NearDedupConfig:
    return NearDedupConfig(ngram=cfg.ngram, num_perm=cfg.num_perm, threshold=cfg.threshold,
                           bands=cfg.bands, rows=cfg.rows, seed=cfg.seed)


@dataclass(frozen=True)
class ShardJob:
    dataset: Storage
    info: ShardInfo
    work: Storage
    index: int
    cfg: NearDedupConfig
    fingerprint: str

    @property
    def sig_name(self) -> str:
        # The fingerprint in the name: a leftover of a run with other params is never reused.
        return f"sig-{self.fingerprint[:16]}-{self.index:05d}.npz"


def read_signatures(job: ShardJob) -> dict[str, np.ndarray]:
    """The keys, signatures and ids `sign_shard` saved for `job`; ValueError naming the file
    when they cannot be read or do not fit the shard (a truncated or foreign file)."""
    where = job.work.path(job.sig_name)
    data = job.work.read_bytes(job.sig_name)  # storage errors stay what they are (transient...)
    try:
        with np.load(io.BytesIO(data)) as z:
            part = {k: z[k] for k in ("keys", "sigs", "ids", "rules")}
    except Exception as err:  # truncated, garbage, another format: np.load raises many kinds
        raise ValueError(f"{where}: unreadable signatures: {err!r}") from err
    n = job.info.records
    if not (part["keys"].shape == (n,) and part["ids"].shape == (n,) and part["rules"].shape == (n,)
            and part["sigs"].shape == (n, job.cfg.num_perm)):
        raise ValueError(f"{where}: signatures of {part['sigs'].shape} do not fit the shard's "
                         f"{n} records of {job.cfg.num_perm} permutations")
    return part


def sign_shard(job: ShardJob) -> int:
    """Exact keys and MinHash signatures of one shard, saved in the work area (resume unit)."""
    name = job.sig_name
    if job.work.exists(name):
        try:
            read_signatures(job)
            return job.index
        except ValueError as err:  # a resume file is a cache: recompute it, never fail on it
            log.warning("dedup: %s; recomputing it", err)
    records = Dataset(job.dataset).read_shard(job.info)
    texts = [r["text"] for r in records]
    # A record without a language (ad-hoc JSONL) is taken as Python: this pipeline's corpus.
    keyed = [content_key_as(r["text"], r.get("language") or "python") for r in records]
    keys = np.array([k for k, _ in keyed], dtype="S32").reshape(-1)
    rules = np.array([RULES.index(rule) for _, rule in keyed], dtype=np.uint8).reshape(-1)
    ids = np.array([str(r["id"]) for r in records], dtype=str).reshape(-1)
    sigs = signatures(texts, job.cfg)
    buf = io.BytesIO()
    np.savez(buf, keys=keys, sigs=sigs, ids=ids, rules=rules)
    job.work.write_bytes(name, buf.getvalue())
    return job.index


def shingles_of(job_and_rows: tuple[ShardJob, list[int]]) -> list[np.ndarray]:
    job, rows = job_and_rows
    records = Dataset(job.dataset).read_shard(job.info)
    return [shingle_set(records[r]["text"], job.cfg.ngram) for r in rows]


def exact_reps(keys: np.ndarray) -> np.ndarray:
    """rep[i] = first index with the same content key (stable: corpus order decides)."""
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)]


def _cluster_stats(rep: np.ndarray, ids: list[str], removed_mask: np.ndarray) -> dict:
    sizes = Counter(rep[removed_mask].tolist())
    hist = Counter(n + 1 for n in sizes.values())
    out = {"clusters": len(sizes), "docs_removed": int(removed_mask.sum()),
           "size_histogram": {str(k): v for k, v in sorted(hist.items())}}
    if sizes:
        big, n = min(sizes.items(), key=lambda kv: (-kv[1], kv[0]))
        members = np.flatnonzero(rep == big)
        out["largest"] = {"size": n + 1, "representative": ids[big],
                          "examples": [ids[m] for m in members[:10].tolist()]}
    return out


def dedup_dataset(source: Dataset, writer: DatasetWriter, cfg: DedupConfig,
                  executor: ExecutorConfig | None = None) -> dict:
    ncfg = near_config(cfg)
    # On a cluster, every worker must see the work area (signatures) and the input shards
    # (verified by their sha256 when read) where this machine does.
    fan_out = dict(storage=writer.storage, name=lambda j: f"shard {j.index}" if isinstance(j, ShardJob)
                   else f"shard {j[0].index} ({len(j[1])} documents)")
    finished = writer.prepare()
    if finished is not None:
        return finished
    work = writer.work
    jobs = [ShardJob(source.storage, info, work, i, ncfg, writer.fingerprint)
            for i, info in enumerate(source.shards)]
    pool_map(sign_shard, jobs, cfg.workers, "dedup: signatures", executor, **fan_out)
    parts = [read_signatures(j) for j in jobs]
    keys = np.concatenate([p["keys"] for p in parts]) if parts else np.zeros(0, "S32")
    sigs = np.concatenate([p["sigs"] for p in parts]) if parts else np.zeros((0, ncfg.num_perm), np.uint32)
    offsets = np.cumsum([0] + [len(p["keys"]) for p in parts])
    ids: list[str] = [i for p in parts for i in p["ids"].tolist()]
    rules = np.concatenate([p["rules"] for p in parts]) if parts else np.zeros(0, np.uint8)
    n = len(keys)

    rep = exact_reps(keys)
    exact_removed = rep != np.arange(n)
    survivors = np.flatnonzero(~exact_removed)

    pairs = candidate_pairs(sigs[survivors], ncfg)
    pairs = survivors[pairs] if len(pairs) else pairs.reshape(0, 2)
    need = np.unique(pairs)
    by_shard: dict[int, list[int]] = {}
    for doc in need.tolist():
        s = int(np.searchsorted(offsets, doc, side="right") - 1)
        by_shard.setdefault(s, []).append(doc)
    shingle_jobs = [(jobs[s], [d - int(offsets[s]) for d in docs]) for s, docs in sorted(by_shard.items())]
    shingles: dict[int, np.ndarray] = {}
    for (s, docs), sets in zip(sorted(by_shard.items()),
                               pool_map(shingles_of, shingle_jobs, cfg.workers, "dedup: verify",
                                       executor, **fan_out)):
        shingles.update(zip(docs, sets))
    kept_pairs, jac = verify_pairs(pairs, shingles, cfg.threshold)
    del shingles
    near_rep = cluster(n, kept_pairs)
    near_removed = (near_rep != np.arange(n)) & ~exact_removed
    # An exact duplicate's representative may itself be a near duplicate of another document:
    # the removed one then names the document kept for both (near_rep of a survivor is kept).
    final_rep = np.where(exact_removed, near_rep[rep], near_rep)
    jac_of = {(int(a), int(b)): float(j) for (a, b), j in zip(kept_pairs.tolist(), jac.tolist())}

    infos = []
    removed = []
    counts: Counter = Counter()
    for j in progress(jobs, len(jobs), "dedup: write"):
        lo = int(offsets[j.index])
        records = source.read_shard(j.info)
        keep = [r for k, r in enumerate(records) if final_rep[lo + k] == lo + k]
        infos.append(writer.write(j.index, keep))
    for doc in np.flatnonzero(final_rep != np.arange(n)).tolist():
        r = int(final_rep[doc])
        step = "exact" if exact_removed[doc] else "near"
        entry = {"id": ids[doc], "representative": ids[r], "step": step}
        if step == "exact" and rep[doc] != r:   # the copy it matched exactly was removed too
            entry["via"] = ids[int(rep[doc])]
        if step == "near":
            entry["jaccard"] = round(jac_of.get((min(doc, r), max(doc, r)), float("nan")), 4)
        removed.append(entry)
        counts[f"removed_{step}"] += 1
    b, r_ = (cfg.bands, cfg.rows) if cfg.bands else choose_bands(cfg.threshold, cfg.num_perm)
    stats = {
        "documents": n,
        "kept": int((final_rep == np.arange(n)).sum()),
        "removed_exact": counts["removed_exact"],
        "removed_near": counts["removed_near"],
        # How each document was normalised for its exact key (stages.exact_dedup.RULES).
        "normalised": {rule: int((rules == i).sum()) for i, rule in enumerate(RULES)},
        "lsh": {"bands": b, "rows": r_, "candidate_pairs": int(len(pairs)),
                "verified_pairs": int(len(kept_pairs))},
        "exact_clusters": _cluster_stats(rep, ids, exact_removed),
        "near_clusters": _cluster_stats(near_rep, ids, near_removed),
    }
    writer.out.write_bytes(REPORT, dumps({"stats": stats, "removed": removed}) + b"\n")
    return writer.finish(infos, {"stats": stats, "source": source.manifest["fingerprint"]})


def run(params: Params, *, track: bool = True, metrics_path: str | None = "metrics/dedup.json",
        source: str = "corpus", output: str = "dedup") -> dict:
    storage = Storage(params.storage.root, params.storage.s3_endpoint_url)
    with StageRun("dedup", params.model_dump(include={"storage", "dedup"}),
                  params.tracking.experiment, metrics_path, track) as run_:
        src = Dataset(storage.sub(source))
        writer = DatasetWriter(storage, output, output_fingerprint(params.dedup, src))
        with run_.timed("dedup"):
            manifest = dedup_dataset(src, writer, params.dedup, params.executor)
        stats = manifest["stats"]
        run_.log(documents=stats["documents"], kept=stats["kept"],
                 removed_exact=stats["removed_exact"], removed_near=stats["removed_near"],
                 candidate_pairs=stats["lsh"]["candidate_pairs"],
                 verified_pairs=stats["lsh"]["verified_pairs"],
                 largest_near_cluster=stats["near_clusters"].get("largest", {}).get("size", 1))
        run_.artifact(stats, "dedup_report.json")
        return manifest
