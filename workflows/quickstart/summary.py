"""What the quickstart made, and the closing summary that says where to look at it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
    classifier: str
    finetune_metrics: dict[str, float]
    baseline: dict[str, float]
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


def render_summary(r: QuickstartResult) -> str:
    """The closing summary: what was made, where, and the commands to look at it."""
    uri_flag = "" if r.tracking_uri == f"sqlite:///{Path.cwd().resolve() / 'mlruns.db'}" \
        else f" --tracking-uri {r.tracking_uri}"
    preds = "\n".join(f"    {row.get('label', row.get('prediction', '?')):<9} "
                      f"{row.get('text', '')}" for row in r.prediction_rows)
    total = sum(r.seconds.values())
    return f"""
================================ bertflow quickstart: done in {total / 60:.1f} min
made
  corpus        {r.corpus['documents']} documents of the Python reference  {r.output / 'corpus'}
  dataset       {r.dataset_counts['instances']} instances, {r.dataset_counts['tokens']} tokens  {r.dataset}
  pretrained    {r.pretrained}   loss {curve_text(r.loss_curve, 4)}
  base model    {r.base}   (MiniLM, imported)
  classifier    {r.classifier} (@champion)   {fmt_metrics(r.finetune_metrics)}
                majority-class baseline: {fmt_metrics(r.baseline)}
  predictions   {r.predictions}
{preds}
  store         {r.tracking_uri}
look at it
  bertflow registry list{uri_flag}
  bertflow registry show quickstart-reviews@champion{uri_flag}
  bertflow server{uri_flag}                     # then open http://127.0.0.1:5000
  bertflow predict --model models:/quickstart-reviews@champion --input {r.output / 'tasks/reviews/unseen.csv'} --output preds.csv
  bertflow datasets list {r.output}
timings  {', '.join(f'{k} {v:.0f}s' for k, v in r.seconds.items())}"""
