"""Analysis of the Parquet store: loading, laws, fits, the claims registry, figures and the report.

Reads Parquet only: no torch, no Ray.

    from analysis.load import load                 # tables as pandas, joined to their runs
    from analysis.claims import CLAIMS             # the claims of theory.md: kind, window, tolerance
    from analysis.verdicts import evaluate         # the claims judged by the store, per group
    from analysis.report import build               # report.html, report.md, figures/
"""
