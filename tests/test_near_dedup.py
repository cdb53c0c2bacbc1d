"""Unit tests for stages.near_dedup (tokens, shingles, MinHash, LSH, verification, clusters)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

import stages.near_dedup as nd
import stages.near_dedup_hash as ndh
from stages.near_dedup import (
    TOKEN_SPLIT,
    NearDedupConfig,
    candidate_pairs,
    choose_bands,
    cluster,
    jaccard,
    near_dedup,
    shingle_set,
    shingle_sets,
    signatures,
    verify_pairs,
)

STDLIB = sysconfig.get_paths()["stdlib"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = NearDedupConfig()


def stdlib_source(name: str) -> str:
    with open(os.path.join(STDLIB, name), encoding="utf-8") as f:
        return f.read()


MODULES = ["argparse.py", "textwrap.py", "csv.py", "fractions.py", "heapq.py", "shlex.py"]


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    return {m: stdlib_source(m) for m in MODULES}


def ref_shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    toks = [t for t in TOKEN_SPLIT.split(text) if t]
    if not toks:
        return set()
    if len(toks) < n:
        return {tuple(toks)}
    return {tuple(toks[k:k + n]) for k in range(len(toks) - n + 1)}


def ref_jaccard(a: str, b: str) -> float:
    sa, sb = ref_shingles(a), ref_shingles(b)
    return len(sa & sb) / len(sa | sb) if sa and sb else 0.0


def edit_lines(text: str, every: int, seed: int = 0) -> str:
    """Change one line in `every` (append a token), as a light edit of real code."""
    rng = np.random.default_rng(seed)
    lines = text.splitlines()
    for i in rng.choice(len(lines), size=max(1, len(lines) // every), replace=False):
        lines[i] += f"  # edited{i}"
    return "\n".join(lines)


# ------------------------------------------------------------------ tokens / shingles
def test_shingle_counts_match_python_reference(sources):
    for name, text in sources.items():
        got = shingle_set(text, 5)
        assert got.dtype == np.uint64
        assert np.all(np.diff(got.astype(np.float64)) >= 0) and len(np.unique(got)) == len(got)
        assert len(got) == len(ref_shingles(text)), name  # no collisions, same 5-grams


def test_exact_jaccard_matches_python_reference(sources):
    texts = list(sources.values())
    for a in texts[:3]:
        for b in (texts[3], edit_lines(a, 10)):
            assert jaccard(shingle_set(a, 5), shingle_set(b, 5)) == pytest.approx(ref_jaccard(a, b))


def test_separators_and_non_ascii():
    base = shingle_set("def foo(bar, baz): return qux_1 + 2", 5)
    assert np.array_equal(base, shingle_set("def  foo\t(bar ,baz)\n:return qux_1+2", 5))
    # non-ASCII characters are word characters (as TOKEN_SPLIT says): never a separator
    assert not np.array_equal(base, shingle_set("def\u00e9foo\u20acbar\u4e2dbaz return qux_1 \U0001f600 2", 5))
    text = "d\u00e9f caf\u00e9(\u4e2d\u6587, x) \U0001f600 \u00e9"
    assert len(shingle_set(text, 5)) == len(ref_shingles(text)) == 2
    assert not np.array_equal(base, shingle_set("def foo(bar, baz): return qux_2 + 2", 5))
    assert not np.array_equal(base, shingle_set("def Foo(bar, baz): return qux_1 + 2", 5))  # case kept
    assert len(shingle_set("x\udcff y", 5)) == 1  # lone surrogates do not raise


def test_short_and_empty_docs():
    for text in ["", "   \n\t", "+-*/()"]:
        assert len(shingle_set(text, 5)) == 0
    assert len(shingle_set("\u00e9\u00e8 \u4e2d\u6587", 5)) == 1   # two words, one shingle
    for k in range(1, 5):
        toks = " ".join(f"tok{i}" for i in range(k))
        s = shingle_set(toks, 5)
        assert len(s) == 1
        assert np.array_equal(s, shingle_set("(" + toks.replace(" ", ", ") + ")", 5))
    assert not np.array_equal(shingle_set("a b", 5), shingle_set("b a", 5))
    assert not np.array_equal(shingle_set("a b", 5), shingle_set("a b c", 5))
    assert len(shingle_set("a b c d e", 5)) == 1 and len(shingle_set("a b c d e f", 5)) == 2
    assert len(shingle_set("a b c d e f", 3)) == 4


def test_files_that_differ_only_in_non_ascii_text_are_not_near_duplicates():
    """Translations (docutils' fa.py and ar.py in the default corpus: the same keys, other
    words) and code whose identifiers are non-ASCII are different documents; with non-ASCII
    characters as separators they were the same ASCII skeleton, Jaccard 1.0, and one was
    removed."""
    zh = "MESSAGES = {\n" + "".join(f'    "m{i}": "\u4f60\u597d\u4e16\u754c {i}",\n' for i in range(30)) + "}\n"
    ja = "MESSAGES = {\n" + "".join(f'    "m{i}": "\u3053\u3093\u306b\u3061\u306f {i}",\n' for i in range(30)) + "}\n"
    ru = 'def \u043f\u0440\u0438\u0432\u0435\u0442(\u0438\u043c\u044f):\n    return "\u0417\u0434\u0440\u0430\u0432\u0441\u0442\u0432\u0443\u0439" + \u0438\u043c\u044f\n'
    gr = 'def \u03b3\u03b5\u03b9\u03ac(\u03cc\u03bd\u03bf\u03bc\u03b1):\n    return "\u0393\u03b5\u03b9\u03ac" + \u03cc\u03bd\u03bf\u03bc\u03b1\n'
    for a, b in ((zh, ja), (ru, gr)):
        got = jaccard(shingle_set(a, 5), shingle_set(b, 5))
        assert got == pytest.approx(ref_jaccard(a, b)) and got < 0.7
    assert near_dedup([zh, ja, ru, gr], CFG).removed == 0
    assert near_dedup([zh, zh.replace("m3", "m33"), ru], CFG).removed == 1   # still found


def test_long_tokens_distinct():
    toks = ["x" * k for k in (7, 8, 9, 15, 16, 17, 63, 64, 65, 200, 201)]
    # same length, differing only in the last byte: every 8-byte chunk and the >64 path count
    toks += ["x" * k + c for k in (8, 20, 40, 63, 64, 100, 300) for c in "ab"]
    sets = [shingle_set(t, 5) for t in toks]
    assert len({s.tobytes() for s in sets}) == len(toks)
    assert np.array_equal(shingle_set("y" * 300 + " z", 5), shingle_set("y" * 300 + "\nz", 5))


def test_batching_does_not_change_shingles(sources, monkeypatch):
    texts = list(sources.values()) + ["", "a b", "z" * 5000]
    one = [shingle_set(t, 5) for t in texts]
    monkeypatch.setattr(ndh, "_SLICE", 97)  # slice long docs at separators
    monkeypatch.setattr(nd, "_BATCH_BYTES", 3000)
    many = shingle_sets(texts, 5)
    assert all(np.array_equal(a, b) for a, b in zip(one, many))


def test_hashes_stable_across_processes(sources):
    """No Python hash(): a fresh interpreter with another hash seed gives the same bytes."""
    text = sources["heapq.py"]
    code = ("import sys, hashlib; from stages.near_dedup import shingle_set, signatures, NearDedupConfig;"
            "t = open(sys.argv[1]).read();"
            "print(hashlib.sha1(shingle_set(t, 5).tobytes() + signatures([t], NearDedupConfig()).tobytes())"
            ".hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", code, os.path.join(STDLIB, "heapq.py")],
                         capture_output=True, text=True, env=env, check=True).stdout.strip()
    local = hashlib.sha1(shingle_set(text, 5).tobytes() + signatures([text], CFG).tobytes()).hexdigest()
    assert out == local


# ------------------------------------------------------------------ MinHash signatures
def brute_signature(text: str, cfg: NearDedupConfig) -> np.ndarray:
    a, b = ndh.perm_params(cfg.seed, cfg.num_perm)
    x = (shingle_set(text, cfg.ngram) >> np.uint64(32)).astype(np.uint64)
    h = (a.astype(np.uint64)[:, None] * x[None, :] + b.astype(np.uint64)[:, None]) & np.uint64(0xFFFFFFFF)
    return np.minimum(h.min(axis=1), np.uint64(0xFFFFFFFE)).astype(np.uint32)


def test_signatures_match_bruteforce_and_tiling(sources, monkeypatch):
    texts = [sources["argparse.py"], "a b", "", sources["heapq.py"], "+++"]
    monkeypatch.setattr(nd, "_CHUNK_ELEMS", 1000)  # docs span many tiles
    sigs = signatures(texts, CFG)
    assert sigs.shape == (5, 256) and sigs.dtype == np.uint32
    for i in (0, 1, 3):
        assert np.array_equal(sigs[i], brute_signature(texts[i], CFG))
    assert np.all(sigs[[2, 4]] == ndh.SENTINEL)
    assert not np.any(sigs[[0, 1, 3]] == ndh.SENTINEL)
    other_seed = signatures(texts[:1], NearDedupConfig(seed=7))
    assert not np.array_equal(other_seed[0], sigs[0])


def test_sentinel_reserved_for_empty_docs():
    sh = np.array([0xFFFFFFFF00000000, 0xFFFFFFFF00000001], dtype=np.uint64)
    a = np.array([1, 3], dtype=np.uint32)
    b = np.array([0, 0], dtype=np.uint32)
    sig = nd._minhash(sh, np.array([0, 2, 2]), a, b)
    assert sig[0].tolist() == [0xFFFFFFFE, 0xFFFFFFFD]  # a real min of 2^32-1 is clamped
    assert sig[1].tolist() == [0xFFFFFFFF, 0xFFFFFFFF]  # no shingles: sentinel row


def test_signatures_independent_of_batching_and_workers(sources, monkeypatch):
    texts = [t for src in sources.values() for t in (src, edit_lines(src, 8), src[: len(src) // 3])]
    texts += ["", "x y"]
    ref = signatures(texts, CFG)
    monkeypatch.setattr(nd, "_BATCH_BYTES", 5000)
    assert np.array_equal(ref, signatures(texts, CFG))
    assert np.array_equal(ref, nd.parallel_signatures(texts, CFG, workers=2))
    assert np.array_equal(ref[7:], signatures(texts[7:], CFG))


def test_signature_agreement_estimates_jaccard(sources):
    a = sources["argparse.py"]
    for every in (3, 6, 20):
        b = edit_lines(a, every, seed=every)
        s = signatures([a, b], CFG)
        est = float(np.mean(s[0] == s[1]))
        true = jaccard(shingle_set(a, 5), shingle_set(b, 5))
        assert abs(est - true) < 4 * np.sqrt(true * (1 - true) / 256) + 0.01, (every, est, true)


# ------------------------------------------------------------------ LSH
def test_candidate_pairs_shape_and_identity(sources):
    texts = [sources["csv.py"], sources["shlex.py"], sources["csv.py"], "", "", "a b", "a b"]
    pairs = candidate_pairs(signatures(texts, CFG), CFG)
    assert pairs.dtype == np.int64 and pairs.shape[1] == 2
    assert [tuple(p) for p in pairs] == [(0, 2), (5, 6)]  # empty docs never pair


def test_candidate_pairs_sorted_unique_and_bucket_cap(sources):
    texts = [sources["heapq.py"]] * 6 + [sources["csv.py"]]
    sigs = signatures(texts, CFG)
    pairs = candidate_pairs(sigs, CFG)
    assert len(pairs) == 15 and np.all(pairs[:, 0] < pairs[:, 1])
    codes = pairs[:, 0] * 7 + pairs[:, 1]
    assert np.all(np.diff(codes) > 0)
    capped = candidate_pairs(sigs, CFG, bucket_cap=2)
    assert set(map(tuple, capped)) == {(i, j) for i in (0, 1) for j in range(i + 1, 6)}
    assert len(candidate_pairs(sigs[:0], CFG)) == 0


def test_candidates_find_light_edits_not_unrelated(sources):
    a = sources["argparse.py"]
    texts = [a, edit_lines(a, 12), sources["fractions.py"], sources["textwrap.py"]]
    assert jaccard(shingle_set(texts[0], 5), shingle_set(texts[1], 5)) >= 0.75
    pairs = candidate_pairs(signatures(texts, CFG), CFG)
    assert [tuple(p) for p in pairs] == [(0, 1)]


# ------------------------------------------------------------------ verification / clusters
def test_verify_pairs_drops_below_threshold(sources):
    a = sources["textwrap.py"]
    texts = [a, edit_lines(a, 20), edit_lines(a, 1), sources["heapq.py"]]
    sets = {i: shingle_set(t, 5) for i, t in enumerate(texts)}
    pairs = np.array([[0, 1], [0, 2], [0, 3], [1, 2]])
    kept, jac = verify_pairs(pairs, sets, 0.7)
    expect = [(i, j) for i, j in pairs if ref_jaccard(texts[i], texts[j]) >= 0.7]
    assert [tuple(p) for p in kept] == expect == [(0, 1)]
    assert jac[0] == pytest.approx(ref_jaccard(texts[0], texts[1]))
    lines = a.splitlines()  # overlapping windows: Jaccard just under / over 0.7
    w = {i: shingle_set("\n".join(lines[k:k + 300]), 5) for i, k in enumerate((0, 40, 80))}
    j01, j02 = jaccard(w[0], w[1]), jaccard(w[0], w[2])
    assert j01 >= 0.7 > j02 > 0.5
    kept, jac = verify_pairs(np.array([[0, 1], [0, 2]]), w, 0.7)
    assert kept.tolist() == [[0, 1]] and jac.tolist() == [j01]
    assert verify_pairs(np.array([[0, 2]]), w, j02)[0].tolist() == [[0, 2]]  # >= threshold kept
    k0, j0 = verify_pairs(np.zeros((0, 2), np.int64), sets, 0.7)
    assert k0.shape == (0, 2) and len(j0) == 0


def test_cluster_star_no_chaining():
    # 0~1, 1~2 (0 !~ 2), 3~4, 4 also ~ 0: star from lowest index, no transitive merges
    rep = cluster(6, np.array([[0, 1], [1, 2], [3, 4], [0, 4]]))
    assert rep.tolist() == [0, 0, 2, 3, 0, 5]
    assert cluster(3, np.zeros((0, 2), np.int64)).tolist() == [0, 1, 2]


def chain_docs(sources) -> list[str]:
    lines = sources["argparse.py"].splitlines()
    return ["\n".join(lines[k:k + 1000]) for k in (0, 150, 300)]


def test_near_dedup_chain_gives_star_clusters(sources):
    a, b, c = chain_docs(sources)
    sa, sb, sc = (shingle_set(t, 5) for t in (a, b, c))
    assert jaccard(sa, sb) >= 0.7 and jaccard(sb, sc) >= 0.7 and jaccard(sa, sc) < 0.7
    res = near_dedup([a, b, c], CFG)
    assert res.rep.tolist() == [0, 0, 2]
    assert res.verified == 2 and res.removed == 1


def test_near_dedup_end_to_end(sources):
    mods = list(sources.values())
    chain = chain_docs(sources)
    texts = mods + [mods[1], edit_lines(mods[2], 15), "", "", "tiny doc", "tiny  doc!", *chain]
    n = len(texts)
    res1 = near_dedup(texts, CFG, workers=1)
    res2 = near_dedup(texts, CFG, workers=2)
    assert np.array_equal(res1.rep, res2.rep)
    rep = res1.rep
    assert rep[6] == 1 and rep[7] == 2  # exact copy, light edit
    assert rep[8] == 8 and rep[9] == 9  # zero-token docs are left to exact dedup
    assert rep[11] == 10
    assert rep[13] == 12 and rep[14] == 14  # chain: no transitive removal
    assert all(rep[i] == i for i in range(6))  # unrelated modules kept
    sets = shingle_sets(texts, 5)
    for i in range(n):  # every removed doc is a direct near-dup of a kept representative
        if rep[i] != i:
            assert rep[rep[i]] == rep[i] and rep[i] < i
            assert jaccard(sets[i], sets[rep[i]]) >= CFG.threshold
    assert res1.removed == 4 and res1.largest_cluster == 2 and res1.cluster_sizes == {2: 4}


# ------------------------------------------------------------------ banding
def test_choose_bands():
    b, r = choose_bands(0.7, 256)
    assert (b, r) == (32, 8)
    assert choose_bands(0.7, 256, 0.5, 0.5) == (25, 10)  # datasketch's default weighting
    for t in (0.5, 0.7, 0.9):
        for k in (64, 128, 256):
            b, r = choose_bands(t, k)
            assert b * r <= k
            def hit(s):
                return 1 - (1 - s ** r) ** b
            # S-curve: near-certain above the threshold, unlikely well below it
            assert hit(min(t + 0.1, 1.0)) > 0.95 and hit(t) > 0.75 and hit(t - 0.3) < 0.3
    assert choose_bands(0.9, 256)[1] > choose_bands(0.5, 256)[1]  # higher threshold, longer bands
    assert NearDedupConfig(bands=16, rows=16).band_rows() == (16, 16)
    with pytest.raises(ValueError):
        NearDedupConfig(bands=30, rows=10).band_rows()


def test_choose_bands_matches_datasketch():
    lsh = pytest.importorskip("datasketch.lsh")
    for t in (0.5, 0.7, 0.85):
        for k in (128, 256):
            for w in ((0.5, 0.5), (0.1, 0.9)):
                assert choose_bands(t, k, *w) == lsh._optimal_param(t, k, *w)


# ------------------------------------------------------------------ helpers added for speed
def test_unique_sorted_matches_np_unique():
    rng = np.random.default_rng(1)
    for x in (np.zeros(0, np.uint64), np.array([5], np.uint64),
              rng.integers(0, 50, 1000).astype(np.uint64),
              rng.integers(0, 2**63, 1000, dtype=np.int64)):
        assert np.array_equal(nd.unique_sorted(x), np.unique(x))


def test_capped_triu_matches_triu_indices():
    for size in (2, 3, 7, 70):
        for cap in (1, 2, 5, 64, 256):
            iu, ju = nd._capped_triu(size, cap)
            ti, tj = np.triu_indices(size, 1)
            keep = ti < cap
            assert np.array_equal(iu, ti[keep]) and np.array_equal(ju, tj[keep]), (size, cap)


def test_bucket_over_default_cap_keeps_lowest_index_stars(sources):
    texts = [sources["heapq.py"]] * 70 + [sources["csv.py"]]
    pairs = candidate_pairs(signatures(texts, CFG), CFG)
    assert len(pairs) == sum(70 - 1 - i for i in range(64))  # rows 0..63 of the 70-clique
    assert pairs[:, 0].max() == 63 and pairs[:, 1].max() == 69
    res = near_dedup(texts, CFG)
    assert res.rep[:70].tolist() == [0] * 70 and res.rep[70] == 70


# ------------------------------------------------------------------ bench ground truth
def _load_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_dedup", os.path.join(REPO, "bench", "dedup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_ground_truth_is_all_pairs_exact(sources):
    pytest.importorskip("scipy")
    bench = _load_bench()
    lines = sources["argparse.py"].splitlines()
    texts = ["\n".join(lines[k:k + 400]) for k in range(0, 1200, 60)]  # overlapping windows
    texts += [edit_lines(t, e, seed=e) for t in list(sources.values())[:3] for e in (2, 5, 30)]
    texts += ["", "a b", "a b", "+-"]
    sets = shingle_sets(texts, 5)
    n = len(texts)
    brute = sorted(i * n + j for i in range(n) for j in range(i + 1, n)
                   if jaccard(sets[i], sets[j]) >= 0.7)
    assert 5 < len(brute) < n * (n - 1) // 2
    got = bench.ground_truth(sets, 0.7, block=7)
    assert got.tolist() == brute
    labels = np.array([0, 0, 2, 0, 4], dtype=np.int64)
    valid = np.array([True, True, True, False, True])
    assert bench.cluster_pairs(labels, valid).tolist() == [0 * 5 + 1]
