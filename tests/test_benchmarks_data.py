"""The benchmarks as distributed (GLUE's nine folders, SQuAD, CoNLL-2003) are read with
the right columns, labels and metrics, bad rows named by file and line, and handed to
fine-tuning as files its readers take unchanged."""

from __future__ import annotations

import json

import pytest

from data_prep.tasks.benchmarks import (BENCHMARK_TASKS, GLUE_TASKS, benchmark_task,
                                        prepare_benchmark, read_benchmark_split)
from data_prep.tasks.pipeline import read_task_file
from data_prep.tasks.readers import TaskDataError

MNLI_HEAD = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
             "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1")
STSB_HEAD = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"


def _mnli(rows: list[tuple[str, str, str]], judges: int) -> str:
    head = MNLI_HEAD + "".join(f"\tlabel{i}" for i in range(2, judges + 1)) + "\tgold_label"
    lines = [head]
    for i, (a, b, gold) in enumerate(rows):
        lines.append("\t".join([str(i), "1", f"{i}e", "fiction", "( a )", "( b )", "(ROOT a)",
                                "(ROOT b)", a, b] + [gold] * judges + [gold]))
    return "\n".join(lines) + "\n"


def write_glue(root) -> None:
    """Made-up rows in each GLUE task's exact layout, with a few bad ones."""
    files = {
        # CoLA: no header; source, label, original label ("*" when unacceptable), sentence.
        "CoLA/train.tsv": 'gj04\t1\t\tOur friends won\'t buy this "analysis".\n'
                          "gj04\t0\t*\tThey drank the pub.\n"
                          "gj04\t1\tonly three fields\n",
        "CoLA/dev.tsv": "cj99\t1\t\tThe sailors rode the breeze clear of the rocks.\n"
                        "cj99\t0\t*\tThe more we study verbs, the crazier they get get.\n",
        # SST-2: a `"` is text (quoting off), never a field quote.
        "SST-2/train.tsv": 'sentence\tlabel\n"a gorgeous, witty film \t1\nflat and dull \t0\n',
        "SST-2/dev.tsv": "sentence\tlabel\nit 's a charming journey . \t1\nbad\t7\n",
        "MRPC/train.tsv": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                          "1\t702876\t702977\tAmrozi accused his brother .\tReferring to him , "
                          "Amrozi accused his brother .\n"
                          "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought "
                          "Dominick 's in 1995 .\n",
        "MRPC/dev.tsv": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                        "1\t1\t2\tHe said \"no\" .\tHe refused .\n",
        "QQP/train.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                         "1\t1\t2\tHow do I learn Python?\tWhat is the best way to learn Python?\t1\n"
                         "2\t3\t4\tWhy is the sky blue?\tHow tall is Everest?\t0\n"
                         "3\t5\t6\ta question with no pair\n",
        "QQP/dev.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                       "9\t7\t8\tIs tea healthy?\tIs green tea good for you?\t1\n",
        "STS-B/train.tsv": STSB_HEAD + "\n"
                           "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is "
                           "taking off.\tAn air plane is taking off.\t5.000\n"
                           "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man is "
                           "playing a flute.\tA man is eating.\t0.500\n"
                           "2\tmain-news\tx\t2012\t0005\tnone\tnone\ta\tb\t7.5\n",
        "STS-B/dev.tsv": STSB_HEAD + "\n"
                         "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man with a "
                         "hard hat is dancing.\tA man wearing a hard hat is dancing.\t3.8\n",
        "MNLI/train.tsv": _mnli([("The cat sat.", "A cat sat.", "entailment"),
                                 ("He left.", "He stayed.", "contradiction"),
                                 ("She sang.", "She sang well.", "neutral")], judges=1),
        "MNLI/dev_matched.tsv": _mnli([("It rains.", "It is wet.", "entailment")], judges=5),
        "MNLI/dev_mismatched.tsv": _mnli([("A dog ran.", "A cat slept.", "contradiction"),
                                          ("Hi.", "Hello.", "-")], judges=5),
        "QNLI/train.tsv": "index\tquestion\tsentence\tlabel\n"
                          "0\tWhat came into force after the new constitution?\tThe law came "
                          "into force.\tentailment\n"
                          "1\tWho wrote it?\tIt rained.\tnot_entailment\n",
        "QNLI/dev.tsv": "index\tquestion\tsentence\tlabel\n0\tWhy?\tBecause.\tentailment\n",
        "RTE/train.tsv": "index\tsentence1\tsentence2\tlabel\n"
                         "0\tDana Reeve died.\tChristopher Reeve had an accident.\tnot_entailment\n"
                         "1\tYet, we now are discovering.\tWe are discovering.\tentailment\n",
        "RTE/dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tnot_entailment\n",
        "WNLI/train.tsv": "index\tsentence1\tsentence2\tlabel\n"
                          "0\tI stuck a pin through a carrot.\tThe carrot had a hole.\t1\n"
                          "1\tJohn could not see the stage.\tThe stage was short.\t0\n",
        "WNLI/dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\t0\n",
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_glue_folders_are_read_with_each_tasks_columns_labels_and_bad_rows(tmp_path):
    write_glue(tmp_path)
    rows, report = read_benchmark_split(tmp_path, "cola", "train")
    assert [(r["text"], r["label"]) for r in rows] == [
        ('Our friends won\'t buy this "analysis".', "1"), ("They drank the pub.", "0")]
    assert report.counts == {"malformed row": 1}
    assert report.messages == [f"{tmp_path / 'CoLA/train.tsv'}:3: 3 tab-separated fields "
                               "where the file has 4"]
    rows, report = read_benchmark_split(tmp_path, "sst-2", "dev")
    assert rows[0]["text"] == "it 's a charming journey ." and report.counts == {"unknown label": 1}
    assert read_benchmark_split(tmp_path, "sst2", "train")[0][0]["text"] == '"a gorgeous, witty film'
    rows, _ = read_benchmark_split(tmp_path, "mrpc", "train")
    assert rows[0] == {"text_a": "Amrozi accused his brother .", "text_b": "Referring to him , "
                       "Amrozi accused his brother .", "label": "1", "line": 2}
    rows, report = read_benchmark_split(tmp_path, "qqp", "train")
    assert [r["label"] for r in rows] == ["1", "0"] and report.counts == {"malformed row": 1}
    rows, report = read_benchmark_split(tmp_path, "stsb", "train")
    assert [r["label"] for r in rows] == [5.0, 0.5] and rows[1]["text_b"] == "A man is eating."
    assert report.counts == {"bad score": 1} and "outside [0, 5]" in report.messages[0]
    rows, _ = read_benchmark_split(tmp_path, "mnli", "train")
    assert [r["label"] for r in rows] == ["entailment", "contradiction", "neutral"]
    assert rows[0]["text_a"] == "The cat sat." and rows[0]["text_b"] == "A cat sat."
    rows, report = read_benchmark_split(tmp_path, "mnli", "mnli-mm")
    assert rows[0]["text_b"] == "A cat slept." and report.counts == {"unknown label": 1}
    assert read_benchmark_split(tmp_path, "mnli", "mnli-m")[0][0]["label"] == "entailment"
    for name, want in (("qnli", "entailment"), ("rte", "not_entailment"), ("wnli", "1")):
        assert read_benchmark_split(tmp_path, name, "train")[0][0]["label"] == want
    # The task folder itself works as data_dir; a missing file says where it looked.
    assert read_benchmark_split(tmp_path / "RTE", "rte", "dev")[0][0]["text_a"] == "A."
    with pytest.raises(TaskDataError, match="no cola train file"):
        read_benchmark_split(tmp_path / "none", "cola", "train")


def test_glue_tasks_carry_the_official_metrics_and_labels():
    assert list(GLUE_TASKS) == ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli",
                                "rte", "wnli"]
    t = {n: (x.task, x.metric, x.metrics) for n, x in BENCHMARK_TASKS.items()}
    assert t["cola"] == ("seq-cls", "mcc", ("mcc",))
    assert t["mrpc"][1:] == t["qqp"][1:] == ("f1", ("f1", "accuracy"))
    assert t["stsb"] == ("regression", "spearman", ("pearson", "spearman"))
    assert t["squad_v2"][0] == "qa" and t["conll2003"][:2] == ("token-cls", "f1")
    assert GLUE_TASKS["mnli"].eval_files == {"mnli-m": "dev_matched.tsv",
                                             "mnli-mm": "dev_mismatched.tsv"}
    assert GLUE_TASKS["mrpc"].labels == ("0", "1")  # id 1 = "1": binary F1's positive class
    assert benchmark_task("STS-B") is GLUE_TASKS["stsb"]
    with pytest.raises(TaskDataError, match="unknown benchmark task 'glue'"):
        benchmark_task("glue")


def test_prepared_files_are_what_finetune_reads_unchanged_and_are_rewritten_only_on_change(tmp_path):
    write_glue(tmp_path / "glue")
    out = tmp_path / "prepared"
    mnli = prepare_benchmark(tmp_path / "glue", "mnli", out)
    assert set(mnli.evals) == {"mnli-m", "mnli-mm"} and mnli.rows == {
        "train": 3, "mnli-m": 1, "mnli-mm": 1}
    assert mnli.fields == {"task": "pair-cls",
                           "labels": ["contradiction", "entailment", "neutral"]}
    assert mnli.reports["mnli-mm"].counts == {"unknown label": 1}
    records, report = read_task_file(mnli.train, "pair-cls", labels=mnli.fields["labels"])
    assert [r["label"] for r in records] == ["entailment", "contradiction", "neutral"]
    assert report.total == 0
    sst = prepare_benchmark(tmp_path / "glue", "sst2", out)
    records, _ = read_task_file(sst.train, "seq-cls")
    assert records[0]["text"] == '"a gorgeous, witty film'
    stamp = (out / "mnli" / "train.jsonl").stat().st_mtime_ns
    prepare_benchmark(tmp_path / "glue", "mnli", out)
    assert (out / "mnli" / "train.jsonl").stat().st_mtime_ns == stamp
    assert not [p for p in (out / "mnli").iterdir() if p.name.startswith(".")]
    stsb = prepare_benchmark(tmp_path / "glue", "stsb", out)
    line = json.loads((out / "stsb" / "train.jsonl").read_text().splitlines()[0])
    assert line == {"text_a": "A plane is taking off.", "text_b": "An air plane is taking off.",
                    "label": 5.0}
    assert stsb.fields["task"] == "regression" and stsb.fields["text_pair_column"] == "text_b"


def test_squad_and_conll_are_read_from_the_files_as_distributed(tmp_path):
    squad = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{
        "context": "Paris is the capital of France.",
        "qas": [{"id": "q1", "question": "What is the capital?",
                 "answers": [{"text": "Paris", "answer_start": 0}], "is_impossible": False},
                {"id": "q2", "question": "Who?", "answers": [], "is_impossible": True}]}]}]}
    (tmp_path / "SQuAD").mkdir()
    for name in ("train-v2.0.json", "dev-v2.0.json"):
        (tmp_path / "SQuAD" / name).write_text(json.dumps(squad))
    prepared = prepare_benchmark(tmp_path, "squad_v2", tmp_path / "out")
    assert prepared.train == str(tmp_path / "SQuAD" / "train-v2.0.json")
    assert prepared.rows == {"train": 2, "squad_v2": 2} and prepared.fields == {"task": "qa"}
    conll = ("-DOCSTART- -X- -X- O\n\nEU NNP B-NP I-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP "
             "I-MISC\n\nPeter NNP B-NP I-PER\nBlackburn NNP I-NP I-PER\n")
    for name in ("train.txt", "valid.txt"):  # the other common names of eng.train/eng.testa
        (tmp_path / name).write_text(conll)
    rows, report = read_benchmark_split(tmp_path, "conll2003", "dev")
    assert [r["tags"] for r in rows] == [["I-ORG", "O", "I-MISC"], ["I-PER", "I-PER"]]
    assert report.total == 0


def test_regression_files_read_a_text_or_a_pair_and_count_scores_that_are_not_numbers(tmp_path):
    from bert_core.config_io import ConfigError
    from workflows.config import FinetuneConfig

    p = tmp_path / "scores.csv"
    p.write_text("text,other,label\nfine,good,4.5\nmeh,ok,high\nbad,poor,nan\nok,fair,2\n")
    single = FinetuneConfig(base="b", train="t", task="regression")
    rows, report = read_task_file(p, "regression", columns=single.columns)
    assert [(r["text"], r["label"]) for r in rows] == [("fine", 4.5), ("ok", 2.0)]
    assert report.counts == {"bad score": 2}
    assert report.messages[0] == f"{p}:3: label 'high' is not a number (a regression needs scores)"
    pair = FinetuneConfig(base="b", train="t", task="regression", text_column="text",
                          text_pair_column="other")
    rows, _ = read_task_file(p, "regression", columns=pair.columns)
    assert rows[0] == {"text_a": "fine", "text_b": "good", "label": 4.5, "line": 2}
    assert pair.classifier_pooling == "cls"
    with pytest.raises(ConfigError, match="regression has no labels"):
        FinetuneConfig(base="b", train="t", task="regression", labels=["a", "b"])
