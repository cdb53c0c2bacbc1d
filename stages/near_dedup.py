"""Near-duplicate detection: 5-gram shingles -> MinHash -> LSH -> exact Jaccard -> star clusters.

Settings follow BigCode's near-dedup of The Stack (5-gram token shingles, 256
permutations, Jaccard threshold 0.7).  Everything is vectorised with numpy; the
per-document signature is a pure function of the document text and the seed, so
results do not depend on batching, chunking or the number of worker processes.
"""
from __future__ import annotations

import functools
import multiprocessing as mp
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from stages.near_dedup_hash import (
    SENTINEL,
    batch_shingles,
    perm_params,
    splitmix64,
)

# Tokens: runs of ASCII letters, digits and _ and of any non-ASCII character; separators are
# the other ASCII characters. Non-ASCII characters are words, not separators: as separators,
# two translations (docutils' fa.py and ar.py in the default corpus) or two programs with
# non-ASCII names were one ASCII skeleton, near duplicates of Jaccard 1.0, and one was lost.
TOKEN_SPLIT = re.compile(r"[^A-Za-z_0-9\u0080-\U0010FFFF]+")

_BATCH_BYTES = 512 << 10  # texts tokenised together; small arrays get reused by malloc
_CHUNK_ELEMS = 1 << 15  # shingles per MinHash tile: a (group x chunk) uint32 tile fits in L2
_PERM_GROUP = 8


@dataclass(frozen=True)
class NearDedupConfig:
    ngram: int = 5
    num_perm: int = 256
    threshold: float = 0.7
    bands: int = 0  # 0 = choose automatically for threshold/num_perm
    rows: int = 0
    seed: int = 42

    def band_rows(self) -> tuple[int, int]:
        if self.bands and self.rows:
            if self.bands * self.rows > self.num_perm:
                raise ValueError("bands * rows must be <= num_perm")
            return self.bands, self.rows
        return choose_bands(self.threshold, self.num_perm)


@functools.lru_cache(maxsize=None)
def choose_bands(threshold: float, num_perm: int,
                 fp_weight: float = 0.1, fn_weight: float = 0.9) -> tuple[int, int]:
    """(bands, rows) minimising the weighted integrated false positive/negative
    probability of the LSH S-curve (datasketch's criterion).

    Misses weigh 0.9 (datasketch: 0.5) because every candidate is verified
    exactly: a false positive costs one Jaccard, a miss is lost.  For 0.7/256
    this gives 32x8 instead of 25x10 (LSH recall at J=0.7: 0.85 vs 0.51)."""
    s_lo = np.linspace(0.0, threshold, 201)
    s_hi = np.linspace(threshold, 1.0, 201)
    best, best_err = (1, 1), np.inf
    for r in range(1, num_perm + 1):
        nb = num_perm // r
        # (1 - s^r)^b for b = 1..nb by cumulative products (much faster than pow).
        miss_lo = np.cumprod(np.broadcast_to(1.0 - s_lo ** r, (nb, len(s_lo))), axis=0)
        miss_hi = np.cumprod(np.broadcast_to(1.0 - s_hi ** r, (nb, len(s_hi))), axis=0)
        fp = np.trapezoid(1.0 - miss_lo, s_lo, axis=1)
        fn = np.trapezoid(miss_hi, s_hi, axis=1)
        err = fp_weight * fp + fn_weight * fn
        i = int(np.argmin(err))
        if err[i] < best_err - 1e-12:
            best, best_err = (i + 1, r), float(err[i])
    return best


def unique_sorted(x: np.ndarray) -> np.ndarray:
    """Sorted unique values; sort-based because np.unique's hash path (numpy >= 2.3)
    is ~10x slower on random 64-bit values."""
    x = np.sort(x)
    if len(x) < 2:
        return x
    keep = np.empty(len(x), dtype=bool)
    keep[0] = True
    np.not_equal(x[1:], x[:-1], out=keep[1:])
    return x[keep]


def shingle_set(text: str, ngram: int) -> np.ndarray:
    """Sorted unique uint64 shingle hashes of one text (empty if it has no tokens)."""
    return shingle_sets([text], ngram)[0]


def shingle_sets(texts: Sequence[str], ngram: int) -> list[np.ndarray]:
    """shingle_set for many texts, tokenised in batches (much faster than one by one)."""
    out: list[np.ndarray] = []
    for lo, hi in _byte_batches(texts):
        sh, starts = batch_shingles(texts[lo:hi], ngram)
        for d in range(hi - lo):
            out.append(unique_sorted(sh[starts[d]:starts[d + 1]]))
    return out


def _byte_batches(texts: Sequence[str]):
    lo, size = 0, 0
    for i, t in enumerate(texts):
        size += len(t)
        if size >= _BATCH_BYTES:
            yield lo, i + 1
            lo, size = i + 1, 0
    if lo < len(texts):
        yield lo, len(texts)


def signatures(texts: Sequence[str], cfg: NearDedupConfig) -> np.ndarray:
    """(len(texts), num_perm) uint32 MinHash signatures.

    Values are < 0xFFFFFFFF; documents without tokens get an all-SENTINEL row that
    candidate_pairs ignores."""
    a, b = perm_params(cfg.seed, cfg.num_perm)
    out = np.empty((len(texts), cfg.num_perm), dtype=np.uint32)
    for lo, hi in _byte_batches(texts):
        sh, starts = batch_shingles(texts[lo:hi], cfg.ngram)
        out[lo:hi] = _minhash(sh, starts, a, b)
    return out


def _minhash(sh: np.ndarray, starts: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-document min of (a*x + b) mod 2^32 over x = high 32 bits of each shingle hash."""
    nd, k = len(starts) - 1, len(a)
    sig = np.full((nd, k), SENTINEL, dtype=np.uint32)
    counts = np.diff(starts)
    docs = np.flatnonzero(counts > 0)
    if len(docs) == 0:
        return sig
    x = (sh >> np.uint64(32)).astype(np.uint32)
    # Segments are documents cut at tile boundaries, so reduceat never spans two docs.
    cuts = np.arange(0, len(x), _CHUNK_ELEMS, dtype=np.int64)
    seg = np.union1d(starts[docs].astype(np.int64), cuts)
    seg_min = np.empty((len(seg), k), dtype=np.uint32)
    tile = np.empty((_PERM_GROUP, _CHUNK_ELEMS), dtype=np.uint32)
    s0 = 0
    for c0 in range(0, len(x), _CHUNK_ELEMS):
        c1 = min(c0 + _CHUNK_ELEMS, len(x))
        s1 = np.searchsorted(seg, c1, side="left")
        local = seg[s0:s1] - c0
        xc = x[c0:c1]
        for g in range(0, k, _PERM_GROUP):
            t = tile[: min(_PERM_GROUP, k - g), : c1 - c0]
            np.multiply(a[g:g + len(t), None], xc[None, :], out=t)
            np.add(t, b[g:g + len(t), None], out=t)
            seg_min[s0:s1, g:g + len(t)] = np.minimum.reduceat(t, local, axis=1).T
        s0 = s1
    seg_doc_first = np.searchsorted(seg, starts[docs])
    vals = np.minimum.reduceat(seg_min, seg_doc_first, axis=0)
    vals[vals == SENTINEL] = SENTINEL - 1  # keep SENTINEL exclusive to empty docs
    sig[docs] = vals
    return sig


def _band_keys(block: np.ndarray) -> np.ndarray:
    h = np.zeros(len(block), dtype=np.uint64)
    for j in range(block.shape[1]):
        h ^= block[:, j].astype(np.uint64)
        h = splitmix64(h)
    return h


def _capped_triu(size: int, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j), i < j < size, i < cap, without materialising size^2."""
    rows = np.arange(min(cap, size - 1))
    per_row = size - 1 - rows
    iu = np.repeat(rows, per_row)
    first = np.repeat(np.cumsum(per_row) - per_row, per_row)
    ju = np.arange(len(iu)) - first + iu + 1
    return iu, ju


def candidate_pairs(sigs: np.ndarray, cfg: NearDedupConfig, bucket_cap: int = 64) -> np.ndarray:
    """(m, 2) int64 pairs i<j, sorted and unique, sharing at least one LSH band.

    Buckets larger than bucket_cap only pair each member with the bucket's
    bucket_cap lowest-index members (those become representatives), keeping the
    pair count linear for pathological buckets."""
    n = len(sigs)
    nb, nr = cfg.band_rows()
    live = np.flatnonzero(sigs[:, 0] != SENTINEL).astype(np.int64)
    codes: list[np.ndarray] = []
    pending = 0
    for band in range(nb):
        keys = _band_keys(sigs[live, band * nr:(band + 1) * nr])
        order = np.argsort(keys, kind="stable")
        ks = keys[order]
        docs = live[order]
        brk = np.flatnonzero(ks[1:] != ks[:-1]) + 1
        run_start = np.concatenate(([0], brk))
        run_len = np.diff(np.concatenate((run_start, [len(ks)])))
        for size in np.flatnonzero(np.bincount(run_len[run_len > 1])):
            rs = run_start[run_len == size]
            iu, ju = _capped_triu(int(size), bucket_cap)
            codes.append((docs[rs[:, None] + iu] * n + docs[rs[:, None] + ju]).ravel())
            pending += codes[-1].size
        if pending > 1 << 22:  # bands repeat pairs: dedupe as we go to bound memory
            codes, pending = [unique_sorted(np.concatenate(codes))], 0
    code = unique_sorted(np.concatenate(codes)) if codes else np.zeros(0, dtype=np.int64)
    return np.stack((code // n, code % n), axis=1)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard of two sorted unique arrays."""
    if len(a) == 0 or len(b) == 0:
        return 0.0
    if len(a) > len(b):
        a, b = b, a
    idx = np.searchsorted(b, a)
    idx[idx == len(b)] = 0
    inter = int(np.count_nonzero(b[idx] == a))
    return inter / (len(a) + len(b) - inter)


def verify_pairs(pairs: np.ndarray, shingles: Mapping[int, np.ndarray],
                 threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep pairs whose exact shingle Jaccard >= threshold; returns (pairs, jaccards)."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    jac = np.array([jaccard(shingles[int(i)], shingles[int(j)]) for i, j in pairs],
                   dtype=np.float64)
    keep = jac >= threshold
    return pairs[keep], jac[keep]


def cluster(n: int, pairs: np.ndarray) -> np.ndarray:
    """Greedy star clustering in index order: rep[i] == i for kept docs; a removed
    doc's rep is always one of its direct verified neighbours (no chaining)."""
    rep = np.arange(n, dtype=np.int64)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if len(pairs) == 0:
        return rep
    both = np.concatenate((pairs, pairs[:, ::-1]))
    both = both[np.lexsort((both[:, 1], both[:, 0]))]
    indptr = np.searchsorted(both[:, 0], np.arange(n + 1))
    nbr = both[:, 1]
    assigned = np.zeros(n, dtype=bool)
    for i in unique_sorted(both[:, 0]).tolist():
        if assigned[i]:
            continue
        assigned[i] = True
        js = nbr[indptr[i]:indptr[i + 1]]
        js = js[~assigned[js]]
        rep[js] = i
        assigned[js] = True
    return rep


@dataclass
class NearDedupResult:
    rep: np.ndarray  # rep[i] == i means doc i is kept
    candidates: int  # LSH candidate pairs
    verified: int  # candidate pairs with exact Jaccard >= threshold
    removed: int = 0
    clusters: int = 0  # clusters with >= 2 members
    largest_cluster: int = 1
    cluster_sizes: dict[int, int] = field(default_factory=dict)  # size -> count (size >= 2)
    bands: int = 0
    rows: int = 0


def summarize(rep: np.ndarray, candidates: int, verified: int, cfg: NearDedupConfig) -> NearDedupResult:
    sizes = np.bincount(rep, minlength=len(rep))
    multi = sizes[sizes > 1]
    hist = np.bincount(multi) if len(multi) else np.zeros(0, np.int64)
    hist_k = np.flatnonzero(hist)
    hist_v = hist[hist_k]
    b, r = cfg.band_rows()
    return NearDedupResult(
        rep=rep, candidates=candidates, verified=verified,
        removed=int(np.count_nonzero(rep != np.arange(len(rep)))),
        clusters=int(len(multi)), largest_cluster=int(sizes.max()) if len(rep) else 0,
        cluster_sizes={int(k): int(v) for k, v in zip(hist_k, hist_v)}, bands=b, rows=r)


_POOL_TEXTS: Sequence[str] = ()


def _sig_range(args) -> np.ndarray:
    lo, hi, cfg = args
    return signatures(_POOL_TEXTS[lo:hi], cfg)


def _sig_texts(args) -> np.ndarray:
    texts, cfg = args
    return signatures(texts, cfg)


def parallel_signatures(texts: Sequence[str], cfg: NearDedupConfig, workers: int = 1) -> np.ndarray:
    """signatures() over a Pool; the chunking is by byte size and does not affect results."""
    if workers <= 1 or len(texts) < 2:
        return signatures(texts, cfg)
    total = sum(len(t) for t in texts)
    n_chunks = min(len(texts), workers * 8)
    bounds, acc, step = [0], 0, total / n_chunks
    for i, t in enumerate(texts):
        acc += len(t)
        if acc >= step * len(bounds) and i + 1 < len(texts):
            bounds.append(i + 1)
    bounds.append(len(texts))
    ranges = list(zip(bounds[:-1], bounds[1:]))
    global _POOL_TEXTS
    if "fork" in mp.get_all_start_methods():
        # Forked workers inherit the texts: no pickling of the corpus.
        _POOL_TEXTS = texts
        try:
            with mp.get_context("fork").Pool(workers) as pool:
                parts = pool.map(_sig_range, [(lo, hi, cfg) for lo, hi in ranges], chunksize=1)
        finally:
            _POOL_TEXTS = ()
    else:
        with mp.Pool(workers) as pool:
            parts = pool.map(_sig_texts, [(list(texts[lo:hi]), cfg) for lo, hi in ranges],
                             chunksize=1)
    return np.concatenate(parts) if parts else signatures(texts, cfg)


def near_dedup(texts: Sequence[str], cfg: NearDedupConfig = NearDedupConfig(),
               workers: int = 1) -> NearDedupResult:
    """In-memory path: signatures -> LSH candidates -> exact verification -> clusters."""
    sigs = parallel_signatures(texts, cfg, workers)
    pairs = candidate_pairs(sigs, cfg)
    docs = unique_sorted(pairs.ravel())
    sets = dict(zip(docs.tolist(), shingle_sets([texts[i] for i in docs], cfg.ngram)))
    kept, _ = verify_pairs(pairs, sets, cfg.threshold)
    rep = cluster(len(texts), kept)
    return summarize(rep, len(pairs), len(kept), cfg)
