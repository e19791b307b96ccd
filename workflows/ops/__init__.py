"""Operating bertflow: the model registry (registry, hf_import), the MLflow server
(server), Ray jobs (jobs) and prepared datasets (datasets)."""
