"""Stability experiments: sweep grids of norm schemes x depth x LR, verdicts, reports."""
