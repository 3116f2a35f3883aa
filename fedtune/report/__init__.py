"""What a run writes and shows: typed rows and summary (``rows``), the run
directory (``run_dir``), the console lines and tables (``console``), plots (``plots``)."""
