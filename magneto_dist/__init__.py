"""magneto_dist: distributed pretraining of Magneto transformers."""
