"""Rows of feature arrays, fed to heads in batches: from RAM when they fit, else streamed chunk-wise from the store.

A Rows is anything readable by row slices and index arrays (a numpy array, a store ShardedArray, a fusion of
several). A Feed serves batches from several Rows of the same samples at once, so one pass over the data trains
many heads side by side. Streaming keeps memory bounded: chunks (store shards) are visited in a seeded shuffled
order and read in groups (one read per source, the next group in a background thread while the current one is
used) into a buffer that is shuffled before batching; the remainder carries over, so every batch but the epoch's
last is full.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DiffstoreError
from ..stream import ahead, buffers

DEFAULT_BUDGET = 2 << 30  # bytes of float32 rows a Feed may hold in RAM; above it, rows stream chunk-wise


@dataclass
class Rows:
    """Rows [N, *row_shape] readable by slices and index arrays (any dtype; a store array reads float32, decoded
    straight into it); chunk_rows is the read unit (a store shard)."""

    n_rows: int
    row_shape: tuple
    chunk_rows: int
    read: Callable[[slice], np.ndarray]

    @classmethod
    def of(cls, array, chunk_rows: int | None = None) -> "Rows":
        """A numpy array in RAM, or a store ShardedArray (read shard by shard)."""
        if isinstance(array, np.ndarray):
            return cls(len(array), tuple(array.shape[1:]), chunk_rows or 4096, lambda sl: array[sl])
        return cls(array.n_rows, tuple(array.shape[1:]), array.shard_rows, lambda rows: array.read(rows, np.float32))

    def nbytes(self, n: int | None = None) -> int:
        return (self.n_rows if n is None else n) * int(np.prod(self.row_shape)) * 4


def first_rows(rows: Rows, n: int | None) -> Rows:
    """The first n rows (probe --limit); all of them when n is None or not smaller."""
    if n is None or n >= rows.n_rows:
        return rows
    return Rows(n, rows.row_shape, rows.chunk_rows, rows.read)  # readers never slice past n_rows


def first_labels(record, n: int | None):
    """A split record (ids, labels) cut to its first n rows, to match first_rows."""
    return record if n is None else replace(record, ids=record.ids[:n], labels=record.labels[:n])


def fuse_rows(parts: list[Rows]) -> Rows:
    """Several feature arrays of the same samples as one, channels concatenated. Maps of different sizes are
    first average-pooled to the smallest one, so the fusion stays a spatial map every head can read."""
    if len({p.n_rows for p in parts}) > 1:
        raise DiffstoreError(f"--fuse needs arrays of the same samples; row counts differ: {[p.n_rows for p in parts]}")
    side = min(min(p.row_shape[1:]) for p in parts)

    def pooled(x: np.ndarray) -> np.ndarray:
        if x.shape[2:] == (side, side):
            return x
        return F.adaptive_avg_pool2d(torch.from_numpy(np.asarray(x, np.float32)), side).numpy()

    def read(sl):
        return np.concatenate([pooled(p.read(sl)) for p in parts], 1)

    return Rows(parts[0].n_rows, (sum(p.row_shape[0] for p in parts), side, side), parts[0].chunk_rows, read)


def split_val(n: int, val_frac: float, seed: int, views: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(train positions, val positions), both sorted: a seeded carve of the training split's samples. With views
    (rows sample-major, `views` per sample, the identity first: extract --views), a sample's views all go to one
    side: every view of a training sample trains, only the identity of a validation sample validates."""
    samples = n // views
    order = np.random.default_rng([seed, 7]).permutation(samples)
    n_val = int(round(samples * val_frac))
    fit, val = np.sort(order[n_val:]), np.sort(order[:n_val])
    return (fit[:, None] * views + np.arange(views)).ravel(), val * views


class Feed:
    """Batches from several Rows that share labels and sample order (side-by-side heads), restricted to
    `positions`. Held in RAM (on the device) when they fit the budget; otherwise streamed: chunks in a seeded
    shuffled order, read in groups into a buffer that is shuffled before batching."""

    def __init__(self, sources: list[Rows], labels: np.ndarray, positions: np.ndarray, batch_size: int,
                 device: torch.device, budget: int = DEFAULT_BUDGET):
        for r in sources:
            if r.n_rows != len(labels):
                raise DiffstoreError(f"features have {r.n_rows} rows but there are {len(labels)} labels: "
                                     "the array and the split's labels do not match; re-extract the array")
        self.sources, self.labels, self.positions = sources, labels, np.asarray(positions)
        self.batch_size, self.device = batch_size, device
        row_bytes = sum(r.nbytes(1) for r in sources)
        self.buffer_rows = max(batch_size, budget // 4 // max(row_bytes, 1))
        self.cache = None
        if row_bytes * len(self.positions) <= budget:
            self.cache = [self._tensor(r.read(self.positions)) for r in sources]
            self.cache_y = torch.from_numpy(labels[self.positions]).to(device)

    def __len__(self):
        return len(self.positions)

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.float32)).to(self.device)

    def batches(self, rng: np.random.Generator | None = None):
        """(list of x per source, y): shuffled when rng is given, else every position in order."""
        bs = self.batch_size
        if self.cache is not None:
            order = rng.permutation(len(self)) if rng is not None else np.arange(len(self))
            order = torch.from_numpy(order).to(self.device)
            for i in range(0, len(self), bs):
                idx = order[i:i + bs]
                yield [c[idx] for c in self.cache], self.cache_y[idx]
            return
        keep = np.zeros(len(self.labels), bool)
        keep[self.positions] = True
        carry_x, carry_y = [np.empty((0, *r.row_shape), np.float32) for r in self.sources], np.empty(0, np.int64)
        groups = buffers([r.read for r in self.sources], self.labels, keep, self.sources[0].chunk_rows,
                         self.buffer_rows, rng)
        for xs, ys in ahead(groups):  # the next group is read while this one's batches are used
            buf_x = [np.concatenate([cx, x]) if len(cx) else x for cx, x in zip(carry_x, xs)]
            buf_y = np.concatenate([carry_y, ys])
            n_full = len(buf_y) // bs * bs
            for i in range(0, n_full, bs):
                yield [self._tensor(b[i:i + bs]) for b in buf_x], torch.from_numpy(buf_y[i:i + bs]).to(self.device)
            carry_x, carry_y = [b[n_full:] for b in buf_x], buf_y[n_full:]
        if len(carry_y):
            yield [self._tensor(b) for b in carry_x], torch.from_numpy(carry_y).to(self.device)

    def channel_stats(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-channel mean and std of each source over these positions (float64 sums: float16 inputs)."""
        s = [0.0] * len(self.sources)
        s2 = [0.0] * len(self.sources)
        for xs, _ in self.batches():
            for i, x in enumerate(xs):
                x = x.double().transpose(0, 1).flatten(1)
                s[i] = s[i] + x.sum(1)
                s2[i] = s2[i] + (x * x).sum(1)
        out = []
        for i, r in enumerate(self.sources):
            n = len(self) * int(np.prod(r.row_shape[1:]))
            mean = s[i] / n
            out.append((mean.float().cpu(), (s2[i] / n - mean * mean).clamp_min(0).sqrt().float().cpu()))
        return out
