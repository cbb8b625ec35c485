"""Configuration of a Magneto-family transformer (Sub-LN, DeepNorm, Pre-/Post-LN, NormFormer,
LayerNorm Scaling) for Hugging Face transformers.

Written by magneto_dist's exporter (tools/convert_checkpoint.py --to hf) into every export, next
to modeling_magneto.py; it needs torch and transformers only. Load the directory with
AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) (decoders) or
AutoModelForMaskedLM (encoders).

Where a scheme puts its norms is a row of SCHEMES (megatron-core's slot idea): every attention
and FFN sublayer computes

    x <- post_norm(alpha * x + output_norm(f(pre_norm(x) * input_scale)))

with the inner norm (Sub-LN: merged heads before W_o, FFN hidden before W_2) and NormFormer's
per-head scale inside f; a slot that is off is the identity. QK-norm (a norm on each head's
queries and keys, before RoPE) is the config's qk_norm in every scheme.
"""
from transformers import PretrainedConfig

_PRE = {"pre_norm": True, "inner_norm": False, "output_norm": False, "post_norm": False,
        "head_scale": False, "qk_norm": False}
_POST = {**_PRE, "pre_norm": False, "post_norm": True}
_SUB_LN = {**_PRE, "inner_norm": True}
_NORMFORMER_ATTENTION = {**_PRE, "output_norm": True, "head_scale": True}

# norm scheme -> its slots; the same table as magneto_dist/model/spec.py (a test compares them).
SCHEMES = {
    "post_ln": {"attention": _POST, "ffn": _POST, "final_norm": False, "scaled_residual": False,
                "depth_scaled_input": False},
    "pre_ln": {"attention": _PRE, "ffn": _PRE, "final_norm": True, "scaled_residual": False,
               "depth_scaled_input": False},
    "deepnorm": {"attention": _POST, "ffn": _POST, "final_norm": False, "scaled_residual": True,
                 "depth_scaled_input": False},
    "magneto": {"attention": _SUB_LN, "ffn": _SUB_LN, "final_norm": True,
                "scaled_residual": False, "depth_scaled_input": False},
    "normformer": {"attention": _NORMFORMER_ATTENTION, "ffn": _SUB_LN, "final_norm": True,
                   "scaled_residual": False, "depth_scaled_input": False},
    "lns": {"attention": _PRE, "ffn": _PRE, "final_norm": True, "scaled_residual": False,
            "depth_scaled_input": True},
}
CHOICES = {
    "magneto_arch": ("decoder", "encoder"),   # causal LM | masked LM (one stack either way)
    "norm_scheme": tuple(SCHEMES),
    "norm_type": ("layernorm", "rmsnorm"),
    "position_embedding_type": ("learned", "rope"),
    "hidden_act": ("gelu", "swiglu"),
    "init_style": ("paper", "torchscale"),
    "parametrization": ("standard", "mup"),
}


class MagnetoConfig(PretrainedConfig):
    model_type = "magneto"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        magneto_arch="decoder",          # decoder: causal LM with a KV cache | encoder: masked LM
        norm_scheme="magneto",           # a row of SCHEMES
        norm_type="layernorm",           # what every norm computes: layernorm | rmsnorm
        vocab_size=8192,
        hidden_size=256,                 # d, the residual-stream width
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=1024,          # FFN width
        max_position_embeddings=128,     # learned position table size (the trained length)
        position_embedding_type="rope",  # learned absolute positions | rope (on q and k)
        rope_theta=10000.0,              # RoPE frequency base
        hidden_act="gelu",               # gelu | swiglu (silu(gate x) * (W_1 x))
        use_bias=True,                   # biases in the attention and FFN projections
        norm_eps=1e-5,
        dropout=0.0,                     # embeddings, attention probabilities, sublayer outputs
        residual_alpha=1.0,              # DeepNorm's alpha (x <- LN(alpha x + f(x))), else 1
        init_gain=1.0,                   # xavier gain of W_v, W_o, W_1, W_2 at init (Magneto
                                         # gamma, DeepNet beta); W_q, W_k get 1
        init_style="paper",              # paper: xavier_normal(gain) | torchscale:
                                         # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) x gain
        embedding_init_std=0.02,         # token/position embedding (and untied head) init std
        tie_word_embeddings=True,
        use_cache=True,
        qk_norm=False,                   # a norm (norm_type) on each head's queries and keys
        num_key_value_heads=None,        # grouped-query attention: key/value heads (None: all)
        parametrization="standard",      # standard | mup (recorded; its factors are below)
        mup_base_hidden_size=None,       # mup: the base width (recorded)
        mup_base_head_dim=None,          # mup: the base head dim (recorded)
        attention_scale=None,            # softmax scale of q.k (None: 1/sqrt(head_dim); muP's
                                         # sqrt(base head dim) / head_dim)
        logit_multiplier=1.0,            # factor on the head's input (muP: base width / width)
        **kwargs,
    ):
        self.magneto_arch = magneto_arch
        self.norm_scheme = norm_scheme
        self.norm_type = norm_type
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.position_embedding_type = position_embedding_type
        self.rope_theta = rope_theta
        self.hidden_act = hidden_act
        self.use_bias = use_bias
        self.norm_eps = norm_eps
        self.dropout = dropout
        self.residual_alpha = residual_alpha
        self.init_gain = init_gain
        self.init_style = init_style
        self.embedding_init_std = embedding_init_std
        self.use_cache = use_cache
        self.qk_norm = qk_norm
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.parametrization = parametrization
        self.mup_base_hidden_size = mup_base_hidden_size
        self.mup_base_head_dim = mup_base_head_dim
        self.attention_scale = attention_scale
        self.logit_multiplier = logit_multiplier
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by "
                             f"num_attention_heads={num_attention_heads}")
        if num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} does not divide "
                             f"num_attention_heads={num_attention_heads}")
        kwargs.setdefault("is_decoder", magneto_arch == "decoder")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @property
    def slots(self):
        """This config's row of SCHEMES."""
        return SCHEMES[self.norm_scheme]
