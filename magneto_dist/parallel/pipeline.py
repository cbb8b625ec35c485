"""Pipeline parallelism: a GPT (already tensor-parallel if TP > 1) cut into DeepSpeed stages.

The model becomes a flat list of pipe layers: word embedding, embedding tail (positions,
dropout), one pipe layer per transformer layer, final norm, head. DeepSpeed builds only the
layers of its own stage; each pipe layer wraps the module of the model (a meta-device skeleton
in production), which is materialized as the layer is built, so a stage gets memory for its
own layers only, holding exactly the single-process weights (materialize.py). DeepSpeed keeps
every LayerSpec, arguments included, for the whole run, so the specs name modules in a holder
that is emptied after the build: the other stages' layers are then freed. With tied
embeddings the word embedding is a TiedLayerSpec shared by the first and last stage (DeepSpeed
all-reduces its gradient between them). The topology (pipe, data, model) must match
megatron-core's rank order, which it does. Under sequence parallelism the hidden activations
passed between stages are [b, s/tp, d]; position_ids and document_ids stay whole [b, s].

Positions and documents: when a batch carries position_ids (context parallelism's chunk
offsets, positions restarting per packed document) and document_ids (document masking), they
travel with the activations from stage to stage as integer tensors of the pipeline's tuples,
(hidden [b, s, d], position_ids [b, s], document_ids [b, s]), and each stage builds its own
attention mask from them (model/attention.py Documents): [b, s] integers cost nothing to send
next to [b, s, d] activations, while a mask rebuilt per layer would cost each layer's mask
build. Without them the activations are a plain tensor, as before.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import tensor_parallel
from torch import nn

from ..compat.ds_engine import CountingHookPipelineModule
from ..model.attention import Documents
from ..model.layers import Rotary, positions_of
from ..model.models import MagnetoGPT
from . import state
from .materialize import FullWeights, materialize
from .pipe_names import TIED_KEY, pipe_plan
from .sequence_parallel import gather_sequence


class ModuleSource:
    """The model's modules by dotted name, materialized on the way out (except while the
    pipeline only counts parameters), until release(); and whether the model is sequence-
    parallel, which the pipe layers that see the sequence length or feed the head need."""

    def __init__(self, model: nn.Module, weights: Optional[FullWeights], device: torch.device,
                 sequence_parallel: bool = False):
        self.model, self.weights, self.device = model, weights, device
        self.sequence_parallel = sequence_parallel
        self.counting = False

    def get(self, name):
        if name is None:
            return None
        module = self.model.get_submodule(name)
        if not self.counting:
            materialize(module, name, self.weights, self.device)
        return module

    def release(self) -> None:
        self.model = None


def _split(inputs):
    """(the activations, (position_ids, document_ids) or ()) of a pipe layer's input."""
    if isinstance(inputs, tuple):
        return inputs[0], inputs[1:]
    return inputs, ()


def _join(x: torch.Tensor, extras: tuple):
    return (x, *extras) if extras else x


class WordEmbeddingPipe(nn.Module):
    """tokens [b, s] -> [b, s, d] (position and document ids passed on); on the last stage
    (tied) also the LM head."""

    def __init__(self, source: ModuleSource, readout_multiplier: float):
        super().__init__()
        self.word = source.get("embed.word")
        self.readout_multiplier = readout_multiplier  # LanguageModel.readout's (muP: 1/m)
        self.sequence_parallel = source.sequence_parallel

    def forward(self, inputs):
        tokens, extras = _split(inputs)
        return _join(self.word(tokens), extras)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T over this rank's vocab slice (the column-parallel LM head, weight tied);
        under SP x [b, s/tp, d] is gathered first, as SequenceParallelVocabHead does."""
        if self.readout_multiplier != 1.0:
            x = x * self.readout_multiplier
        if self.sequence_parallel:
            x = gather_sequence(x)
        else:
            x = tensor_parallel.copy_to_tensor_model_parallel_region(x)
        return F.linear(x, self.word.weight)


def tied_head(module: WordEmbeddingPipe, inputs) -> torch.Tensor:
    return module.logits(_split(inputs)[0])


class EmbeddingTailPipe(nn.Module):
    """Learned positions (if any), the split into the layers' layout (sequence parallelism)
    and embedding dropout: the rest of Embeddings.forward."""

    def __init__(self, source: ModuleSource, learned_positions: bool):
        super().__init__()
        self.position = source.get("embed.position" if learned_positions else None)
        self.to_layers = source.get("embed.to_layers")
        self.dropout = source.get("embed.dropout")

    def forward(self, inputs):
        x, extras = _split(inputs)
        if self.position is not None:
            x = x + self.position(positions_of(x, extras[0] if extras else None))
        return _join(self.dropout(self.to_layers(x)), extras)


class TransformerLayerPipe(nn.Module):
    """One decoder layer; RoPE tables are rebuilt per layer (non-persistent, cheap), and the
    document mask per stage (Documents.shared: the layers of a stage see the same ids); both for
    the whole sequence (under SP x holds 1/TP of it, attention sees it gathered)."""

    def __init__(self, source: ModuleSource, name: str, cfg):
        super().__init__()
        self.layer = source.get(name)
        self.rotary = Rotary(cfg) if cfg.position == "rope" else None
        self.sequence_parts = state.tp_size() if source.sequence_parallel else 1

    def forward(self, inputs):
        x, extras = _split(inputs)
        positions = extras[0] if extras else None
        rope = (self.rotary(x.shape[1] * self.sequence_parts, positions)
                if self.rotary is not None else None)
        documents = Documents.shared(extras[1]) if len(extras) > 1 else None
        return _join(self.layer(x, rope=rope, documents=documents), extras)


class SubmodulePipe(nn.Module):
    """The final norm or the untied head as a pipe layer, registered under the model's own
    attribute name (final_norm, lm_head): checkpoint tools match parameters by name."""

    def __init__(self, source: ModuleSource, name: str):
        super().__init__()
        self.attribute = name.rsplit(".", 1)[-1]
        self.add_module(self.attribute, source.get(name))

    def forward(self, inputs) -> torch.Tensor:
        """The final norm or the head: position and document ids end here."""
        return getattr(self, self.attribute)(_split(inputs)[0])


class HeadPipe(SubmodulePipe):
    """The untied head, its input times LanguageModel.readout's multiplier (muP: 1/m)."""

    def __init__(self, source: ModuleSource, name: str, readout_multiplier: float):
        super().__init__(source, name)
        self.readout_multiplier = readout_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.readout_multiplier if self.readout_multiplier != 1.0
                               else x)


class ShardOnlyPipelineModule(CountingHookPipelineModule):
    """DeepSpeed's PipelineModule, except that balancing stages by parameter count, which
    builds every layer spec on every rank, sees the skeleton's meta modules: only the layers of
    this rank's stage, built after it, get memory."""

    @contextlib.contextmanager
    def counting_parameters(self):
        source = self._layer_specs[0].module_args[0]
        assert isinstance(source, ModuleSource), type(source)
        source.counting = True
        try:
            yield
        finally:
            source.counting = False


def pipeline_layers(model: MagnetoGPT, source: ModuleSource) -> list:
    cfg, multiplier = model.config, model.readout_multiplier
    word = (TiedLayerSpec(TIED_KEY, WordEmbeddingPipe, source, multiplier,
                          tied_weight_attr="word.weight")
            if cfg.tie_embeddings else LayerSpec(WordEmbeddingPipe, source, multiplier))
    specs = {
        "word": lambda _: word,
        "tail": lambda _: LayerSpec(EmbeddingTailPipe, source, cfg.position == "learned"),
        "layer": lambda name: LayerSpec(TransformerLayerPipe, source, name, cfg),
        "submodule": lambda name: (LayerSpec(HeadPipe, source, name, multiplier)
                                   if name == "lm_head" else LayerSpec(SubmodulePipe, source,
                                                                        name)),
        "tied_head": lambda _: TiedLayerSpec(TIED_KEY, WordEmbeddingPipe, source, multiplier,
                                             forward_fn=tied_head, tied_weight_attr="word.weight"),
    }
    return [specs[kind](name) for kind, name in pipe_plan(model)]


def build_pipeline(model: MagnetoGPT, tp: int, pp: int, dp: int, loss_fn, partition: str,
                   weights: Optional[FullWeights], device: torch.device,
                   sequence_parallel: bool = False) -> PipelineModule:
    """partition: "parameters" balances parameter counts (read from the shapes, so a meta
    model partitions as a full one), "layers" transformer layers. sequence_parallel: the model
    was made sequence-parallel (apply_tensor_parallel)."""
    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    method = "parameters" if partition == "parameters" else "type:TransformerLayerPipe"
    source = ModuleSource(model, weights, device, sequence_parallel)
    pipe = ShardOnlyPipelineModule(layers=pipeline_layers(model, source), topology=topology,
                                   loss_fn=loss_fn, partition_method=method,
                                   activation_checkpoint_interval=0)
    source.release()
    return pipe
