"""Hamming ranking of a database for a chunk of queries.

Tie rule: items at the same Hamming distance are ranked by database index,
smallest first (a stable sort), so results never depend on the sort routine.

Two kernels give the same ranking:
- packed (CPU, codes all +-1): codes are packed into 64-bit words and
  distances are XOR + popcount (NumPy's ``bitwise_count``; torch has no
  popcount), computed in cache-sized blocks; only items under a per-query
  distance threshold are kept and sorted.
- dense (any device, any real codes, e.g. mainstay codes with 0 bits):
  2 x Hamming = K - <q, d>, then a stable top-k on the key (distance, index).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from collections import deque

import numpy as np
import torch

# Working memory per query chunk, and per distance block (kept in cache).
CHUNK_BYTES = 64 * 2**20
CACHE_BYTES = 4 * 2**20


def is_binary(codes: torch.Tensor) -> bool:
    return bool(((codes == 1) | (codes == -1)).all())


def pack_codes(codes: torch.Tensor) -> np.ndarray:
    """+-1 codes N x K -> W x N uint64 words (bit set where the code is +1)."""
    bits = (codes.detach().cpu() > 0).numpy()
    n, k = bits.shape
    words = (k + 63) // 64
    padded = np.zeros((n, words * 64), dtype=bool)
    padded[:, :k] = bits
    packed = np.packbits(padded.reshape(n, words, 64), axis=2, bitorder="little")
    return np.ascontiguousarray(packed.view(np.uint64).reshape(n, words).T)


def _packed_distances(q_words: np.ndarray, db_words: np.ndarray, xor=None, out=None) -> np.ndarray:
    """Hamming distances Q x N from packed W x Q and W x N words.

    ``xor`` (uint64) and ``out`` are optional preallocated Q x N buffers.
    """
    w, n = db_words.shape
    q = q_words.shape[1]
    dtype = np.uint8 if w * 64 < 255 else np.uint16
    xor = np.empty((q, n), dtype=np.uint64) if xor is None else xor[:, :n]
    dist = np.empty((q, n), dtype=dtype) if out is None else out[:, :n]
    for j in range(w):
        np.bitwise_xor(q_words[j, :, None], db_words[j, None, :], out=xor)
        if j == 0:
            np.bitwise_count(xor, out=dist)
        else:
            dist += np.bitwise_count(xor).astype(dtype)
    return dist


def _packed_topk(q_words: np.ndarray, db_words: np.ndarray, k: int, block: int) -> np.ndarray:
    """Indices (Q x k) of the k nearest items per query, ties by index.

    A per-query distance threshold is read off a strided sample of the
    database (a little above the k-th quantile); distances are then computed
    block by block (in cache) and only items at or under the threshold are
    kept, as (query, index, distance) triples. One stable sort of the triples
    by (query, distance) gives the ranking. A query whose threshold let fewer
    than k items through is re-ranked over the whole database.
    """
    q, n = q_words.shape[1], db_words.shape[1]
    if k >= n:
        return np.argsort(_packed_distances(q_words, db_words), axis=1, kind="stable")
    stride = max(1, n // 4096)
    sample = _packed_distances(q_words, np.ascontiguousarray(db_words[:, ::stride]))
    s = sample.shape[1]
    rank = min(s - 1, int(1.25 * k * s / n) + 8)
    thr = np.partition(sample, rank, axis=1)[:, rank : rank + 1]

    xor = np.empty((q, block), dtype=np.uint64)
    dist = np.empty((q, block), dtype=sample.dtype)
    rows, cols, dists = [], [], []
    for b in range(0, n, block):
        width = min(block, n - b)
        d = _packed_distances(q_words, db_words[:, b : b + width], xor, dist)
        flat = np.flatnonzero(d <= thr)
        r, c = np.divmod(flat, width)
        rows.append(r)
        cols.append(c + b)
        dists.append(d.ravel()[flat])
    rows, cols, dists = np.concatenate(rows), np.concatenate(cols), np.concatenate(dists)
    # Triples come ordered by (block, query, index): a stable sort on
    # (query, distance) leaves equal distances in index order. A uint16 key
    # lets NumPy use its radix sort.
    levels = 64 * db_words.shape[0] + 1  # distances lie in [0, 64 W]
    key = rows * levels + dists
    if q * levels < 2**16:
        key = key.astype(np.uint16)
    cols = cols[np.argsort(key, kind="stable")]
    counts = np.bincount(rows, minlength=q)
    starts = np.cumsum(counts) - counts
    out = np.empty((q, k), dtype=np.int64)
    ok = np.flatnonzero(counts >= k)
    out[ok] = cols[starts[ok, None] + np.arange(k)]
    for i in np.flatnonzero(counts < k):
        full = _packed_distances(q_words[:, i : i + 1], db_words)[0]
        out[i] = np.argsort(full, kind="stable")[:k]
    return out


def _dense_topk(q: torch.Tensor, db: torch.Tensor, k: int) -> torch.Tensor:
    """Stable top-k on key = (K - <q, d>) * N + index, computed on db's device."""
    n, bits = db.shape
    twice_hamming = (bits - q @ db.T).round().to(torch.int64)
    key = twice_hamming * n + torch.arange(n, device=db.device)
    return torch.topk(key, k, dim=1, largest=False, sorted=True).indices


class Ranker:
    """Ranks the database for query chunks: ``ranker.starts`` lists the chunk
    starts, ``ranker(start)`` returns the chunk's top-k indices (Q x k int64)."""

    def __init__(self, query_codes: torch.Tensor, db_codes: torch.Tensor, top_k: int | None = None) -> None:
        n = db_codes.shape[0]
        self.k = n if top_k is None or top_k <= 0 else min(top_k, n)
        self.packed = db_codes.device.type == "cpu" and is_binary(db_codes) and is_binary(query_codes)
        if self.packed:
            self.db = pack_codes(db_codes)
            self.chunk = max(1, min(64, CHUNK_BYTES // (16 * n)))
            self.block = max(1024, CACHE_BYTES // (9 * self.chunk))  # uint64 XOR + distances of a block
        else:
            self.db = db_codes.to(torch.float32)
            self.chunk = max(1, min(256, CHUNK_BYTES // (16 * n)))
        self.queries = query_codes
        self.starts = range(0, len(query_codes), self.chunk)

    def __call__(self, start: int) -> np.ndarray:
        q = self.queries[start : start + self.chunk]
        if self.packed:
            return _packed_topk(pack_codes(q), self.db, self.k, self.block)
        return _dense_topk(q.to(self.db.device, torch.float32), self.db, self.k).cpu().numpy()


def map_chunks(fn, starts):
    """``fn`` over chunk starts, in order, one thread per core (NumPy and torch
    kernels release the GIL). At most one chunk per thread runs ahead of the
    consumer: results of a full ranking are Q x N, and letting them pile up
    would make memory grow with the number of queries and the database."""
    workers = max(1, torch.get_num_threads())
    with ThreadPoolExecutor(workers) as pool:
        ahead: deque = deque()
        for s in starts:
            ahead.append((s, pool.submit(fn, s)))
            if len(ahead) > workers:
                first, future = ahead.popleft()
                yield first, future.result()
        while ahead:
            first, future = ahead.popleft()
            yield first, future.result()


def rank_database(query_codes: torch.Tensor, db_codes: torch.Tensor, top_k: int | None = None):
    """Yield ``(start, indices)`` per query chunk: the top_k database indices of
    queries ``start : start + len(indices)`` in ranking order (int64 tensor)."""
    ranker = Ranker(query_codes, db_codes, top_k)
    for s, idx in map_chunks(ranker, ranker.starts):
        yield s, torch.from_numpy(idx)
