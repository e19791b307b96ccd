"""MLflow pyfunc for bertflow models, logged as code ("models from code").

`workflows.tracking.log_bert_model` logs a model folder with this file as the
`python_model` and the folder as the artifact "model". MLflow runs this file on load;
nothing is pickled, so the model loads with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false.
The inference itself is `workflows.serving.predictor.Predictor`, the same code as
`bertflow predict`.

Request columns: `text` (seq-cls; embeddings for a model without a task head),
`text_a`/`text_b` (pair-cls), `tokens` (token-cls), `question`/`context` (qa).
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class BertflowPyfunc(PythonModel):
    """Loads the model folder from the artifacts and predicts over a DataFrame."""

    def load_context(self, context: Any) -> None:
        from workflows.serving.predictor import Predictor

        self._predictor = Predictor.from_dir(context.artifacts["model"])

    # No type hints here on purpose: MLflow would read them as an input schema.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        """Predictions for a DataFrame (or records) in the columns of the model's task."""
        import pandas as pd

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        return self._predictor.predict(df)


mlflow.models.set_model(BertflowPyfunc())
