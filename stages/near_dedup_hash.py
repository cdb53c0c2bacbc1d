"""Vectorised tokenising and shingle hashing for near_dedup (numpy, no Python per token).

Hashes depend only on the bytes of a text (never on its position in a batch, the
process, or PYTHONHASHSEED), so signatures are reproducible across runs and workers.
"""
from __future__ import annotations

import hashlib
import re
from typing import Sequence

import numpy as np

SENTINEL = np.uint32(0xFFFFFFFF)  # signature value reserved for documents without tokens

_M64 = (1 << 64) - 1

_MUL = np.uint64(0xD6E8FEB86659FD93)  # combines 8-byte chunks / token hashes
_LEN_K = 0xC2B2AE3D27D4EB4F
_LONG = 64  # tokens longer than this are hashed one by one (rare: data blobs)
_SLICE = 1 << 20  # bytes tokenised at once
# A separator byte (near_dedup.TOKEN_SPLIT): ASCII other than [A-Za-z_0-9]. Every byte of a
# non-ASCII character's UTF-8 is >= 0x80, a word byte: a token never splits a character.
_SEP = re.compile(rb"[^A-Za-z_0-9\x80-\xff]")
_TAIL_MASK = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [_M64], dtype=np.uint64)


def splitmix64(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (returns a new array)."""
    h = h + np.uint64(0x9E3779B97F4A7C15)
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h


def _splitmix_int(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & _M64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return state, z ^ (z >> 31)


def perm_params(seed: int, num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """uint32 (a odd, b) for the hash family h(x) = a*x + b mod 2^32, from the seed only."""
    state = seed & _M64
    vals = []
    for _ in range(num_perm):
        state, z = _splitmix_int(state)
        vals.append(z)
    v = np.array(vals, dtype=np.uint64)
    a = ((v & np.uint64(0xFFFFFFFF)) | np.uint64(1)).astype(np.uint32)
    b = (v >> np.uint64(32)).astype(np.uint32)
    return a, b


def _word_mask(buf: np.ndarray) -> np.ndarray:
    # Arithmetic class test: several times faster than a 256-entry lookup table.
    low = buf | np.uint8(0x20)
    low -= np.uint8(97)
    w = low < 26
    np.subtract(buf, np.uint8(48), out=low)
    w |= low < 10
    w |= buf == 95
    w |= buf >= 0x80   # UTF-8 of a non-ASCII character
    return w


def token_hashes(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Token start offsets and 64-bit token hashes of `raw`, which must begin and end
    with a separator byte.  A hash depends only on the token's bytes.  Long inputs
    are processed in slices cut at separators, bounding the per-byte arrays."""
    if len(raw) <= _SLICE:
        return _token_hashes(raw, 0)
    starts, hashes, lo = [], [], 0
    while lo < len(raw) - 1:
        m = _SEP.search(raw, min(lo + _SLICE, len(raw) - 1))
        hi = m.start() if m else len(raw) - 1
        s, h = _token_hashes(raw[lo:hi + 1], lo)  # slices overlap on one separator byte
        starts.append(s)
        hashes.append(h)
        lo = hi
    return np.concatenate(starts), np.concatenate(hashes)


def _token_hashes(raw: bytes, offset: int) -> tuple[np.ndarray, np.ndarray]:
    buf = np.frombuffer(raw + bytes(8), dtype=np.uint8)  # 8 pad bytes for the 8-byte loads
    w = _word_mask(buf)
    edges = np.flatnonzero(w[1:] != w[:-1]) + 1  # alternating token start / end
    del w
    starts, ends = edges[0::2], edges[1::2]
    n = ends - starts
    # Unaligned little-endian 8-byte loads at any offset.
    words = np.ndarray(shape=(len(buf) - 7,), dtype="<u8", buffer=buf, strides=(1,))
    h = words[starts] & _TAIL_MASK[np.minimum(n, 8)]
    h ^= n.astype(np.uint64) * np.uint64(_LEN_K)
    act = np.flatnonzero((n > 8) & (n <= _LONG))
    k = 8
    while len(act):
        rest = n[act] - k
        h[act] = h[act] * _MUL + (words[starts[act] + k] & _TAIL_MASK[np.minimum(rest, 8)])
        k += 8
        act = act[rest > 8]
    h = splitmix64(h)
    for i in np.flatnonzero(n > _LONG).tolist():
        tok = raw[starts[i]:ends[i]]
        h[i] = int.from_bytes(hashlib.blake2b(tok, digest_size=8).digest(), "little")
    return starts + offset, h


def _combine(th: np.ndarray, first: np.ndarray | None, m: int, count: int = 0) -> np.ndarray:
    """Hash of m consecutive token hashes starting at each index of `first`
    (or at every index 0..count-1 when first is None: contiguous slices, no gathers)."""
    if first is None:
        h = th[:count].copy()
        for j in range(1, m):
            h *= _MUL
            h += th[j:j + count]
    else:
        h = th[first]
        for j in range(1, m):
            h *= _MUL
            h += th[first + j]
    h ^= np.uint64(m * _LEN_K & _M64)
    return splitmix64(h)


def batch_shingles(texts: Sequence[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """Shingle hashes of several texts: (hashes, starts) where doc d owns
    hashes[starts[d]:starts[d+1]] (in token order, not deduplicated).

    A doc with 1 <= tokens < ngram gets one shingle over all its tokens; a doc
    with no tokens gets none."""
    nd = len(texts)
    enc = [t.encode("utf-8", "surrogatepass") for t in texts]
    lens = np.fromiter((len(e) for e in enc), dtype=np.int64, count=nd)
    raw = b"\n" + b"\n".join(enc) + b"\n"
    del enc
    doc_start = np.ones(nd, dtype=np.int64)
    if nd > 1:
        doc_start[1:] += np.cumsum(lens[:-1] + 1)
    tok_start, th = token_hashes(raw)
    del raw
    T = len(th)
    tok_lo = np.searchsorted(tok_start, doc_start)
    tok_hi = np.append(tok_lo[1:], T)
    cnt = tok_hi - tok_lo
    full = np.zeros(T, dtype=np.uint64)
    mask = np.zeros(T, dtype=bool)
    W = T - ngram + 1
    if W > 0:
        full[:W] = _combine(th, None, ngram, W)
        mask[:W] = True
        # Windows starting in a doc's last ngram-1 tokens cross into the next doc.
        for j in range(1, ngram):
            mask[tok_hi[tok_hi >= j] - j] = False
    short = (cnt > 0) & (cnt < ngram)
    for m in range(1, ngram):
        first = tok_lo[cnt == m]
        if len(first):
            full[first] = _combine(th, first, m)
            mask[first] = True
    n_sh = np.where(cnt >= ngram, cnt - ngram + 1, short.astype(np.int64))
    starts = np.zeros(nd + 1, dtype=np.int64)
    np.cumsum(n_sh, out=starts[1:])
    return full[mask], starts
