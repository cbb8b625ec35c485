"""The three architectures: decoder-only GPT, encoder-only masked LM, encoder-decoder."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .init import init_weights, stack_gains
from .attention import Documents
from .layers import Embeddings, Rotary, TransformerLayer
from .mup import attention_scale, output_multiplier
from .norms import make_norm
from .spec import SCHEMES, layer_spec


class TransformerStack(nn.Module):
    """num_layers layers of one side ("encoder" | "decoder") and the scheme's final norm."""

    def __init__(self, cfg: ModelConfig, side: str, num_layers: int, causal: bool, cross: bool):
        super().__init__()
        gains, scale = stack_gains(cfg, side), attention_scale(cfg)
        self.layers = nn.ModuleList(
            TransformerLayer(cfg, layer_spec(cfg.norm, i + 1, gains, causal=causal, cross=cross,
                                             qk_norm=cfg.qk_norm, attention_scale=scale))
            for i in range(num_layers))
        self.final_norm = (make_norm(cfg.norm_type, cfg.hidden_size, cfg.norm_eps)
                           if SCHEMES[cfg.norm].final_norm else None)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, **kwargs)
        return self.final_norm(x) if self.final_norm is not None else x


class LanguageModel(nn.Module):
    """Shared pieces: embeddings, optional RoPE tables, the output projection (tied or not)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = Embeddings(cfg)
        self.rotary = Rotary(cfg) if cfg.position == "rope" else None
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.word.weight
        self.readout_multiplier = output_multiplier(cfg)  # muP's 1/m on the logits (else 1)

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of the final hidden states [b, s, d] -> [b, s, vocab]; the multiplier is
        applied to the head's input, as muP's MuReadout does (the same product, d not V wide)."""
        if self.readout_multiplier != 1.0:
            x = x * self.readout_multiplier
        return self.lm_head(x)

    def rope(self, seq_len: int, position_ids: Optional[torch.Tensor] = None):
        return self.rotary(seq_len, position_ids) if self.rotary is not None else None

    def _check_length(self, tokens: torch.Tensor, what: str) -> None:
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(f"{what} has {tokens.shape[1]} positions but model.max_seq_len is "
                             f"{self.config.max_seq_len}")


class MagnetoGPT(LanguageModel):
    """Decoder-only causal LM: tokens [b, s] -> logits [b, s, vocab].

    Packed sequences (several documents per sequence): position_ids [b, s] restart per
    document, document_ids [b, s] make attention block-causal (model/attention.py). Under
    context parallelism each rank sees its chunks of the sequence, and position_ids carry
    their global offsets."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.decoder = TransformerStack(cfg, "decoder", cfg.num_layers, causal=True, cross=False)

    def forward(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_length(tokens, "tokens")
        documents = Documents(document_ids) if document_ids is not None else None
        x = self.decoder(self.embed(tokens, position_ids),
                         rope=self.rope(tokens.shape[1], position_ids),
                         documents=documents)                                # [b, s, d]
        return self.readout(x)


class MagnetoBert(LanguageModel):
    """Encoder-only masked LM: tokens [b, s], padding_mask [b, s] (True = real token)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.encoder = TransformerStack(cfg, "encoder", cfg.num_layers, causal=False, cross=False)
        # BERT's MLM transform: dense -> gelu -> norm, then the (tied) vocabulary projection.
        self.mlm_dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.mlm_norm = make_norm(cfg.norm_type, cfg.hidden_size, cfg.norm_eps)

    def forward(self, tokens: torch.Tensor,
                padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_length(tokens, "tokens")
        mask = padding_mask[:, None, None, :].bool() if padding_mask is not None else None
        x = self.encoder(self.embed(tokens), mask=mask, rope=self.rope(tokens.shape[1]))
        return self.readout(self.mlm_norm(F.gelu(self.mlm_dense(x))))


class MagnetoEncoderDecoder(LanguageModel):
    """Translation-style model with one shared vocabulary: (src [b, t], tgt [b, s]) -> [b, s, V]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.encoder = TransformerStack(cfg, "encoder", cfg.num_layers, causal=False, cross=False)
        self.decoder = TransformerStack(cfg, "decoder", cfg.num_decoder_layers, causal=True,
                                        cross=True)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor,
                src_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_length(src, "src")
        self._check_length(tgt, "tgt")
        mask = src_padding_mask[:, None, None, :].bool() if src_padding_mask is not None else None
        memory = self.encoder(self.embed(src), mask=mask, rope=self.rope(src.shape[1]))
        x = self.decoder(self.embed(tgt), rope=self.rope(tgt.shape[1]), memory=memory,
                         memory_mask=mask)
        return self.readout(x)


MODEL_CLASSES = {"decoder": MagnetoGPT, "encoder": MagnetoBert,
                 "encoder_decoder": MagnetoEncoderDecoder}


def model_skeleton(cfg: ModelConfig) -> LanguageModel:
    """The model's structure, parameter names and shapes on the meta device: no memory and no
    init. parallelize() gives one rank memory for its shard only (parallel/materialize.py)."""
    with torch.device("meta"):
        return MODEL_CLASSES[cfg.arch](cfg)


def build_model(cfg: ModelConfig, seed: Optional[int] = None) -> LanguageModel:
    """Build and initialize a full (unsharded) model on the current default device. Each
    parameter comes from (seed, its name) (init.InitWeights); seed None draws one from torch's
    global generator, so torch.manual_seed(s) then build_model(cfg) is reproducible."""
    model = MODEL_CLASSES[cfg.arch](cfg)
    if seed is None:
        seed = int(torch.randint(2 ** 62, ()).item())
    init_weights(model, cfg, seed)
    return model
