"""`bertflow predict` and `bertflow embed` write the same bytes whichever engine runs the
model: in this process (`--engine local`, the default on one machine) or on a Ray Data
actor pool (`--engine ray`, on a cluster), with the same error column, the same skipped
rows and the same summary; and a fresh process picks the local engine without importing
Ray."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import tiny_task_folder
from workflows.config import EmbedConfig, PredictConfig
from workflows.serving.batch import choose_engine, embed_file, predict_file

# 11 readable rows (batches of 4: three batches, the last one short), an empty text (an
# error row), a gold label clashing with the prediction column, and one malformed row
# (too many columns) that both engines skip and count.
CSV = ("id,text,label\n"
       "1,a fine film,pos\n2,\"dull, dull, dull and long\",neg\n3,,neg\n"
       "4,rain all day in the city,neg\n5,x,y,z\n6,the best story of the year,pos\n"
       "7,ok,pos\n8,stocks fell sharply in tokyo today,neg\n9,hi,pos\n"
       "10,a very long review of a quite good film with a good plot and fine music,pos\n"
       "11,short,neg\n12,the end,pos\n")
JSONL_TOKENS = [{"tokens": ["Anna", "lives", "in", "Oslo"]}, {"tokens": "two words"},
                {"tokens": []}, {"tokens": ["one"]}, {"tokens": "a b c d e f g"}]


@pytest.mark.ray
def test_the_local_engine_writes_the_ray_engines_bytes(ray_local, minilm_dir, tmp_path):
    reviews = tmp_path / "reviews.csv"
    reviews.write_text(CSV)
    words = tmp_path / "words.jsonl"
    words.write_text("".join(json.dumps(r) + "\n" for r in JSONL_TOKENS) + "{not json\n")
    clf = tiny_task_folder(tmp_path / "clf", "seq-cls", minilm_dir)
    tagger = tiny_task_folder(tmp_path / "tagger", "token-cls", minilm_dir)
    same = dict(batch_size=4, micro_batch=3, num_cpus=1)  # one torch thread on both
    assert choose_engine(PredictConfig(model="m", input="i", output="o.csv")) == "ray"  # Ray runs

    runs = [(predict_file, PredictConfig, dict(model=str(clf), input=str(reviews)), "p.csv"),
            (predict_file, PredictConfig, dict(model=str(clf), input=str(reviews)), "p.jsonl"),
            (predict_file, PredictConfig, dict(model=str(tagger), input=str(words)), "t.jsonl"),
            (embed_file, EmbedConfig, dict(model=str(minilm_dir), input=str(reviews)),
             "e.parquet")]
    for run, config, settings, name in runs:
        written = {}
        for engine in ("local", "ray"):
            out = tmp_path / engine / name
            summary = run(config(**settings, **same, output=str(out), engine=engine))
            assert summary.pop("engine") == engine and summary.pop("output") == str(out)
            written[engine] = (out.read_bytes(), summary)
        assert written["local"] == written["ray"], name
        assert summary["skipped"] == 1 and summary["rows"] == (11 if "words" not in
                                                                settings["input"] else 5)
    assert summary["dim"] == 384
    scored = (tmp_path / "local" / "p.jsonl").read_text().splitlines()
    assert [json.loads(r)["error"] for r in scored].count("missing field 'text'") == 1
    assert {"input_label", "label", "score"} <= set(json.loads(scored[0]))


def test_a_fresh_process_predicts_in_process_without_importing_ray(minilm_dir, tmp_path):
    """auto, no --address, one replica, no Ray running: the local engine, and `ray` is
    never imported (nothing of Ray's start is paid)."""
    (tmp_path / "in.csv").write_text("id,text\n1,a fine film\n2,\n3,rain\n")
    clf = tiny_task_folder(tmp_path / "clf", "seq-cls", minilm_dir)
    code = ("import json, sys\n"
            "from workflows.config import PredictConfig\n"
            "from workflows.serving.batch import predict_file\n"
            f"s = predict_file(PredictConfig(model={str(clf)!r}, input={str(tmp_path / 'in.csv')!r},"
            f" output={str(tmp_path / 'out.csv')!r}, num_cpus=1))\n"
            "print(json.dumps([s['engine'], s['rows'], s['errors'], 'ray' in sys.modules]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["local", 3, 1, False]
    assert (tmp_path / "out.csv").read_text().splitlines()[0] == "id,text,label,score,error"
