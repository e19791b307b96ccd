"""`bertflow registry`: import a real BERT, list, show lineage, promote; errors users hit."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.helpers import tiny_hf_bert
from workflows import tracking as t
from workflows.cli.table import format_table
from workflows.ops import hf_import
from workflows.ops import registry as r
from workflows.cli import main as cli


def test_import_minilm_list_promote_show_through_the_cli(minilm_dir, tracking_uri, capsys):
    assert cli(["registry", "import-hf", str(minilm_dir), "--name", "minilm",
                "--tracking-uri", tracking_uri]) == 0
    assert "minilm version 1" in capsys.readouterr().out

    assert cli(["registry", "list", "--tracking-uri", tracking_uri]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["MODEL", "ALIASES", "TASK"]
    assert table[1].split()[:3] == ["minilm/1", "-", "base"]
    assert str(minilm_dir.resolve()) in table[1]  # whole, not cut in the middle

    assert cli(["registry", "promote", "minilm", "1", "--alias", "champion",
                "--tracking-uri", tracking_uri]) == 0
    assert "minilm@champion -> version 1" in capsys.readouterr().out

    assert cli(["registry", "show", "minilm@champion", "--json",
                "--tracking-uri", tracking_uri]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == "1" and info["aliases"] == ["champion"]
    assert info["tags"][t.TAG_SOURCE_PATH] == str(minilm_dir.resolve())
    assert info["tags"][t.TAG_CONFIG_HASH] == hf_import.config_hash(minilm_dir)
    assert info["params"]["hidden_size"] == "384"
    # Only the model's own files were copied into the registry, not the
    # sentence-transformers extras shipped beside them.
    files = {p.name for p in Path(urlparse(info["model_artifacts"]).path).rglob("*")}
    assert {"config.json", "model.safetensors", "vocab.txt"} <= files
    assert "1_Pooling" not in files and "modules.json" not in files
    # ...and what was registered resolves back to a loadable folder.
    folder = t.resolve_model("models:/minilm@champion", tracking_uri=tracking_uri)
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == 384


def test_show_follows_the_base_model_chain_and_lists_the_key_metric(
        tmp_path, minilm_dir, tracking_uri):
    import mlflow

    base_dir = tiny_hf_bert(tmp_path / "tiny", minilm_dir)
    hf_import.import_hf(base_dir, "tiny-base", tracking_uri)
    # A fine-tuned model built on it, registered the way the workflows do.
    exp = t.ensure_experiment("bertflow", tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(experiment_id=exp, run_name="clf-1") as run:
        mlflow.log_params({"lr": 3e-5, "task": "seq-cls"})
        mlflow.log_metrics({"eval_accuracy": 0.75, "train_loss": 0.4})
    lineage = {t.TAG_BASE_MODEL: "models:/tiny-base/1", t.TAG_TASK: "seq-cls",
               t.TAG_DATASET_FINGERPRINT: "abc123", t.TAG_DATASET_PATH: "/data/sst",
               t.TAG_RUN_ID: run.info.run_id}
    uri = t.log_bert_model(base_dir, run_id=run.info.run_id, tracking_uri=tracking_uri,
                           task="seq-cls")
    t.register_model_version(uri, "clf", tags=lineage, tracking_uri=tracking_uri)

    info = r.show_model("clf", tracking_uri)  # no alias or version: the latest
    assert info["base_model_chain"] == ["models:/tiny-base/1", str(base_dir.resolve())]
    assert info["dataset_fingerprint"] == "abc123" and info["dataset_path"] == "/data/sst"
    assert info["run_name"] == "clf-1" and info["metrics"]["eval_accuracy"] == 0.75
    text = r.render_model(info)
    assert "clf/1 <- models:/tiny-base/1 <- " in text and "eval_accuracy" in text

    rows = {row["name"]: row for row in r.list_models(tracking_uri)}
    assert rows["clf"]["key_metric"] == "eval_accuracy=0.75"
    assert [v["model"] for v in rows["clf"]["versions"]] == ["clf/1"]
    summary = r.render_summary(info)
    assert summary.startswith("clf version 1") and "from models:/tiny-base/1" in summary
    assert "eval_accuracy 0.75" in summary and "lr 3e-05" in summary
    assert "bertflow predict --model models:/clf/1" in summary and "params" not in summary
    assert rows["clf"]["task"] == "seq-cls" and rows["tiny-base"]["task"] == "base"


def test_registry_errors_name_the_problem(tmp_path, tracking_uri, capsys):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "old" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(hf_import.HFImportError, match="pytorch_model.bin is not accepted"):
        hf_import.import_hf(tmp_path / "old", "old", tracking_uri)
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    for f in ("model.safetensors", "vocab.txt"):
        (gpt / f).write_text("x")
    (gpt / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(hf_import.HFImportError, match="BERT models only"):
        hf_import.import_hf(gpt, "gpt", tracking_uri)

    assert cli(["registry", "show", "nope@champion", "--tracking-uri", tracking_uri]) == 2
    err = capsys.readouterr().err
    assert "nope@champion" in err and "bertflow registry list" in err
    assert cli(["registry", "promote", "nope", "3", "--alias", "x",
                "--tracking-uri", tracking_uri]) == 2


def test_refs_and_tables():
    assert t.parse_model_ref(r.as_model_ref("bert@champion")) == ("bert", "champion", None)
    assert t.parse_model_ref(r.as_model_ref("models:/bert/3")) == ("bert", None, "3")
    assert t.parse_model_ref(r.as_model_ref("bert")) == ("bert", None, None)
    assert t.parse_model_ref("runs/finetune-qa/checkpoint_00000100") is None  # a path
    table = format_table([{"a": "/very/long/path/" + "x" * 80 + "/end.txt", "b": None}],
                           ["a", "b"], max_width=20)
    header, row = table.splitlines()
    assert header.split() == ["A", "B"] and row.split() == ["/very/lon…xx/end.txt", "-"]
