"""The model code every Hugging Face export ships (copied verbatim by hf_export.py): torch and
transformers only, never an import of magneto_dist, so an export works where it is not installed."""
