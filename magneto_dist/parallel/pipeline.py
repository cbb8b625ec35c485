"""Pipeline parallelism: a GPT (already tensor-parallel if TP > 1) cut into DeepSpeed stages.

The model becomes a flat list of pipe layers: word embedding, embedding tail (positions,
dropout), one pipe layer per transformer layer, final norm, head. DeepSpeed builds only the
layers of its own stage; each pipe layer wraps the module of the full model, so every stage
holds exactly the single-process weights. With tied embeddings the word embedding is a
TiedLayerSpec shared by the first and last stage (DeepSpeed all-reduces its gradient between
them). The topology (pipe, data, model) must match megatron-core's rank order, which it does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import tensor_parallel
from torch import nn

from ..model.layers import Rotary
from ..model.models import MagnetoGPT


class WordEmbeddingPipe(nn.Module):
    """tokens [b, s] -> [b, s, d]; on the last stage (tied) also the LM head."""

    def __init__(self, word: nn.Module):
        super().__init__()
        self.word = word

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.word(tokens)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T over this rank's vocab slice (the column-parallel LM head, weight tied)."""
        x = tensor_parallel.copy_to_tensor_model_parallel_region(x)
        return F.linear(x, self.word.weight)


def tied_head(module: WordEmbeddingPipe, x: torch.Tensor) -> torch.Tensor:
    return module.logits(x)


class EmbeddingTailPipe(nn.Module):
    """Learned positions (if any) and embedding dropout: the rest of Embeddings.forward."""

    def __init__(self, position, dropout: nn.Module):
        super().__init__()
        self.position, self.dropout = position, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.position is not None:
            x = x + self.position(torch.arange(x.shape[1], device=x.device))
        return self.dropout(x)


class TransformerLayerPipe(nn.Module):
    """One decoder layer; RoPE tables are rebuilt per layer (non-persistent, cheap)."""

    def __init__(self, layer: nn.Module, cfg):
        super().__init__()
        self.layer = layer
        self.rotary = Rotary(cfg) if cfg.position == "rope" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rope = self.rotary(x.shape[1]) if self.rotary is not None else None
        return self.layer(x, rope=rope)


class FinalNormPipe(nn.Module):
    def __init__(self, final_norm: nn.Module):
        super().__init__()
        self.final_norm = final_norm  # named as in the model: checkpoint tools match on names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_norm(x)


class HeadPipe(nn.Module):
    """The untied LM head."""

    def __init__(self, lm_head: nn.Module):
        super().__init__()
        self.lm_head = lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)


def pipeline_layers(model: MagnetoGPT) -> list:
    cfg = model.config
    tied = model.lm_head.weight is model.embed.word.weight
    word = (TiedLayerSpec("word_embedding", WordEmbeddingPipe, model.embed.word,
                          tied_weight_attr="word.weight") if tied
            else LayerSpec(WordEmbeddingPipe, model.embed.word))
    layers = [word, LayerSpec(EmbeddingTailPipe, model.embed.position, model.embed.dropout)]
    layers += [LayerSpec(TransformerLayerPipe, layer, cfg) for layer in model.decoder.layers]
    if model.decoder.final_norm is not None:
        layers.append(LayerSpec(FinalNormPipe, model.decoder.final_norm))
    if tied:
        layers.append(TiedLayerSpec("word_embedding", WordEmbeddingPipe, model.embed.word,
                                    forward_fn=tied_head, tied_weight_attr="word.weight"))
    else:
        layers.append(LayerSpec(HeadPipe, model.lm_head))
    return layers


def build_pipeline(model: MagnetoGPT, tp: int, pp: int, dp: int, loss_fn,
                   partition: str) -> PipelineModule:
    """partition: "parameters" balances parameter counts, "layers" transformer layers."""
    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    method = "parameters" if partition == "parameters" else "type:TransformerLayerPipe"
    return PipelineModule(layers=pipeline_layers(model), topology=topology, loss_fn=loss_fn,
                          partition_method=method, activation_checkpoint_interval=0)
