"""Rows of stored keys bigger than memory, in a shuffled order, one shard-sized read at a time.

    data = store.features(t=10, block="mid", pool=2, split="train").to_torch_dataset(shuffle=True, seed=0)
    for x, y in torch.utils.data.DataLoader(data, batch_size=256, num_workers=2): ...

`buffers` is the one mechanism (the probe's Feed streams through it too): whole chunks (a store shard each: one
object, read through the checked reader) in a seeded shuffled order, gathered into a buffer of about `buffer_rows`
rows that is shuffled in memory (a seeded shuffle buffer), so memory stays at the buffer whatever the key's size.
ShardStream makes it a torch IterableDataset: with DataLoader workers each reads its own shards (dealt
round-robin), so every row comes exactly once an epoch; set_epoch(e) draws a new order.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, TypeVar

import numpy as np

from .errors import DiffstoreError, require

T = TypeVar("T")


def ahead(items: Iterator[T]) -> Iterator[T]:
    """The items of an iterator, each produced in a background thread while the caller uses the one before."""
    done = object()
    with ThreadPoolExecutor(1, thread_name_prefix="diffstore-feed") as ex:
        pending = ex.submit(next, items, done)
        while (item := pending.result()) is not done:
            pending = ex.submit(next, items, done)
            yield item


def buffers(reads: list[Callable[[slice], np.ndarray]], labels: np.ndarray, keep: np.ndarray, chunk_rows: int,
            buffer_rows: int, rng: np.random.Generator | None = None, chunks: list[int] | None = None) -> Iterator:
    """(list of float32 row arrays, one per read; their labels) buffers covering the rows where `keep` is True,
    read chunk by chunk (shuffled, and rows shuffled within each buffer, when rng is given)."""
    if chunks is None:
        chunks = [c for c in range(-(-len(keep) // chunk_rows)) if keep[c * chunk_rows:(c + 1) * chunk_rows].any()]
    if rng is not None:
        chunks = list(chunks)
        rng.shuffle(chunks)
    per_buffer = max(1, buffer_rows // chunk_rows)
    for g in range(0, len(chunks), per_buffer):  # one read per source and buffer: its shards read concurrently
        rows = np.concatenate([c * chunk_rows + np.flatnonzero(keep[c * chunk_rows:(c + 1) * chunk_rows])
                               for c in chunks[g:g + per_buffer]])
        buf_x = [np.asarray(read(rows), np.float32) for read in reads]
        buf_y = labels[rows]
        if rng is not None:
            perm = rng.permutation(len(buf_y))
            buf_x, buf_y = [b[perm] for b in buf_x], buf_y[perm]
        yield buf_x, buf_y


def shard_stream(array, labels: np.ndarray, rows: int | None = None, shuffle: bool = True, buffer: int = 8192,
                 seed: int = 0, batch_size: int | None = None):
    """A ShardStream over a ShardedArray's rows [0, rows) (every shard holding them must be done)."""
    torch = require("torch")

    class ShardStream(torch.utils.data.IterableDataset):
        """(x float32 [C, H, W], label int64) per row, or per batch of `batch_size` rows when it is given."""

        def __init__(self):
            self.n = array.n_rows if rows is None else rows
            array.require_done(self.n)
            self.epoch = 0

        def __len__(self) -> int:
            return self.n if batch_size is None else -(-self.n // batch_size)

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            chunks = list(range(-(-self.n // array.shard_rows)))
            if info is not None:  # each worker reads its own shards
                chunks = chunks[info.id::info.num_workers]
            rng = np.random.default_rng([seed, self.epoch, info.id if info else 0]) if shuffle else None
            keep = np.ones(self.n, bool)
            read = lambda rows: array.read(rows, np.float32)  # noqa: E731
            for (x,), y in ahead(buffers([read], labels[:self.n], keep, array.shard_rows, buffer, rng, chunks)):
                if batch_size is None:
                    for i in range(len(y)):
                        yield torch.from_numpy(x[i]), int(y[i])
                else:
                    for i in range(0, len(y), batch_size):
                        yield torch.from_numpy(x[i:i + batch_size]), torch.from_numpy(y[i:i + batch_size])

    if buffer < 1 or (batch_size is not None and batch_size < 1):
        raise DiffstoreError(f"buffer= and batch_size= take a number of rows >= 1, got {buffer} and {batch_size}")
    return ShardStream()
