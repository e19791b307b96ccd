"""Task datasets: Parquet + manifest, every record accounted for, reruns reuse; the same
bytes tokenized in process or on Ray Data."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

import finetune_data as D
from data_prep.tasks.pipeline import TaskFeatures, build_task_dataset
from data_prep.tasks.readers import TaskDataError

pytestmark = pytest.mark.ray


def test_conll_dataset_is_written_once_and_reused(tmp_path, minilm_dir, ray_local):
    src = tmp_path / "train.conll"
    D.write_conll(src, 40, seed=1)
    with src.open("a") as f:
        f.write("Berlin\n\nRome B-LOC\n")  # a token without a tag: that sentence is skipped
    spec = TaskFeatures("token-cls", max_seq_len=32)
    first = build_task_dataset(src, spec, minilm_dir, tmp_path / "out", split="train", seed=3)
    m = first.manifest
    assert m.counts["records_read"] == 42 and m.counts["examples"] == 41
    assert m.counts["skipped_by_reason"] == {"missing field": 1}
    assert first.labels == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    table = pq.read_table(first.parquet_dir)
    assert table.num_rows == 41 == m.splits["train"]["rows"]
    assert sorted(table.column("example_index").to_pylist()) == list(range(41))
    row = table.slice(0, 1).to_pylist()[0]
    assert len(row["input_ids"]) == len(row["labels"]) <= 32
    stamp = {f: f.stat().st_mtime_ns for f in first.parquet_dir.glob("*")}

    again = build_task_dataset(src, spec, minilm_dir, tmp_path / "out", split="train", seed=3)
    assert again.reused and again.path == first.path
    assert {f: f.stat().st_mtime_ns for f in again.parquet_dir.glob("*")} == stamp

    longer = build_task_dataset(src, TaskFeatures("token-cls", max_seq_len=64), minilm_dir,
                                tmp_path / "out", split="train", seed=3)
    assert not longer.reused and longer.path != first.path


def test_eval_labels_unknown_to_training_are_skipped_and_empty_input_is_an_error(
        tmp_path, minilm_dir, ray_local):
    src = tmp_path / "dev.csv"
    src.write_text('text,label\n"fine",pos\n"bad",neg\n"so so",neutral\n')
    ds = build_task_dataset(src, TaskFeatures("seq-cls", 32), minilm_dir, tmp_path / "out",
                            split="eval", labels=["neg", "pos"])
    assert ds.manifest.counts["skipped_by_reason"] == {"unknown label": 1}
    assert pq.read_table(ds.parquet_dir).num_rows == 2
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n,pos\n")
    with pytest.raises(TaskDataError, match=r"empty.csv: no usable seq-cls records \(1 skipped"):
        build_task_dataset(empty, TaskFeatures("seq-cls", 32), minilm_dir, tmp_path / "out",
                           split="train")


def test_small_files_are_tokenized_in_process_into_the_ray_data_bytes(
        tmp_path, minilm_dir, ray_local, monkeypatch):
    """Files of up to LOCAL_FEATURIZE_MAX_RECORDS records skip Ray Data: the same rows in
    the same order, so the very same Parquet bytes, for every kind of task (QA with
    several windows per long context, regression scores)."""
    import data_prep.tasks.pipeline as P

    on_ray_data, small = P.map_with_actor_pool, P.LOCAL_FEATURIZE_MAX_RECORDS

    def no_ray_data(*args, **kwargs):
        raise AssertionError("a small file went to Ray Data")

    files = {"seq-cls": ("s.csv", lambda p: D.write_sentiment(p, 600, seed=2)),
             "pair-cls": ("p.jsonl", lambda p: D.write_pairs(p, 300, seed=3)),
             "regression": ("r.jsonl", lambda p: D.write_scores(p, 300, seed=4)),
             "token-cls": ("t.conll", lambda p: D.write_conll(p, 300, seed=5)),
             "qa": ("q.json", lambda p: D.write_squad(p, 40, seed=6, v2=True))}
    for task, (name, write) in files.items():
        src = tmp_path / name
        write(src)
        spec = TaskFeatures(task, max_seq_len=48, doc_stride=16, max_query_len=16)
        built = {}
        for engine, limit, pool in (("local", small, no_ray_data),
                                    ("ray", 0, on_ray_data)):
            monkeypatch.setattr(P, "LOCAL_FEATURIZE_MAX_RECORDS", limit)
            monkeypatch.setattr(P, "map_with_actor_pool", pool)
            ds = build_task_dataset(src, spec, minilm_dir, tmp_path / engine, split="train",
                                    seed=9)
            assert not ds.reused
            built[engine] = ds
        local, ray_data = built["local"], built["ray"]
        assert local.path.name == ray_data.path.name, task  # same fingerprint
        assert local.manifest.counts == ray_data.manifest.counts, task
        (lf,), (rf,) = (sorted(d.parquet_dir.glob("*.parquet")) for d in (local, ray_data))
        assert pq.read_table(lf).num_rows > (1 if task != "qa" else 40), task
        assert lf.read_bytes() == rf.read_bytes(), task
