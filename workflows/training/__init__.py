"""Training on Ray Train: the one loop (engine: interface and driver; loop: what each worker
runs; step: one optimizer step; checkpoint: save and resume; optim: optimizers and
schedules) and the two stages built on it (pretrain, finetune + finetune_task)."""
