"""Parallelism applied from outside the model: process groups, TP layers, pipeline stages, RNG."""
