"""Analysis of the Parquet store: loading, fits, plots, report (reads Parquet only; no torch, no Ray).

Not built yet: until then, read the tables with pandas as the README shows.
"""
