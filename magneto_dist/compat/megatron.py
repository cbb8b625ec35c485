"""megatron-core 0.16.1 internals this project works around.

- Its tensor-parallel linear layers add `_extra_state: None` to the state dict (get_extra_state)
  and register a load hook that expects it; DeepSpeed's universal-checkpoint converter crashes
  on that entry. `NoExtraState` restores nn.Module's methods and drops the hooks (torch's
  private `_load_state_dict_pre_hooks`), so the state dict holds only the parameters.
- Its column-parallel linear all-reduces the input gradient asynchronously inside its own
  autograd function (`allreduce_dgrad`, `all_reduce(..., async_op=True)`), which torch.compile
  cannot trace. `synchronous_input_grad_all_reduce` turns that attribute off on a layer, and
  its forward then routes the input through copy_to_tensor_model_parallel_region, whose
  backward all-reduces synchronously: the same sum, traceable.
- Its text tokenizers wrap a library tokenizer (sentencepiece, transformers, tiktoken) in a
  private `_tokenizer`; `library_tokenizer` reads it, for what the wrapper does not expose
  (token lookup, batch encoding).
- Its dataset builder writes the index caches on global rank 0 only (after which the others
  load them behind a barrier), which fails on node-local disks. `solo_process_group` makes this
  process a world of one, so it takes the "rank 0 builds" path on every node.
"""
from __future__ import annotations

import contextlib

import torch.distributed as dist
from megatron.core.datasets import gpt_dataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel import layers as tp_layers
from megatron.core.tokenizers.text.text_tokenizer import MegatronTokenizerText
from torch import nn

from . import require_attribute, require_parameters, require_source

LIBRARY = "megatron-core"


class NoExtraState:
    """Mixin for megatron's TP layers: a state dict of parameters only."""
    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._load_state_dict_pre_hooks.clear()


def synchronous_input_grad_all_reduce(layer: ColumnParallelLinear) -> None:
    """Make `layer` all-reduce its input gradient synchronously (see the module's notes)."""
    layer.allreduce_dgrad = False


def mark_tp_linear_warning_given() -> None:
    """megatron-core's one-time TP linear warning counts as given (see the module's notes)."""
    tp_layers.linear_with_grad_accumulation_and_async_allreduce.warned = True


def library_tokenizer(megatron_tokenizer):
    """The library object a megatron-core text tokenizer wraps."""
    return megatron_tokenizer._tokenizer


@contextlib.contextmanager
def solo_process_group():
    """A world of one, so megatron-core's "rank 0 builds the cache" path runs on this process."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def check() -> None:
    """What this module relies on is still there (run at import)."""
    require_source(LIBRARY, MegatronTokenizerText.__init__, "self._tokenizer =",
                   "text tokenizers' wrapped library tokenizer (MegatronTokenizerText._tokenizer)")
    require_attribute("torch", nn.Module(), "_load_state_dict_pre_hooks",
                      "nn.Module._load_state_dict_pre_hooks")
    require_parameters(LIBRARY, BlendedMegatronDatasetBuilder.__init__,
                       ["self", "cls", "sizes", "is_built_on_rank", "config"],
                       "BlendedMegatronDatasetBuilder(cls, sizes, is_built_on_rank, config)")
    for fragment in ("self.allreduce_dgrad", "copy_to_tensor_model_parallel_region"):
        require_source(LIBRARY, ColumnParallelLinear.forward, fragment,
                       "ColumnParallelLinear.forward's input-gradient all-reduce")
    require_attribute(LIBRARY, tp_layers.linear_with_grad_accumulation_and_async_allreduce,
                      "warned", "linear_with_grad_accumulation_and_async_allreduce.warned")
    require_source(LIBRARY, tp_layers.linear_with_grad_accumulation_and_async_allreduce,
                   "linear_with_grad_accumulation_and_async_allreduce.warned = True",
                   "the TP linear's one-time warning flag")
    require_source(LIBRARY, gpt_dataset.GPTDataset._build_document_sample_shuffle_indices,
                   "torch.distributed.get_rank() == 0",
                   "GPTDataset's cache build on rank 0 (_build_document_sample_shuffle_indices)")


check()
