"""Using trained models: the Predictor (predictor), batch inference over files on Ray Data
(batch: `bertflow predict`, `bertflow embed`) and the MLflow pyfunc (pyfunc)."""
