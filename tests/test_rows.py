"""The train split's canonical micro-batch order (workflows/training/rows.py) without Ray:
a global batch holds the same rows on any number of workers, each rank reads only its
share (bytes per epoch equal on 1 and 4 workers), a resume on another worker count
continues exactly and opens nothing before its position, and the dynamic masks of a
micro-batch do not depend on who trains it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers import loop_settings, token_rows as rows, tiny_pretrain_task as task
from workflows.training import loop as L
from workflows.training.rows import BatchPlan, RankReader, ReadStats, list_parts, read_chunk


def write_parts(root, sizes: list[int], row_group: int = 4) -> None:
    """Parts of a split: rows numbered across parts (`row`), as prep writes them."""
    root.mkdir(parents=True)
    data, first = rows(sum(sizes), seed=5), 0
    for i, n in enumerate(sizes):
        pq.write_table(pa.table({"input_ids": [r.tolist() for r in data[first:first + n]],
                                 "row": list(range(first, first + n))}),
                       root / f"part-{i:03d}.parquet", row_group_size=row_group)
        first += n


def global_steps(plan: BatchPlan, world: int, epoch: int, start: int = 0,
                 stats: ReadStats | None = None) -> list[list[int]]:
    """The rows of each optimizer step, gathered from every rank of `world`."""
    per_rank = []
    for r in range(world):
        with RankReader(plan, rank=r, world=world, epoch=epoch, start_step=start,
                        stats=stats) as reader:
            per_rank.append(list(reader.batches()))
    steps: dict[int, dict[int, list[int]]] = {}
    for batches in per_rank:
        for step, stream, table in batches:
            steps.setdefault(step, {})[stream] = table.column("row").to_pylist()
    return [[row for s in sorted(v) for row in v[s]] for _, v in sorted(steps.items())]


@pytest.fixture()
def split(tmp_path):
    write_parts(tmp_path / "train", [13, 7, 20, 9, 11, 16, 8, 12])  # 96 rows
    return list_parts(str(tmp_path / "train"))


def test_a_global_batch_holds_the_same_rows_on_any_number_of_workers(split):
    plan = BatchPlan(tuple(split), micro_batch=2, streams=4, seed=1)
    one = global_steps(plan, 1, epoch=0)
    assert len(one) == plan.steps_per_epoch(0) > 0
    assert all(len(step) == 8 for step in one)
    flat = [r for step in one for r in step]
    assert len(set(flat)) == len(flat)  # no row twice in an epoch
    for world in (2, 3, 4):  # 3 does not divide 4 streams: ranks accumulate 2, 1, 1
        assert global_steps(plan, world, epoch=0) == one
    assert global_steps(plan, 2, epoch=1) != one  # reshuffled every epoch
    assert global_steps(plan, 2, epoch=0) == one  # and the same for a seed and epoch
    assert global_steps(BatchPlan(tuple(split), 2, 4, seed=2), 1, epoch=0) != one


def test_each_rank_reads_only_its_share_and_an_epoch_reads_the_split_once(split, tmp_path):
    plan = BatchPlan(tuple(split), micro_batch=2, streams=4, seed=3)
    size = sum((tmp_path / "train" / f"part-{i:03d}.parquet").stat().st_size for i in range(8))
    totals, per_rank = {}, {}
    for world in (1, 2, 4):
        ranks = [ReadStats() for _ in range(world)]
        for r in range(world):
            with RankReader(plan, rank=r, world=world, epoch=0, stats=ranks[r]) as reader:
                for _ in reader.batches():
                    pass
        totals[world] = sum(s.bytes for s in ranks)
        per_rank[world] = max(s.bytes for s in ranks)
        assert sum(s.chunks for s in ranks) == len(plan.chunks)  # every chunk once
    assert totals[1] == totals[2] == totals[4]
    # The data once, plus each file's footer (a few KB: about 1% of a 1 MB part).
    assert size <= totals[1] <= size + 16_384 * len(plan.chunks)
    assert per_rank[4] < 0.5 * totals[1]  # bytes per rank fall with the workers


def test_a_resume_on_another_worker_count_continues_exactly_and_skips_what_came_before(split):
    plan = BatchPlan(tuple(split), micro_batch=2, streams=4, seed=5)
    full = global_steps(plan, 4, epoch=2)
    opened: list[tuple[int, int]] = []

    def counting(part, chunk, stats):
        opened.append((chunk.part, chunk.start))
        return read_chunk(part, chunk, stats)

    for k in (1, 3, len(full) - 1):
        for world in (1, 2):
            assert global_steps(plan, world, epoch=2, start=k) == full[k:]
        opened.clear()
        with RankReader(plan, rank=0, world=1, epoch=2, start_step=k, read=counting) as reader:
            list(reader.batches())
        rows_before = k * plan.micro_batch
        for s in range(plan.streams):  # a stream's chunks wholly before k are never opened
            before, at = [], 0
            for c in plan.stream_chunks(2, s):
                if at + plan.chunks[c].rows <= rows_before:
                    before.append((plan.chunks[c].part, plan.chunks[c].start))
                at += plan.chunks[c].rows
            assert not set(before) & set(opened)


def test_fewer_parts_than_streams_are_cut_into_row_ranges_read_by_row_group(tmp_path):
    (tmp_path / "train").mkdir()
    rng = np.random.default_rng(0)
    for i, n in enumerate([4000, 2400]):  # ~2 MB a part: row groups outweigh the footers
        ids = rng.integers(0, 30_000, (n, 128)).tolist()
        pq.write_table(pa.table({"input_ids": ids, "row": list(range(i * 4000, i * 4000 + n))}),
                       tmp_path / "train" / f"part-{i}.parquet", row_group_size=200)
    parts = list_parts(str(tmp_path / "train"))
    plan = BatchPlan(tuple(parts), micro_batch=50, streams=8, seed=1)
    assert len(plan.chunks) == 8 and sum(c.rows for c in plan.chunks) == 6400
    stats = ReadStats()
    steps = global_steps(plan, 2, epoch=0, stats=stats)
    assert len(steps) == plan.steps_per_epoch(0) and all(len(s) == 400 for s in steps)
    assert len({r for s in steps for r in s}) == 400 * len(steps)
    size = sum(p.stat().st_size for p in (tmp_path / "train").glob("*.parquet"))
    # Each chunk reads the row groups it overlaps, not its whole part (4 x the split).
    assert stats.bytes < 1.3 * size


def test_row_counts_come_from_the_manifest_without_opening_a_footer(tmp_path, split):
    files = [{"path": f"train/{p.path.rsplit('/', 1)[-1]}", "rows": p.rows, "size": p.size}
             for p in split]
    listed = list_parts(str(tmp_path / "nowhere" / "train"), files, prefix="train/")
    assert [(p.rows, p.size) for p in listed] == [(p.rows, p.size) for p in split]
    assert all(p.path.endswith(".parquet") and "nowhere" in p.path for p in listed)


def test_train_batches_masks_follow_the_micro_batch_not_the_rank(tmp_path):
    write_parts(tmp_path / "train", [13, 7, 20, 9, 11, 16, 8, 12])
    t, cpu = task(), torch.device("cpu")
    t.train_location = str(tmp_path / "train")
    settings = loop_settings(batch_size=2, global_batch_size=8)  # 4 micro-batches a step
    plan = L.batch_plan(t, settings)
    steps = plan.steps_per_epoch(0)

    def stream(rank, world, epoch=0, skip=0):
        return L.train_batches(None, t, settings, rank, world, epoch, skip, cpu, plan=plan)

    def take(it, n):
        return [(e, p, b["labels"].numpy(), b["input_ids"].numpy()) for e, p, b in
                (next(it) for _ in range(n))]

    one = take(stream(0, 1), 4 * (steps + 1))  # into the second epoch
    assert [(e, p) for e, p, *_ in one][4 * steps - 1:4 * steps + 1] == [(0, steps), (1, 1)]
    two = take(stream(1, 2), 2 * 2)  # rank 1 of 2: streams 1 and 3 of steps 0 and 1
    for got, want in zip(two, [one[1], one[3], one[5], one[7]]):
        assert np.array_equal(got[2], want[2]) and np.array_equal(got[3], want[3])
    resumed = take(stream(0, 1, epoch=0, skip=2), 4)
    assert all(np.array_equal(a[2], b[2]) for a, b in zip(resumed, one[8:12]))
    assert L.rank_accumulation(settings, plan, 0, 3) == (2, 4 / 3)
    with pytest.raises(L.TrainingError, match="every worker needs at least one"):
        L.rank_accumulation(settings, plan, 0, 5)


def test_the_val_split_is_read_in_file_order_and_evaluates_as_ray_datas_batches(tmp_path):
    """SplitRows (pretraining's `val_rows`): batches of the split's rows in part order, a
    short last one, across part and row-group edges; only the parts the first batches
    need are opened; `evaluate` on it equals the evaluation of the same rows as Ray
    Data's numpy batches (FakeShard)."""
    from tests.helpers import FakeShard
    from workflows.training.rows import SplitRows
    from workflows.training.step import StepRunner

    write_parts(tmp_path / "val", [13, 7, 20, 9])  # 49 rows, row groups of 4
    val = SplitRows(str(tmp_path / "val"))
    batches = list(val.iter_batches(batch_size=6))
    assert [b.num_rows for b in batches] == [6] * 8 + [1]
    assert [r for b in batches for r in b.column("row").to_pylist()] == list(range(49))
    assert [b.num_rows for b in val.iter_batches(6, drop_last=True)] == [6] * 8
    files = [{"path": f"val/{p.path.rsplit('/', 1)[-1]}", "rows": p.rows, "size": p.size}
             for p in list_parts(str(tmp_path / "val"))]
    (tmp_path / "val" / "part-002.parquet").write_bytes(b"not parquet")  # never reached
    listed = SplitRows(str(tmp_path / "val"), tuple(files), prefix="val/")
    first = [b.column("row").to_pylist() for b in
             __import__("itertools").islice(listed.iter_batches(batch_size=5), 4)]
    assert first == [list(range(i, i + 5)) for i in range(0, 20, 5)]

    write_parts(tmp_path / "v2", [13, 7, 20, 9])
    t, cpu = task(), torch.device("cpu")
    settings = loop_settings(batch_size=6, eval_batches=5)
    torch.manual_seed(0)
    model = t.build_model()
    runner = StepRunner(model, settings, cpu)
    own = L.evaluate(t, model, SplitRows(str(tmp_path / "v2")), settings, runner, cpu)
    shard = L.evaluate(t, model, FakeShard(pq.read_table(tmp_path / "v2")), settings,
                       runner, cpu)
    assert own and own == pytest.approx(shard, rel=1e-6)
