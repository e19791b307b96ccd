"""workflows: Ray Train pretraining and fine-tuning, MLflow tracking and registry, and the
`bertflow` command line. The only package that calls ray.train.* and mlflow.*."""
