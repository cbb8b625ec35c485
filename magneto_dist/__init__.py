"""magneto_dist: distributed pretraining of Magneto transformers."""
import warnings

# megatron-core warns on import when neither Transformer Engine nor apex is installed; both are
# optional here (torch fallbacks are used), so the warning is noise on every CPU run.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

# Before any module of the package imports megatron-core: its import-time compiles deferred.
from .compat.megatron_import import import_megatron_core  # noqa: E402

import_megatron_core()
