"""Fine-tuning datasets: readers (classification tables, CoNLL, SQuAD), feature building
with the WordPiece tokenizer (pure functions), and the Ray Data pipeline that writes them
as Parquet + manifest (`data_prep.tasks.pipeline`). Importing this package loads no Ray.
"""
