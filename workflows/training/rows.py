"""The train split read straight from its Parquet parts, in an order reseeded every epoch,
with a position a resume seeks to instead of replaying.

An epoch is the parts in a seeded order (`part_order(seed, epoch)`), each part's rows in a
seeded order (`row_order(seed, epoch, part)`). The epoch's rows, laid end to end, are cut
into global batches of `world x batch_size` rows; rank r takes rows [r*B, (r+1)*B) of each
(the tail that fills no global batch is dropped, so every rank has the same number of
batches). Batch k of an epoch therefore starts at global row k x world x B, i.e. at a
(part, row) found from the parts' row counts alone: a resume at (epoch, k) opens no part
before that one and hands out no row before that position.

Every rank decodes every part it passes (one part, at most ~64 MB, in memory at a time)
and keeps its stripe: the I/O of the split is `world` times the split, cheap next to the
model step for token-id rows.

The split may be a local folder or a URI (`s3://bucket/ds/train`): parts are opened through
`data_prep.storage.open_location`, the one resolver of data locations, so a worker on any
node reads them with the credential variables its runtime environment carries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

PART_SALT = 0x5A17  # keeps the part order's stream apart from the row orders'


@dataclass(frozen=True)
class Part:
    """One Parquet file of a split and its row count."""

    path: str
    rows: int


def list_parts(location: str) -> list[Part]:
    """The split's Parquet files (a local folder or a URI), sorted by path, with their row
    counts (from the footers). Each Part's path is a location any worker can open."""
    import pyarrow.parquet as pq

    from data_prep.storage import open_location

    parts = []
    for f in open_location(location).list_files():
        if f.path.endswith(".parquet"):
            with f.open_input_file() as fh:
                parts.append(Part(f.uri, pq.ParquetFile(fh).metadata.num_rows))
    return parts


def part_order(n_parts: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, PART_SALT]).permutation(n_parts)


def row_order(n_rows: int, seed: int, epoch: int, part: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, part]).permutation(n_rows)


def batches_per_epoch(parts: list[Part], batch_size: int, world: int) -> int:
    return sum(p.rows for p in parts) // (batch_size * world)


def rank_batches(parts: list[Part], *, batch_size: int, rank: int, world: int, seed: int,
                 epoch: int, start: int = 0,
                 read: Callable[[Part], pa.Table] | None = None) -> Iterator[pa.Table]:
    """Batches `start`, `start + 1`, ... of `rank` in `epoch` (module docstring), as pyarrow
    Tables. `read` reads a whole part (default: from its location); parts before the one
    holding batch `start` are not read."""
    read = read or _read_part
    global_rows = batch_size * world
    n_batches = batches_per_epoch(parts, batch_size, world)
    skip = start * global_rows  # rows of the epoch before the position
    pending: list[pa.Table] = []
    have, k = 0, start
    for index in part_order(len(parts), seed, epoch):
        if k >= n_batches:
            return
        part = parts[index]
        if skip >= part.rows:  # wholly before the position: not opened
            skip -= part.rows
            continue
        rows = row_order(part.rows, seed, epoch, int(index))[skip:]
        skip = 0
        pending.append(read(part).take(pa.array(rows)))
        have += len(rows)
        while have >= global_rows and k < n_batches:
            table = pa.concat_tables(pending)
            yield table.slice(rank * batch_size, batch_size)
            rest = table.slice(global_rows)
            pending, have, k = [rest], rest.num_rows, k + 1


def _read_part(part: Part) -> pa.Table:
    import pyarrow.parquet as pq

    from data_prep.storage import open_location

    with open_location(part.path).open_input_file() as f:
        return pq.read_table(f)
