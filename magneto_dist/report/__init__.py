"""A run's report: one HTML page of plots and tables from what a run directory holds."""
