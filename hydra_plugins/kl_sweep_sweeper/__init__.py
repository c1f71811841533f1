"""A Hydra sweeper that runs a whole multirun as batched kl-sweep fits into one parquet table."""
