"""DeepSpeed 0.19.8's engine and pipeline internals this project hooks into.

- The `overflow` flag: the engine skips the LR scheduler's step and counts a skipped step when
  its optimizer has `overflow` set after step() (engine.py `_take_model_step`), which is how
  DeepSpeed's own fp16 optimizers report a loss-scale skip. Our non-finite guard reports a
  skipped step the same way.
- `PipelineModule._count_layer_params`: balancing stages by parameter count builds every layer
  spec on every rank. `CountingHookPipelineModule` calls `counting_parameters()` around it, so a
  subclass can make the count see meta-device layers instead of materializing every stage.
- `deepspeed.ops.__compatible_ops__`: the table of ops DeepSpeed may build; the CPU
  shared-memory comm op (a ~30 s JIT build on a fresh machine, used only by DeepSpeed's
  inference_all_reduce) is marked unavailable in it.
- `DeepSpeedEngine.checkpoint_engine`: the object save_checkpoint hands every file's state
  dict to (`checkpoint_engine.save(state_dict, path)`: the model, ZeRO and pipeline-layer
  files). DeepSpeed builds it from its config (`_configure_checkpointing`) and offers no way to
  pass one in; a background save (checkpoint/async_save.py) puts its own in its place.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Callable

import deepspeed
import deepspeed.ops
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe.engine import PipelineEngine

from . import require_attribute, require_source

LIBRARY = "deepspeed"
OVERFLOW = "overflow"  # an optimizer attribute: True when its last step() applied nothing


class CountingHookPipelineModule(PipelineModule):
    """DeepSpeed's PipelineModule with a hook around its parameter-count pass."""

    def counting_parameters(self):
        """A context manager entered while DeepSpeed counts every layer's parameters."""
        return contextlib.nullcontext()

    def _count_layer_params(self):
        with self.counting_parameters():
            return super()._count_layer_params()


def disable_cpu_shm_comm() -> None:
    """Before deepspeed.init_distributed on a CPU: DeepSpeed keeps this table for the process
    and reads it only where it would build the op (comm/torch.py build_shm_op)."""
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def replace_checkpoint_engine(engine: DeepSpeedEngine, make: Callable[[object], object]):
    """Give `engine` the checkpoint engine make(DeepSpeed's config object) and return it."""
    # private API: deepspeed 0.19.8: DeepSpeedEngine.checkpoint_engine and ._config (the
    # config its own checkpoint engine was made from)
    engine.checkpoint_engine = make(engine._config)
    return engine.checkpoint_engine


def check() -> None:
    """What this module relies on is still there (run at import)."""
    require_source(LIBRARY, DeepSpeedEngine._take_model_step, f"self.optimizer.{OVERFLOW}",
                   "engine's skipped-step check (DeepSpeedEngine._take_model_step)")
    require_attribute(LIBRARY, PipelineModule, "_count_layer_params")
    require_source(LIBRARY, PipelineModule._partition_layers, "self._count_layer_params()",
                   "pipeline partitioning by parameters (PipelineModule._partition_layers)")
    require_source(LIBRARY, DeepSpeedEngine._configure_checkpointing,
                   "self.checkpoint_engine = create_checkpoint_engine(config_params=self._config",
                   "the engine's checkpoint engine (DeepSpeedEngine._configure_checkpointing)")
    for method, call in ((DeepSpeedEngine.save_checkpoint, "self._save_checkpoint("),
                         (DeepSpeedEngine.save_checkpoint, "self._save_zero_checkpoint("),
                         (DeepSpeedEngine._save_checkpoint, "self.checkpoint_engine.save("),
                         (DeepSpeedEngine._save_zero_checkpoint, "self.checkpoint_engine.save("),
                         (PipelineEngine.module_state_dict,
                          "checkpoint_engine=self.checkpoint_engine"),
                         (PipelineModule.save_state_dict, "checkpoint_engine.save(")):
        require_source(LIBRARY, method, call, f"checkpoint writes through the engine's "
                                              f"checkpoint engine ({method.__qualname__})")
    # by module path: deepspeed.comm's own namespace binds `torch` to the torch package
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    require_source(LIBRARY, ds_comm_torch.build_shm_op, "__compatible_ops__",
                   "CPU shared-memory comm op build (deepspeed.comm.torch.build_shm_op)")


check()
