"""Data, no Ray: the corpus layout, audio decoding, mel features and chunking, Train statistics,
the Parquet chunk tables and the in-memory pools the training reads."""
