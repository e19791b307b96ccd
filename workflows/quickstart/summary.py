"""What the quickstart made, and the closing summary that says where to look at it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workflows.quickstart.pydoc_task import PydocTask


@dataclass
class TaskRun:
    """One fine-tuning run of the quickstart task (frozen encoder or full fine-tuning)."""

    mode: str  # "frozen" or "fine-tuned"
    model: str  # models:/NAME/VERSION
    version: str
    metrics: dict[str, float]
    pooling: str
    seconds: float  # wall time of the run: data, training, evaluation, registration
    examples: int  # training examples seen (examples x epochs)


@dataclass
class QuickstartResult:
    """What the quickstart made (paths, registered names, numbers for the summary)."""

    output: Path
    tracking_uri: str
    corpus: dict[str, int]
    dataset: Path
    dataset_counts: dict[str, Any]
    pretrained: str
    loss_curve: list[tuple[int, float]]
    base: str
    task: PydocTask
    runs: list[TaskRun]
    champion: str  # mode of the run promoted to @champion
    predictions: Path
    prediction_rows: list[dict[str, Any]]
    seconds: dict[str, float]


def curve_text(curve: list[tuple[int, float]], points: int = 6) -> str:
    if not curve:
        return "(no loss logged)"
    idx = sorted({round(i * (len(curve) - 1) / (points - 1)) for i in range(points)})
    return " -> ".join(f"{curve[i][1]:.2f}" for i in idx) + \
        f"  (steps {curve[0][0]}..{curve[-1][0]})"


def fmt_metrics(metrics: dict[str, float]) -> str:
    keep = {k: v for k, v in metrics.items() if isinstance(v, (int, float))
            and any(w in k for w in ("accuracy", "f1"))}
    return ", ".join(f"{k}={v:.3f}" for k, v in sorted(keep.items())) or "-"


def _score_table(r: QuickstartResult) -> str:
    lines = [f"    {'':<42}{'accuracy':>9}{'macro-F1':>10}{'train ex/s':>12}{'run time':>10}",
             f"    {'majority class (' + r.task.majority_label + ')':<42}"
             f"{r.task.majority_accuracy:>9.3f}{'-':>10}{'-':>12}{'-':>10}"]
    for run in r.runs:
        name = f"{run.mode} (--pooling {run.pooling}) v{run.version}"
        if run.mode == r.champion:
            name += " @champion"
        lines.append(f"    {name:<42}{run.metrics.get('val_accuracy', float('nan')):>9.3f}"
                     f"{run.metrics.get('val_macro_f1', float('nan')):>10.3f}"
                     f"{run.examples / max(run.seconds, 1e-9):>12.1f}{run.seconds:>9.0f}s")
    return "\n".join(lines)


def render_summary(r: QuickstartResult) -> str:
    """The closing summary: what was made, where, the commands to look at it, and last the
    three a user runs next on their own files."""
    uri_flag = "" if r.tracking_uri == f"sqlite:///{Path.cwd().resolve() / 'mlruns.db'}" \
        else f" --tracking-uri {r.tracking_uri}"
    right = sum(row.get("label") == row.get("true_label") for row in r.prediction_rows)
    preds = "\n".join(
        f"    {'ok ' if row.get('label') == row.get('true_label') else 'MISS'} "
        f"{str(row.get('label', '?')):<16} (true: {row.get('true_label', '?')})  "
        f"{str(row.get('text', ''))[:70]}..." for row in r.prediction_rows)
    total = sum(r.seconds.values())
    return f"""
================================ bertflow quickstart: done in {total / 60:.1f} min
made
  corpus        {r.corpus['documents']} documents of the Python reference  {r.output / 'corpus'}
  dataset       {r.dataset_counts['instances']} instances, {r.dataset_counts['tokens']} tokens  {r.dataset}
  pretrained    {r.pretrained}   loss {curve_text(r.loss_curve, 4)}
  base model    {r.base}   (MiniLM, imported)
  task          {len(r.task.labels)} topic groups of the Python reference: {r.task.train_examples} train / {r.task.eval_examples} eval paragraphs
                (eval topics never seen in training)  {r.task.train.parent}
  classifiers   MiniLM two ways, evaluated on the held-out topics:
{_score_table(r)}
  predictions   {r.predictions}   ({right}/{len(r.prediction_rows)} right on held-out paragraphs)
{preds}
  store         {r.tracking_uri}
look at it
  bertflow registry list{uri_flag}
  bertflow registry show quickstart-topics@champion{uri_flag}
  bertflow server{uri_flag}                     # then open http://127.0.0.1:5000
  bertflow predict --model models:/quickstart-topics@champion --input {r.task.heldout} --output preds.csv
  bertflow datasets list {r.output}
timings  {', '.join(f'{k} {v:.0f}s' for k, v in r.seconds.items())}
now with your own data: a CSV with a header, like {r.task.train} (text,label;
other column names: --text-column, --label-column); another BERT: registry import-hf DIR
  bertflow finetune --base {r.base} --train my_train.csv --eval my_dev.csv --register-as my-model{uri_flag}
  bertflow predict --model models:/my-model@latest --input my_rows.csv --output scored.csv{uri_flag}
  bertflow registry show my-model@latest{uri_flag}"""
