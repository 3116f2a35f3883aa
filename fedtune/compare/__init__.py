"""`fedtune compare`: a grid of federated runs, resumable, summarised as tables,
plots and one self-contained HTML report."""
