"""Near-dedup benchmark: ours vs datasketch vs datatrove on a corpus of Python files.

Each method runs in its own spawned child process (library imports and file
reading untimed); peak memory is sampled every 50 ms as the sum over that
child's process tree (pool workers included), both as RSS and as PSS (PSS
splits pages that forked workers share).  Quality is precision/recall of the
duplicate PAIRS implied by each method's clusters against the exact ground
truth: Jaccard >= 0.7 over all pairs, from a sparse doc x shingle product
X @ X.T in row blocks.  Documents without tokens are left out of the ground
truth and of the scoring (exact dedup handles them); datasketch never indexes
them and datatrove's JsonlReader drops empty ones.

The default corpus is every *.py file under the running interpreter's Lib
directory (sysconfig.get_paths()["stdlib"]: the base interpreter's, even inside
a venv) INCLUDING its site-packages, sorted by relative path, skipping files
that are not UTF-8 or are larger than 1,000,000 bytes.

    python bench/dedup.py                             # full default corpus
    python bench/dedup.py --exclude-site-packages     # stdlib only
    python bench/dedup.py --limit 500 --peers ours,datasketch --json out.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import sysconfig
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stages.near_dedup import (  # noqa: E402
    TOKEN_SPLIT,
    NearDedupConfig,
    choose_bands,
    near_dedup,
    shingle_sets,
    unique_sorted,
)

MAX_BYTES = 1_000_000
PEERS = ("ours", "datasketch", "datatrove")


def list_corpus(root: str, exclude_site_packages: bool = False, limit: int | None = None) -> list[str]:
    paths = []
    for dp, dns, fns in os.walk(root):
        if exclude_site_packages:
            dns[:] = [d for d in dns if d != "site-packages"]
        paths += [os.path.join(dp, f) for f in fns if f.endswith(".py")]
    paths.sort(key=lambda p: os.path.relpath(p, root))
    keep = []
    for p in paths:
        try:
            if os.path.getsize(p) > MAX_BYTES:
                continue
            with open(p, "rb") as f:
                f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        keep.append(p)
        if limit and len(keep) >= limit:
            break
    return keep


def load_texts(paths: list[str]) -> list[str]:
    out = []
    for p in paths:
        with open(p, "rb") as f:
            out.append(f.read().decode("utf-8"))
    return out


# ---------------------------------------------------------------- ground truth
def ground_truth(sets: list[np.ndarray], threshold: float, block: int = 512) -> np.ndarray:
    """Sorted codes i*n+j (i<j) of ALL pairs with exact Jaccard >= threshold.

    Brute force over all pairs: X is the sparse binary doc x shingle matrix and
    X[rows] @ X.T, one block of rows at a time, gives every pair's intersection
    size; Jaccard = inter / (|a| + |b| - inter).  Shingles held by a single
    document cannot contribute to any intersection, so their columns are dropped
    first (the set sizes still count them): the result is exact."""
    from scipy import sparse

    n = len(sets)
    sizes = np.array([len(s) for s in sets], dtype=np.int64)
    if n < 2 or not sizes.any():
        return np.zeros(0, np.int64)
    flat = np.concatenate(sets)
    doc = np.repeat(np.arange(n, dtype=np.int64), sizes)
    order = np.argsort(flat, kind="stable")
    fs = flat[order]
    new = np.empty(len(fs), dtype=bool)
    new[0] = True
    np.not_equal(fs[1:], fs[:-1], out=new[1:])
    sid = np.cumsum(new) - 1  # shingle id per sorted entry
    df = np.bincount(sid)
    shared = df[sid] > 1
    col = np.cumsum(df > 1)[sid[shared]] - 1
    X = sparse.csr_matrix((np.ones(len(col), np.int32), (doc[order][shared], col)),
                          shape=(n, int((df > 1).sum())))
    XT = X.T.tocsr()
    out = []
    for lo in range(0, n, block):
        G = (X[lo:lo + block] @ XT).tocoo()
        i, j, inter = G.row.astype(np.int64) + lo, G.col.astype(np.int64), G.data.astype(np.int64)
        up = j > i
        i, j, inter = i[up], j[up], inter[up]
        jac = inter / (sizes[i] + sizes[j] - inter)
        keep = jac >= threshold
        out.append(i[keep] * n + j[keep])
    return np.sort(np.concatenate(out))


def cluster_pairs(labels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Codes of all within-cluster pairs among valid docs."""
    n = len(labels)
    idx = np.flatnonzero(valid)
    lab = labels[idx]
    order = np.argsort(lab, kind="stable")
    idx, lab = idx[order], lab[order]
    brk = np.flatnonzero(lab[1:] != lab[:-1]) + 1
    out = []
    for members in np.split(idx, brk):
        if len(members) > 1:
            members = np.sort(members)
            a, b = np.triu_indices(len(members), 1)
            out.append(members[a] * n + members[b])
    return unique_sorted(np.concatenate(out)) if out else np.zeros(0, np.int64)


# ---------------------------------------------------------------- methods
def run_ours(texts, cfg, workers):
    res = near_dedup(texts, cfg, workers=workers)
    extra = {"candidates": res.candidates, "verified": res.verified, "removed": res.removed,
             "largest_cluster": res.largest_cluster, "bands_rows": [res.bands, res.rows]}
    return res.rep, extra


def _shingles_bytes(text: str, n: int) -> set[bytes]:
    toks = [t for t in TOKEN_SPLIT.split(text) if t]
    if len(toks) < n:
        return {" ".join(toks).encode()} if toks else set()
    return {" ".join(toks[k:k + n]).encode() for k in range(len(toks) - n + 1)}


def run_datasketch(texts, cfg, workers):
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    idx = [i for i, t in enumerate(texts) if TOKEN_SPLIT.sub("", t)]
    gen = (_shingles_bytes(texts[i], cfg.ngram) for i in idx)
    mhs = [LeanMinHash(m) for m in MinHash.bulk(gen, num_perm=cfg.num_perm, seed=cfg.seed)]
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    with lsh.insertion_session() as sess:
        for i, m in zip(idx, mhs):
            sess.insert(i, m)
    parent = list(range(len(texts)))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, m in zip(idx, mhs):
        for j in lsh.query(m):
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    labels = np.array([find(i) for i in range(len(texts))], dtype=np.int64)
    return labels, {"bands_rows": list(lsh.b and (lsh.b, lsh.r))}


def _datatrove_tokenizer():
    from datatrove.utils.word_tokenizers import WordTokenizer

    class CodeTokenizer(WordTokenizer):
        """Same tokens as ours, so every method shingles identically."""

        def word_tokenize(self, text):
            return [t for t in TOKEN_SPLIT.split(text) if t]

        def sent_tokenize(self, text):
            return [text]

        def span_tokenize(self, text):
            return [(0, len(text))]

    return CodeTokenizer()


def write_jsonl(texts: list[str], folder: str, files: int) -> None:
    os.makedirs(folder, exist_ok=True)
    per = -(-len(texts) // files)
    for f in range(files):
        with open(os.path.join(folder, f"part_{f:02d}.jsonl"), "w", encoding="utf-8") as fh:
            for i in range(f * per, min((f + 1) * per, len(texts))):
                fh.write(json.dumps({"id": str(i), "text": texts[i]}) + "\n")


def run_datatrove(work: str, n_docs: int, cfg, workers: int):
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
        MinhashDedupSignature)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.text import TextNormConfig

    nb, nr = choose_bands(cfg.threshold, cfg.num_perm, 0.5, 0.5)  # datasketch's banding (25x10)
    mcfg = MinhashConfig(
        n_grams=cfg.ngram, num_buckets=nb, hashes_per_bucket=nr, seed=cfg.seed,
        norm_config=TextNormConfig(lowercase=False, norm_whitespace=False, remove_punctuation=False,
                                   norm_unicode_diacritics=False, norm_numbers=False),
        hash_config=HashConfig(precision=64, hash_fc="xxhash"))
    inp, tasks = os.path.join(work, "input"), workers
    d = {k: os.path.join(work, k) for k in ("sigs", "buckets", "remove", "kept", "dropped", "logs")}
    common = dict(workers=workers, start_method="fork")  # fork: cheaper task start than forkserver
    steps = [
        LocalPipelineExecutor(pipeline=[JsonlReader(inp), MinhashDedupSignature(
            output_folder=d["sigs"], config=mcfg, language=_datatrove_tokenizer())],
            tasks=tasks, logging_dir=d["logs"] + "/1", **common),
        LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(
            input_folder=d["sigs"], output_folder=d["buckets"], config=mcfg)],
            tasks=nb, logging_dir=d["logs"] + "/2", **common),  # multiple of num_buckets
        LocalPipelineExecutor(pipeline=[MinhashDedupCluster(
            input_folder=d["buckets"], output_folder=d["remove"], config=mcfg, save_cluster_id=True)],
            tasks=1, logging_dir=d["logs"] + "/3"),
        LocalPipelineExecutor(pipeline=[JsonlReader(inp), MinhashDedupFilter(
            input_folder=d["remove"], load_cluster_ids=True,
            exclusion_writer=JsonlWriter(d["dropped"], compression=None)),
            JsonlWriter(d["kept"], compression=None)],
            tasks=tasks, logging_dir=d["logs"] + "/4", **common),
    ]
    for ex in steps:
        ex.run()
    labels = np.arange(n_docs, dtype=np.int64)  # singletons unless clustered
    seen = 0
    for sub in ("kept", "dropped"):
        for name in sorted(os.listdir(d[sub])):
            with open(os.path.join(d[sub], name), encoding="utf-8") as fh:
                for line in fh:
                    rec = json.loads(line)
                    seen += 1
                    cid = rec.get("metadata", {}).get("minhash_cluster_id", -1)
                    if cid >= 0:
                        labels[int(rec["id"])] = n_docs + cid
    return labels, {"docs_seen_by_datatrove": seen}


# ---------------------------------------------------------------- harness
class TreeMemory:
    """Samples the summed RSS and PSS of this process and all its descendants
    (pool workers, executor tasks); keeps the peak of each sum."""

    def __init__(self, period: float = 0.05):
        import psutil

        self.proc, self.period = psutil.Process(), period
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _sample(self):
        import psutil

        rss = pss = 0
        for p in [self.proc] + self.proc.children(recursive=True):
            try:
                m = p.memory_full_info()
            except psutil.Error:
                continue
            rss += m.rss
            pss += m.pss
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)

    def _loop(self):
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self):
        self._sample()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self._sample()


def _preload(method: str) -> None:
    import importlib

    mods = {"ours": [], "datasketch": ["datasketch"],
            "datatrove": ["datatrove.executor", "datatrove.pipeline.dedup.minhash",
                          "datatrove.pipeline.readers", "datatrove.pipeline.writers",
                          "datatrove.utils.word_tokenizers", "multiprocess"]}[method]
    for m in mods:
        importlib.import_module(m)


def _child(method: str, paths: list[str], work: str, cfg: NearDedupConfig, workers: int, conn):
    # ru_maxrss is not used: a spawned child starts with its parent's high-water mark.
    try:
        texts = load_texts(paths) if method != "datatrove" else None
        if method == "datatrove":  # its per-task logs are long: keep them in a file
            log = os.open(os.path.join(work, "datatrove.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(log, 1)
            os.dup2(log, 2)
        _preload(method)  # library imports are not part of the timed run
        with TreeMemory() as mem:
            base = mem.peak_rss
            c0, t0 = os.times(), time.perf_counter()
            if method == "ours":
                labels, extra = run_ours(texts, cfg, workers)
            elif method == "datasketch":
                labels, extra = run_datasketch(texts, cfg, workers)
            else:
                labels, extra = run_datatrove(work, len(paths), cfg, workers)
            t1, c1 = time.perf_counter(), os.times()
        cpu = sum(c1[k] - c0[k] for k in range(4))
        conn.send({"labels": labels, "seconds": t1 - t0, "cpu_seconds": cpu,
                   "peak_rss_mb": mem.peak_rss / 2**20, "peak_pss_mb": mem.peak_pss / 2**20,
                   "base_rss_mb": base / 2**20, **extra})
    except Exception as e:  # reported in the table instead of killing the whole run
        import traceback

        conn.send({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})


def run_method(method, paths, work, cfg, workers) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(method, paths, work, cfg, workers, child))
    p.start()
    child.close()
    try:
        res = parent.recv()
    except EOFError:
        res = {"error": f"child exited with code {p.exitcode}"}
    p.join()
    return res


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for pkg in ("numpy", "scipy", "datasketch", "datatrove", "xxhash", "spacy", "regex",
                "tokenizers", "orjson"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=sysconfig.get_paths()["stdlib"])
    ap.add_argument("--exclude-site-packages", action="store_true",
                    help="leave out site-packages dirs (default: included)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--peers", default=",".join(PEERS), help="comma list of " + ",".join(PEERS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.peers.split(",") if m.strip()]
    bad = [m for m in methods if m not in PEERS]
    if bad:
        ap.error(f"unknown method(s) {bad}")
    cfg = NearDedupConfig()

    paths = list_corpus(args.root, args.exclude_site_packages, args.limit)
    texts = load_texts(paths)
    n = len(texts)
    mb = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) / 1e6
    print(f"corpus: {n} files, {mb:.1f} MB from {args.root}"
          f"{' (without site-packages)' if args.exclude_site_packages else ''}", flush=True)
    t = time.perf_counter()
    sets = shingle_sets(texts, cfg.ngram)
    valid = np.array([len(s) > 0 for s in sets])
    truth = ground_truth(sets, cfg.threshold)
    print(f"ground truth: {len(truth)} pairs with Jaccard >= {cfg.threshold} "
          f"({n - valid.sum()} zero-token docs excluded) in {time.perf_counter() - t:.1f}s", flush=True)
    del sets

    results = {}
    with tempfile.TemporaryDirectory(prefix="dedup_bench_") as work:
        if "datatrove" in methods:
            write_jsonl(texts, os.path.join(work, "input"), args.workers)
        del texts
        for m in methods:
            print(f"running {m} ...", flush=True)
            res = run_method(m, paths, work, cfg, args.workers)
            if "error" in res:
                print(f"  {m} failed: {res['error']}\n{res.get('traceback', '')}", flush=True)
                results[m] = res
                continue
            pred = cluster_pairs(np.asarray(res.pop("labels")), valid)
            tp = len(np.intersect1d(pred, truth, assume_unique=True))
            res.update(docs=n, docs_per_s=n / res["seconds"],
                       docs_per_cpu_s=n / max(res["cpu_seconds"], 1e-9), pairs=len(pred),
                       precision=tp / len(pred) if len(pred) else 1.0,
                       recall=tp / len(truth) if len(truth) else 1.0)
            results[m] = res
            print(f"  {res['seconds']:.2f}s", flush=True)

    peers = [r["docs_per_s"] for m, r in results.items() if m != "ours" and "error" not in r]
    if "ours" in results and "error" not in results["ours"] and peers:
        results["ours"]["speed_ratio"] = results["ours"]["docs_per_s"] / max(peers)
    hdr = f"{'method':<11}{'docs':>7}{'sec':>8}{'docs/s':>9}{'cpu s':>8}{'docs/cpu-s':>11}{'RSS MB':>8}{'PSS MB':>8}" \
          f"{'pairs':>8}{'prec':>7}{'recall':>7}{'ratio':>7}"
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for m, r in results.items():
        if "error" in r:
            print(f"{m:<11} FAILED: {r['error']}")
            continue
        ratio = f"{r['speed_ratio']:.2f}" if "speed_ratio" in r else ""
        print(f"{m:<11}{r['docs']:>7}{r['seconds']:>8.2f}{r['docs_per_s']:>9.0f}{r['cpu_seconds']:>8.1f}"
              f"{r['docs_per_cpu_s']:>11.0f}{r['peak_rss_mb']:>8.0f}{r['peak_pss_mb']:>8.0f}{r['pairs']:>8}{r['precision']:>7.3f}{r['recall']:>7.3f}{ratio:>7}")
    print(f"ground truth pairs: {len(truth)}; ratio = ours docs/s / fastest peer docs/s; "
          f"RSS/PSS = peak summed over the method's process tree")
    vers = versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    if args.json:
        out = {"versions": vers, "cpus": os.cpu_count(), "workers": args.workers,
               "corpus": {"root": args.root, "site_packages": not args.exclude_site_packages, "files": n,
                          "mb": mb, "truth_pairs": int(len(truth))},
               "results": {m: {k: v for k, v in r.items() if k != "traceback"}
                           for m, r in results.items()}}
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    return 0


if __name__ == "__main__":
    sys.exit(main())
