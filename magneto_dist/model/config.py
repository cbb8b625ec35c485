"""ModelConfig: every architectural choice of a Magneto-family model, validated up front."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

ARCHS = ("decoder", "encoder", "encoder_decoder")
NORM_SCHEMES = ("post_ln", "pre_ln", "deepnorm", "magneto", "normformer", "lns")
NORM_TYPES = ("layernorm", "rmsnorm")
INIT_STYLES = ("paper", "torchscale")
POSITIONS = ("learned", "rope")
ACTIVATIONS = ("gelu", "swiglu")
PARAMETRIZATIONS = ("standard", "mup")


@dataclass
class ModelConfig:
    arch: str = "decoder"             # decoder (GPT, causal) | encoder (BERT, masked LM) | encoder_decoder
    norm: str = "magneto"             # where the norms sit: post_ln | pre_ln | deepnorm | magneto | normformer | lns
    norm_type: str = "layernorm"      # what each norm computes: layernorm | rmsnorm
    init_style: str = "paper"         # paper: xavier_normal(gain) | torchscale: default Linear init times gain
    num_layers: int = 12              # depth (the encoder's depth for encoder_decoder)
    num_decoder_layers: Optional[int] = None  # decoder depth, encoder_decoder only (defaults to num_layers)
    hidden_size: int = 256            # d, the residual-stream width
    num_heads: int = 4                # attention heads; hidden_size must divide evenly
    ffn_hidden_size: Optional[int] = None  # FFN width; None means 4 * hidden_size
    vocab_size: int = 1000            # token vocabulary (TP pads its vocab-parallel shards itself)
    max_seq_len: int = 128            # longest sequence (learned positions table size, RoPE cache)
    position: str = "learned"         # learned absolute embeddings | rope (rotary, on q and k)
    rope_base: float = 10000.0        # RoPE frequency base
    activation: str = "gelu"          # gelu | swiglu (gated: W_1 and a gate of the same width)
    tie_embeddings: bool = True       # share the input embedding with the output projection
    dropout: float = 0.0              # dropout on embeddings, attention probabilities and sublayer outputs
    bias: bool = True                 # biases in the linear layers
    norm_eps: float = 1e-5            # epsilon inside every norm
    embedding_init_std: float = 0.02  # std of the token/position embedding init (GPT convention)
    qk_norm: bool = False             # QK-norm: a norm (of norm_type) on each head's queries and
                                      # keys, before RoPE (per head: see layers.Attention)
    num_query_groups: Optional[int] = None  # grouped-query attention: key/value heads, each
                                      # shared by num_heads / num_query_groups query heads
                                      # (Megatron's name; None: num_heads, plain multi-head)
    parametrization: str = "standard"  # standard | mup (muP: width-scaled hidden-matrix LRs, an
                                      # output-logit multiplier, 1/d_head attention; mup.py)
    mup_base_hidden_size: Optional[int] = None  # mup: the width the hyperparameters were tuned
                                      # at (there the model is the standard one)
    mup_base_head_dim: Optional[int] = None  # mup: the head dim at that width (None: this
                                      # model's, i.e. widths grow by adding heads)

    def __post_init__(self):
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.arch == "encoder_decoder" and self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def query_groups(self) -> int:
        """Key/value heads: num_query_groups, or num_heads when unset (plain multi-head)."""
        return self.num_query_groups or self.num_heads

    @property
    def kv_size(self) -> int:
        """Width of the key and value projections: query_groups heads of head_dim."""
        return self.query_groups * self.head_dim

    @property
    def encoder_layers(self) -> int:
        """Depth of the encoder stack (0 for decoder-only)."""
        return 0 if self.arch == "decoder" else self.num_layers

    @property
    def decoder_layers(self) -> int:
        """Depth of the decoder stack (0 for encoder-only)."""
        if self.arch == "decoder":
            return self.num_layers
        return self.num_decoder_layers if self.arch == "encoder_decoder" else 0

    def validate(self) -> None:
        """Raise ValueError naming the offending field; called on construction."""
        choices = {"arch": ARCHS, "norm": NORM_SCHEMES, "norm_type": NORM_TYPES,
                   "init_style": INIT_STYLES, "position": POSITIONS, "activation": ACTIVATIONS,
                   "parametrization": PARAMETRIZATIONS}
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"model.{name}={value!r} is not one of {', '.join(allowed)}")
        for name in ("num_layers", "hidden_size", "num_heads", "ffn_hidden_size", "vocab_size",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.{name}={value!r} must be a positive integer")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by "
                             f"model.num_heads={self.num_heads}")
        groups = self.num_query_groups
        if groups is not None and (not isinstance(groups, int) or isinstance(groups, bool)
                                   or groups < 1):
            raise ValueError(f"model.num_query_groups={groups!r} must be a positive integer (or "
                             "null: one key/value head per query head)")
        if self.num_heads % self.query_groups:
            raise ValueError(f"model.num_query_groups={self.num_query_groups} does not divide "
                             f"model.num_heads={self.num_heads}: each key/value head serves the "
                             "same number of query heads; use a divisor of num_heads")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"model.position='rope' needs an even head dim; got "
                             f"hidden_size/num_heads={self.head_dim}")
        if self.arch == "encoder_decoder":
            if not isinstance(self.num_decoder_layers, int) or self.num_decoder_layers < 1:
                raise ValueError(f"model.num_decoder_layers={self.num_decoder_layers!r} must be a "
                                 "positive integer for arch='encoder_decoder'")
        elif self.num_decoder_layers is not None:
            raise ValueError(f"model.num_decoder_layers is only used by arch='encoder_decoder' "
                             f"(arch={self.arch!r}); remove it or set num_layers")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.norm_eps <= 0:
            raise ValueError(f"model.norm_eps={self.norm_eps} must be positive")
        self._validate_mup()

    def _validate_mup(self) -> None:
        base = {"mup_base_hidden_size": self.mup_base_hidden_size,
                "mup_base_head_dim": self.mup_base_head_dim}
        if self.parametrization == "standard":
            given = [k for k, v in base.items() if v is not None]
            if given:
                raise ValueError(f"model.{given[0]} is only used by model.parametrization='mup'; "
                                 "remove it or set the parametrization")
            return
        if self.mup_base_hidden_size is None:
            raise ValueError("model.parametrization='mup' needs model.mup_base_hidden_size: the "
                             "width whose hyperparameters (LR, init) the run transfers")
        for name, value in base.items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise ValueError(f"model.{name}={value!r} must be a positive integer")

    @classmethod
    def field_names(cls) -> set:
        return {f.name for f in fields(cls)}
