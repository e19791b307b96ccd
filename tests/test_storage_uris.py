"""Data locations as URIs, against a real S3 endpoint (moto's server on 127.0.0.1).

prep reads s3:// inputs and writes an s3:// dataset whose rows are byte-identical to a
local build, publishes it by writing its manifest last, reruns as "up to date" without
writing; a half-published dataset is never listed or read; bad locations fail before any
Ray work with exit code 2 and a message naming the location.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.config import PrepConfig
from data_prep.manifest import ManifestError, open_dataset
from data_prep.storage import LocationError, open_location
from workflows.cli import main as cli

WORDS = ("the a of river mountain quickly said walked 北京 über naïve computer data model "
         "language small large green city people history music garden").split()


def write_corpus(root: Path, n_docs: int = 40, seed: int = 0) -> Path:
    """A text file, a gzipped jsonl file and an empty file (skipped and counted)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)

    def doc() -> list[str]:
        return [" ".join(rng.choice(WORDS, int(rng.integers(4, 20)))).capitalize() + "."
                for _ in range(int(rng.integers(1, 9)))]
    (root / "a.txt").write_text("".join("\n".join(doc()) + "\n\n" for _ in range(n_docs // 2)),
                                encoding="utf-8")
    lines = "".join(json.dumps({"text": " ".join(doc())}) + "\n" for _ in range(n_docs // 2))
    (root / "b.jsonl.gz").write_bytes(gzip.compress(lines.encode("utf-8"), mtime=0))
    (root / "empty.txt").write_bytes(b"")
    return root


def upload(folder: Path, uri: str) -> None:
    for f in sorted(folder.iterdir()):
        open_location(f"{uri}/{f.name}").write_bytes(f.read_bytes())


def listing(uri: str) -> dict[str, int]:
    return {f.path: f.size() for f in open_location(uri).list_files()}


def prep_config(inputs: list[str], output: str, minilm_dir: Path, **kw) -> PrepConfig:
    base = dict(input=inputs, output=output, vocab=str(minilm_dir / "vocab.txt"),
                max_seq_len=32, dupe_factor=1, docs_per_unit=15, val_fraction=0.2,
                tokenize_workers=1)
    base.update(kw)
    return PrepConfig(**base)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ bad locations


def test_bad_locations_fail_before_any_work_naming_the_location(s3_bucket, tmp_path,
                                                                minilm_dir, capsys):
    import ray

    from data_prep.pipeline import build_pretraining_dataset

    ray_before = ray.is_initialized()
    corpus = write_corpus(tmp_path / "corpus")
    vocab = str(minilm_dir / "vocab.txt")

    with pytest.raises(LocationError, match=r"nope://bucket/x: cannot open this location"):
        open_location("nope://bucket/x")
    missing_bucket = "s3://bertflow-no-such-bucket/ds"
    with pytest.raises(LocationError, match="bucket 'bertflow-no-such-bucket' does not exist"
                       ".*AWS_ENDPOINT_URL"):
        build_pretraining_dataset(prep_config([str(corpus)], missing_bucket, minilm_dir))

    cases = [
        (["--input", str(corpus), "--output", "nope://b/ds"], "nope://b/ds"),
        (["--input", str(corpus), "--output", missing_bucket], "bertflow-no-such-bucket"),
        (["--input", f"{s3_bucket}/no/such/prefix/", "--output", str(tmp_path / "ds")],
         f"{s3_bucket}/no/such/prefix"),
        (["--input", "s3://bertflow-no-such-bucket/corpus/", "--output", str(tmp_path / "ds")],
         "bertflow-no-such-bucket"),
    ]
    # options and credentials come from the environment, never from a query string
    cases.append((["--input", f"{s3_bucket}/corpus/?secret_key=TOPSECRET",
                   "--output", str(tmp_path / "ds")], "query string"))
    open_location(f"{s3_bucket}/taken/notes.txt").write_text("not a dataset\n")
    cases.append((["--input", str(corpus), "--output", f"{s3_bucket}/taken"],
                  f"{s3_bucket}/taken exists and is not a bertflow dataset"))
    for args, named in cases:
        assert cli(["prep", *args, "--vocab", vocab]) == 2, args
        err = capsys.readouterr().err
        assert named in err, (args, err)
        assert "Traceback" not in err and "SECRET" not in err.upper().replace(
            "AWS_SECRET_ACCESS_KEY", "")

    for data in ("nope://b/ds", missing_bucket, f"{s3_bucket}/taken"):
        assert cli(["pretrain", "--data", data, "--run-name", "r"]) == 2
        err = capsys.readouterr().err
        assert data.split("/")[-1] in err and ("not a prepared dataset" in err
                                               or "cannot open" in err or "bucket" in err), err
    assert cli(["datasets", "list", "nope://b"]) == 2
    assert "nope://b" in capsys.readouterr().err
    assert not list(tmp_path.glob("*ds*"))  # nothing was written
    if not ray_before:
        assert not ray.is_initialized()  # every check ran before Ray started


def test_an_unreachable_store_is_named_with_the_variable_to_check(s3_bucket, monkeypatch,
                                                                  tmp_path, minilm_dir, capsys):
    from tests.services import free_ports

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
    assert cli(["prep", "--input", str(write_corpus(tmp_path / "c")), "--output",
                f"{s3_bucket}/ds", "--vocab", str(minilm_dir / "vocab.txt")]) == 2
    err = capsys.readouterr().err
    assert f"--output {s3_bucket}/ds: the store cannot be reached" in err
    assert "AWS_ENDPOINT_URL" in err and "bertflow-test-secret" not in err


def test_half_published_dataset_is_not_listed_and_not_read(s3_bucket, capsys):
    from workflows.ops.datasets import find_datasets

    ds = f"{s3_bucket}/datasets/half"
    table = pa.table({"input_ids": pa.array([[2, 5, 3]], pa.list_(pa.int32()))})
    with open_location(f"{ds}/train/part-00000.parquet").open_output_stream() as f:
        pq.write_table(table, f)
    open_location(f"{ds}/tokenizer/vocab.txt").write_text("[PAD]\n")
    assert find_datasets(f"{s3_bucket}/") == []
    assert cli(["datasets", "list", f"{s3_bucket}/", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []

    with pytest.raises(ManifestError, match="holds files but no manifest: a build that did "
                       "not finish"):
        open_dataset(ds)
    assert cli(["pretrain", "--data", ds, "--run-name", "r"]) == 2
    err = capsys.readouterr().err
    assert f"--data {ds}: not a prepared dataset" in err and "bertflow prep --output" in err
    assert cli(["prep", "rerun", ds]) == 2
    assert ds in capsys.readouterr().err


# ------------------------------------------------------------------ reading through pyarrow


def test_s3_inputs_expand_like_folders_and_keep_the_gzip_cap(s3_bucket, tmp_path):
    from data_prep.readers import PrepInputError, expand_locations, iter_documents

    upload(write_corpus(tmp_path / "corpus"), f"{s3_bucket}/corpus")
    open_location(f"{s3_bucket}/corpus/.hidden/x.txt").write_text("Hidden.\n")
    open_location(f"{s3_bucket}/corpus/sub/c.txt").write_text("Deeper text.\n")
    found = expand_locations([f"{s3_bucket}/corpus/"])
    assert found == [f"{s3_bucket}/corpus/{n}" for n in
                     ("a.txt", "b.jsonl.gz", "empty.txt", "sub/c.txt")]
    assert expand_locations([f"{s3_bucket}/corpus/*.txt"]) == [f"{s3_bucket}/corpus/a.txt",
                                                               f"{s3_bucket}/corpus/empty.txt"]
    assert expand_locations([f"{s3_bucket}/corpus/a.txt"]) == [f"{s3_bucket}/corpus/a.txt"]
    with pytest.raises(PrepInputError, match=r"corpus/\*\.csv \(glob matches no file\)"):
        expand_locations([f"{s3_bucket}/corpus/*.csv"])

    # the same documents and counts as the local files
    for name in ("a.txt", "b.jsonl.gz", "empty.txt"):
        local, remote = Counter(), Counter()
        assert list(iter_documents(tmp_path / "corpus" / name, local)) == \
            list(iter_documents(f"{s3_bucket}/corpus/{name}", remote))
        assert local == remote
    bomb = f"{s3_bucket}/bomb.txt.gz"
    open_location(bomb).write_bytes(gzip.compress(b"Some text here.\n\n" * 200_000))
    stats: Counter = Counter()
    docs = list(iter_documents(bomb, stats, max_decompressed_bytes=1 << 20))
    assert 0 < len(docs) < 200_000 and stats["files_skipped.decompressed_too_large"] == 1


def test_split_pool_on_s3_reads_blocks_not_one_get_per_draw(s3_bucket):
    from data_prep.corpus import ListPool, SplitPool, write_tokenized

    rng = np.random.default_rng(0)
    docs = [[list(range(d * 1000, d * 1000 + int(rng.integers(1, 30))))
             for _ in range(int(rng.integers(1, 6)))] for d in range(200)]
    units = []
    for k in range(0, 200, 50):
        uri = f"{s3_bucket}/staging/tokens-{k:06d}.bin"
        write_tokenized(uri, docs[k:k + 50])
        units.append((uri, 50))
    pool, reference = SplitPool(units), ListPool(docs)
    draws = rng.integers(0, 200, 2000)
    for d in draws:
        assert pool.num_sentences(int(d)) == reference.num_sentences(int(d))
        assert (pool.segment_from(int(d), 0, 40).tolist()
                == reference.segment_from(int(d), 0, 40).tolist())
    fetches = sum(f.fetches for f, _, _ in pool._files.values())
    assert fetches <= 2 * len(units)  # each unit file is small: about one GET each
    pool.close()


def test_worker_env_carries_credentials_by_name(monkeypatch, s3_server):
    from data_prep.ray_env import worker_env_vars, worker_runtime_env

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    monkeypatch.setenv("UNRELATED_SECRET", "x")
    env = worker_env_vars()
    assert env["AWS_ENDPOINT_URL"] == s3_server.endpoint and env["MLFLOW_TRACKING_PASSWORD"] == "pw"
    assert "UNRELATED_SECRET" not in env
    merged = worker_runtime_env({"env_vars": {"AWS_REGION": "eu-west-1"}, "pip": ["x"]})
    assert merged["env_vars"]["AWS_REGION"] == "eu-west-1" and merged["pip"] == ["x"]
    assert merged["env_vars"]["AWS_ACCESS_KEY_ID"] == s3_server.env["AWS_ACCESS_KEY_ID"]


@pytest.mark.ray
def test_tasks_on_a_ray_started_without_the_variables_get_them(ray_local, monkeypatch):
    from data_prep.ray_env import apply_worker_env, env_for_tasks, missing_worker_env

    # set after this Ray started: its workers did not inherit it
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "token-set-after-ray-started")
    assert missing_worker_env()["MLFLOW_TRACKING_TOKEN"] == "token-set-after-ray-started"

    @ray_local.remote(num_cpus=0.1)
    def seen(env_ref):
        import os

        before = os.environ.get("MLFLOW_TRACKING_TOKEN")
        apply_worker_env(env_ref[0])  # in a list: the ref itself, as prep's tasks get it
        return before, os.environ.get("MLFLOW_TRACKING_TOKEN")

    before, after = ray_local.get(seen.remote([env_for_tasks()]), timeout=300)
    # `before` may hold an earlier test's value: the suite shares one Ray, and a reused
    # worker keeps what an earlier task applied. What matters is that the new value was
    # not there until the task applied it.
    assert before != "token-set-after-ray-started"
    assert after == "token-set-after-ray-started"


# ------------------------------------------------------------------ prep to s3 on Ray


@pytest.mark.ray
@pytest.mark.slow  # three tiny builds: about 40 s on 2 shared cores
def test_prep_to_s3_is_byte_identical_to_local_publishes_atomically_and_reruns(
        ray_local, s3_bucket, tmp_path, minilm_dir, capsys):
    from data_prep.pipeline import build_pretraining_dataset
    from data_prep.tokenizer import WordPieceTokenizer
    from workflows.training.rows import BatchPlan, RankReader, ReadStats, list_parts

    corpus = write_corpus(tmp_path / "corpus")
    local = build_pretraining_dataset(prep_config([str(corpus)], str(tmp_path / "ds"),
                                                  minilm_dir))
    upload(corpus, f"{s3_bucket}/corpus")
    out = f"{s3_bucket}/datasets/tiny"
    # leftovers of a build that died before publishing: replaced without --force
    open_location(f"{out}/_BUILDING").write_text("{}")
    open_location(f"{out}/train/part-00042.parquet").write_bytes(b"half written")
    cfg = prep_config([f"{s3_bucket}/corpus/"], out, minilm_dir)
    remote = build_pretraining_dataset(cfg)

    # the same rows, byte for byte, and the same tokenizer
    files = {f["path"]: f for s in ("train", "val") for f in remote.splits[s]["files"]}
    assert files == {f["path"]: f for s in ("train", "val") for f in local.splits[s]["files"]}
    for rel in files:
        assert sha(open_location(f"{out}/{rel}").read_bytes()) == \
            sha((tmp_path / "ds" / rel).read_bytes()), rel
    assert remote.counts == local.counts and remote.counts["files_skipped"] == {"empty_file": 1}
    assert WordPieceTokenizer.from_dir(out).fingerprint() == remote.tokenizer["fingerprint"]
    # published: manifest, tokenizer, parts; no staging, marker or stale part left
    names = set(listing(out))
    bucket_path = open_location(out).path
    assert names == {f"{bucket_path}/{n}" for n in
                     ["manifest.json", "tokenizer/vocab.txt", "tokenizer/tokenizer_config.json",
                      *files]}
    # no credentials in the manifest
    text = open_location(f"{out}/manifest.json").read_text()
    assert "bertflow-test-secret" not in text and "bertflow-test" not in text
    assert remote.config["input"] == [f"{s3_bucket}/corpus/"]
    assert remote.config["output"] == out

    # a rerun is "up to date" and writes nothing; so is `prep rerun` on the URI
    before = listing(out)
    created = remote.created_at
    assert build_pretraining_dataset(cfg).created_at == created
    assert cli(["prep", "rerun", out]) == 0
    assert f"{out}:" in capsys.readouterr().out
    assert listing(out) == before

    # listed, up to date, from the bucket's root
    assert cli(["datasets", "list", f"{s3_bucket}/", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["path"] == out and row["status"] == "up to date"
    assert row["instances"] == remote.counts["instances"]

    # training reads it where it is: parts and rows through the same resolver
    data, manifest = open_dataset(out)
    parts = list_parts(data.join("train").uri, manifest.splits["train"]["files"], "train/")
    assert parts == list_parts(data.join("train").uri)  # the manifest's counts: no footer read
    assert sum(p.rows for p in parts) == manifest.splits["train"]["instances"]
    plan = BatchPlan(tuple(parts), micro_batch=4, streams=4, seed=1)
    read = {}
    for world in (1, 4):  # an epoch through S3 costs the same bytes on 1 and 4 workers
        stats = ReadStats()
        for r in range(world):
            with RankReader(plan, rank=r, world=world, epoch=0, stats=stats) as reader:
                batches = list(reader.batches())
        read[world] = stats.bytes
    assert read[1] == read[4] >= sum(p.size for p in parts)
    assert batches[0][2].num_rows == 4 and "input_ids" in batches[0][2].column_names

    # --force unpublishes first, then rebuilds to the same bytes
    forced = build_pretraining_dataset(prep_config(cfg.input, out, minilm_dir, force=True))
    assert forced.fingerprint == remote.fingerprint and forced.splits == remote.splits
    assert listing(out).keys() == before.keys()
