"""The train split as one canonical sequence of micro-batches per epoch, whatever the
number of workers, of which each rank reads only its share.

The order. A global batch (one optimizer step) is `streams` micro-batches of
`micro_batch` rows (`streams = global batch / micro_batch`, fixed for a run). The split's
rows are cut into chunks (a Parquet part each, or equal row ranges of a part when the split
has fewer parts than streams); every epoch the chunks are put in a seeded order and dealt
round-robin to the streams (stream s takes chunks s, s + streams, ...), and each chunk's
rows are permuted by a seed of their own. Micro-batch (step k, stream s) is rows
[k*B, (k+1)*B) of stream s's rows laid end to end. All of this is a function of the
dataset's parts, the seed, the epoch and (micro_batch, streams) only, so a global batch
holds the same rows on 1, 8 or 64 workers, and an epoch has the same steps
(`steps_per_epoch`: the shortest stream's full micro-batches; the longer streams' tails
are not trained on that epoch, and come first in another epoch's order).

The share. Rank r of W trains the micro-batches of streams r, r + W, ... (one per stream
per step, in stream order: its gradient accumulation), so it reads only those streams'
chunks: an epoch's bytes are the split once, whatever W, and bytes per rank fall as 1/W.
W need not divide `streams`: ranks then accumulate ceil or floor(streams / W)
micro-batches, and each micro-batch's loss is weighted by W / streams, so the step's
gradient is the same mean over the global batch on any W <= streams. The next chunk of
every stream is read and decoded ahead on a background thread (`prefetch`), so a step
waits for storage only when a chunk takes longer to read than the rank takes to train
on the one before; `RankReader.stats` counts bytes read and time blocked.

A position is (epoch, steps done in it): a resume, on any W, opens no chunk wholly before
it. Row counts come from the manifest (no footer is opened to plan an epoch); parts may be
a local folder or a URI (opened through data_prep.storage, the one resolver of data
locations), so a worker on any node reads them with the credentials its runtime
environment carries.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

PART_SALT = 0x5A17  # keeps the chunk order's stream apart from the row orders'
ORDER_VERSION = "streams-1"  # recorded in checkpoints: the rule above


@dataclass(frozen=True)
class Part:
    """One Parquet file of a split: where it is (a location any worker can open), its row
    count and its size in bytes (None when unknown)."""

    path: str
    rows: int
    size: int | None = None


@dataclass(frozen=True)
class Chunk:
    """Rows [start, stop) of part `part` (an index into the plan's parts)."""

    part: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def list_parts(location: str, manifest_files: list[dict[str, Any]] | None = None,
               prefix: str = "") -> list[Part]:
    """The split's Parquet files sorted by path, with row counts. `manifest_files` (the
    manifest's `splits[split]["files"]`: `path` relative to the dataset, `rows`, `size`)
    gives them without opening a file; without it each footer is read."""
    from data_prep.storage import open_location

    split = open_location(location)
    if manifest_files:
        return sorted((Part(split.join(f["path"].removeprefix(prefix)).uri, int(f["rows"]),
                            f.get("size")) for f in manifest_files), key=lambda p: p.path)
    import pyarrow.parquet as pq

    parts = []
    for f in split.list_files():
        if f.path.endswith(".parquet"):
            with f.open_input_file() as fh:
                parts.append(Part(f.uri, pq.ParquetFile(fh).metadata.num_rows, f.size()))
    return parts


@dataclass(frozen=True)
class BatchPlan:
    """The canonical micro-batch order of a split (module docstring)."""

    parts: tuple[Part, ...]
    micro_batch: int
    streams: int
    seed: int
    chunks: tuple[Chunk, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.micro_batch < 1 or self.streams < 1:
            raise ValueError("micro_batch and streams must be at least 1")
        per_part = max(1, math.ceil(self.streams / max(1, len(self.parts))))
        chunks = []
        for i, p in enumerate(self.parts):
            bounds = np.linspace(0, p.rows, per_part + 1).round().astype(int)
            chunks += [Chunk(i, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        object.__setattr__(self, "chunks", tuple(chunks))

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    def chunk_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, PART_SALT]).permutation(len(self.chunks))

    def stream_chunks(self, epoch: int, stream: int) -> list[int]:
        """Indices (into `chunks`) of stream `stream`'s chunks in `epoch`, in order."""
        return [int(c) for c in self.chunk_order(epoch)[stream::self.streams]]

    def steps_per_epoch(self, epoch: int) -> int:
        """Optimizer steps of `epoch`: full micro-batches of its shortest stream."""
        order = self.chunk_order(epoch)
        return min(sum(self.chunks[int(c)].rows for c in order[s::self.streams])
                   for s in range(self.streams)) // self.micro_batch

    def row_order(self, epoch: int, chunk: int) -> np.ndarray:
        c = self.chunks[chunk]
        return np.random.default_rng([self.seed, epoch, c.part, c.start]).permutation(c.rows)


def rank_streams(streams: int, rank: int, world: int) -> list[int]:
    """The streams rank `rank` of `world` trains: rank, rank + world, ..."""
    return list(range(rank, streams, world))


@dataclass
class ReadStats:
    """What one rank's reading cost: bytes read from storage, chunks read, and seconds the
    training thread waited for a chunk (time blocked in `next()`)."""

    bytes: int = 0
    chunks: int = 0
    blocked_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_bytes(self, n: int) -> None:
        with self.lock:
            self.bytes += n


class _CountingFile:
    """A file object over a pyarrow NativeFile that counts the bytes read through it."""

    def __init__(self, native: Any, stats: ReadStats) -> None:
        self._f, self._stats = native, stats
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n) if n is not None and n >= 0 else self._f.read()
        self._stats.add_bytes(len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def size(self) -> int:
        return self._f.size()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True
        self._f.close()


def read_chunk(part: Part, chunk: Chunk, stats: ReadStats) -> pa.Table:
    """Rows [chunk.start, chunk.stop) of `part`: the whole file when the chunk is the whole
    part, else only the row groups the range overlaps."""
    import pyarrow.parquet as pq

    from data_prep.storage import open_location

    with open_location(part.path).open_input_file() as native:
        f = pa.PythonFile(_CountingFile(native, stats), mode="r")
        if chunk.start == 0 and chunk.stop == part.rows:
            return pq.read_table(f)
        pf = pq.ParquetFile(f)
        groups, first, at = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if at < chunk.stop and at + n > chunk.start:
                groups.append(g)
                first = at if first is None else first
            at += n
        table = pf.read_row_groups(groups)
        return table.slice(chunk.start - first, chunk.rows)


class _Stream:
    """One stream of one epoch, from a row position on: micro-batches of `size` rows."""

    def __init__(self, reader: RankReader, stream: int, start_row: int) -> None:
        self.reader, self.plan = reader, reader.plan
        self.todo = []  # (chunk index, first row of it to use)
        for c in self.plan.stream_chunks(reader.epoch, stream):
            n = self.plan.chunks[c].rows
            if start_row >= n:  # wholly before the position: never opened
                start_row -= n
                continue
            self.todo.append((c, start_row))
            start_row = 0
        self.pending: list[pa.Table] = []
        self.have = 0
        self.ahead: Future | None = None
        self._prefetch()

    def _load(self, chunk: int, skip: int) -> pa.Table:
        plan, c = self.plan, self.plan.chunks[chunk]
        table = self.reader.read(plan.parts[c.part], c, self.reader.stats)
        rows = plan.row_order(self.reader.epoch, chunk)[skip:]
        with self.reader.stats.lock:
            self.reader.stats.chunks += 1
        return table.take(pa.array(rows))

    def _prefetch(self) -> None:
        if self.todo and self.ahead is None:
            chunk, skip = self.todo.pop(0)
            self.ahead = self.reader.pool.submit(self._load, chunk, skip)

    def take(self, n: int) -> pa.Table:
        while self.have < n:
            if self.ahead is None:
                raise RuntimeError("stream ran out of rows before the epoch's last step")
            waited = time.perf_counter()
            table = self.ahead.result()
            self.reader.stats.blocked_s += time.perf_counter() - waited
            self.ahead = None
            self.pending.append(table)
            self.have += table.num_rows
            self._prefetch()  # the next chunk is read while this one is trained on
        table = pa.concat_tables(self.pending) if len(self.pending) > 1 else self.pending[0]
        out, rest = table.slice(0, n), table.slice(n)
        self.pending, self.have = [rest], rest.num_rows
        return out


class RankReader:
    """The micro-batches one rank trains in one epoch, from a step on (module docstring):
    `batches()` yields (step, stream, table of micro_batch rows), the rank's streams of a
    step in order. `read(part, chunk, stats)` reads rows of a part (default: from storage,
    counting bytes). Close it (or use it as a context manager) to stop the read-ahead."""

    def __init__(self, plan: BatchPlan, *, rank: int, world: int, epoch: int,
                 start_step: int = 0,
                 read: Callable[[Part, Chunk, ReadStats], pa.Table] | None = None,
                 stats: ReadStats | None = None) -> None:
        self.plan, self.epoch, self.start_step = plan, epoch, start_step
        self.read = read or read_chunk
        self.stats = stats if stats is not None else ReadStats()
        self.steps = plan.steps_per_epoch(epoch)
        self.mine = rank_streams(plan.streams, rank, world)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rows")
        self._streams: dict[int, _Stream] = {}

    def batches(self) -> Iterator[tuple[int, int, pa.Table]]:
        if self.start_step >= self.steps:
            return
        start_row = self.start_step * self.plan.micro_batch
        for s in self.mine:
            self._streams[s] = _Stream(self, s, start_row)
        for step in range(self.start_step, self.steps):
            for s in self.mine:
                yield step, s, self._streams[s].take(self.plan.micro_batch)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> RankReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass(frozen=True)
class SplitRows:
    """A split's rows in the order of its parts (sorted by path) and of the rows in each,
    read by whichever worker iterates them: the validation split, which every rank
    evaluates a share of the first batches of. `iter_batches` is what the training loop
    uses of a Ray Data iterator, yielding pyarrow Tables of `batch_size` rows (the last
    may be shorter); a part is opened only when its rows are reached, so the first
    `eval_batches` batches read only the parts they need."""

    location: str
    files: list[dict[str, Any]] | None = None  # the manifest's, as list_parts takes them
    prefix: str = ""

    def iter_batches(self, batch_size: int, batch_format: str = "pyarrow",
                     drop_last: bool = False, prefetch_batches: int = 0
                     ) -> Iterator[pa.Table]:
        import pyarrow.parquet as pq

        from data_prep.storage import open_location

        pending: list[pa.Table] = []
        have = 0
        for part in list_parts(self.location, self.files, prefix=self.prefix):
            with open_location(part.path).open_input_file() as native:
                pf = pq.ParquetFile(native)
                for group in range(pf.metadata.num_row_groups):
                    pending.append(pf.read_row_group(group))
                    have += pending[-1].num_rows
                    while have >= batch_size:
                        rows = pa.concat_tables(pending) if len(pending) > 1 else pending[0]
                        yield rows.slice(0, batch_size)
                        pending = [rows.slice(batch_size)]
                        have = pending[0].num_rows
        if have and not drop_last:
            yield pa.concat_tables(pending) if len(pending) > 1 else pending[0]
