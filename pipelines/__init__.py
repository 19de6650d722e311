"""Sweeps, the Parquet store, the Ray adapter and the command line."""
