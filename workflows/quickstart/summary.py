"""What the quickstart made, and the closing summary that says where to look at it."""

from __future__ import annotations

from dataclasses import dataclass, field
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
    scorecards: list[Any] = field(default_factory=list)  # evaluation.scorecard.Scorecard
    suite: Path | None = None  # the two-task suite file the scorecards are of


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


def scorecard_text(r: QuickstartResult) -> str:
    """The two base models' scorecards side by side (the pretrained tiny BERT as A, MiniLM
    as B) with the restart noise and the verdict; empty without an evaluation."""
    if len(r.scorecards) != 2:
        return ""
    from workflows.cli.table import format_table
    from workflows.evaluation.scorecard import compare, compare_rows, verdict

    a, b = r.scorecards
    diffs = compare(a, b)
    rows = compare_rows(a, b, diffs)
    for row in rows:
        row["tiny (A)"], row["MiniLM (B)"] = row.pop("a"), row.pop("b")
    table = format_table(rows, ["task", "metric", "tiny (A)", "MiniLM (B)", "b - a", "noise",
                                "beyond noise"], max_width=None)
    restarts = max(t.n for t in a.tasks.values())
    return (f"  scorecards    {a.model} (A) vs {b.model} (B), suite {a.suite}: "
            f"{len(a.tasks)} tasks, {restarts} restarts  {r.suite or ''}\n"
            + "\n".join("    " + line for line in table.splitlines())
            + f"\n    {verdict(diffs, 'A', 'B')}\n")


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
    compare_line = ""
    if len(r.scorecards) == 2 and all(c.version for c in r.scorecards):
        a, b = (c.model.removeprefix("models:/") for c in r.scorecards)
        compare_line = f"  bertflow registry compare {a} {b}{uri_flag}\n"
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
{scorecard_text(r)}  store         {r.tracking_uri}
look at it
  bertflow registry list{uri_flag}
  bertflow registry show quickstart-topics@champion{uri_flag}
{compare_line}  bertflow server{uri_flag}                     # then open http://127.0.0.1:5000
  bertflow predict --model models:/quickstart-topics@champion --input {r.task.heldout} --output preds.csv
  bertflow datasets list {r.output}
timings  {', '.join(f'{k} {v:.0f}s' for k, v in r.seconds.items())}
now with your own data: a CSV with a header, like {r.task.train} (text,label;
other column names: --text-column, --label-column); another BERT: registry import-hf DIR
  bertflow finetune --base {r.base} --train my_train.csv --eval my_dev.csv --register-as my-model{uri_flag}
  bertflow predict --model models:/my-model@latest --input my_rows.csv --output scored.csv{uri_flag}
  bertflow registry show my-model@latest{uri_flag}"""
