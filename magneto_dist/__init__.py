"""magneto_dist: distributed pretraining of Magneto transformers."""
import warnings

# megatron-core warns on import when neither Transformer Engine nor apex is installed; both are
# optional here (torch fallbacks are used), so the warning is noise on every CPU run.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
