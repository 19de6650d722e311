"""Analysis of the Parquet store: laws, fits, (later) loading, claims, plots, report.

Reads Parquet only: no torch, no Ray. Built so far: `laws` and `fits`.
"""
