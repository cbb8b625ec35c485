"""Magneto-family transformers for Hugging Face transformers: MagnetoModel (hidden states),
MagnetoForCausalLM (decoder, KV cache, generate()) and MagnetoForMaskedLM (encoder).

Written by magneto_dist's exporter into every export; needs torch and transformers only. The
module tree and parameter names mirror magneto_dist's own model under `model.` (heads at the top),
and every operation is the same one in the same order, so the logits equal the trainer's.
Attention runs through torch's scaled_dot_product_attention, or written out (softmax(q k^T) v)
under attn_implementation="eager", the one way to get the attention probabilities back
(output_attentions), as in transformers' own models. Norms compute in fp32 whatever the
activation dtype (bf16 statistics lose too many bits), as in training.
"""
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import (BaseModelOutputWithPast, CausalLMOutputWithPast,
                                           MaskedLMOutput)
from transformers.utils import logging

from .configuration_magneto import MagnetoConfig

logger = logging.get_logger(__name__)


class MagnetoLayerNorm(nn.LayerNorm):
    def forward(self, x):
        y = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                         self.eps)
        return y.type_as(x)


class MagnetoRMSNorm(nn.RMSNorm):
    def forward(self, x):
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(),
                          self.eps).type_as(x)


NORMS = {"layernorm": MagnetoLayerNorm, "rmsnorm": MagnetoRMSNorm}


def make_norm(config, width):
    """The provider every norm slot is filled from."""
    return NORMS[config.norm_type](width, eps=config.norm_eps)


def linear(config, fan_in, fan_out, gain, bias=None):
    """nn.Linear that remembers its init gain (for _init_weights when training from scratch)."""
    layer = nn.Linear(fan_in, fan_out, bias=config.use_bias if bias is None else bias)
    layer.magneto_init_gain = gain
    return layer


def rotary_tables(config, position_ids):
    """RoPE (cos, sin) for positions [b, s] -> [b, 1, s, hd], "rotate half" layout. Computed
    per call (a handful of flops) rather than kept as a buffer, so no table limits the length."""
    hd = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (
        torch.arange(0, hd, 2, device=position_ids.device).float() / hd)
    angles = position_ids.float()[..., None] * inv_freq          # [b, s, hd/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]        # [b, 1, s, hd]
    return angles.cos(), angles.sin()


def apply_rotary(x, rope):
    """x: [b, h, s, hd]; rotates pairs (i, i + hd/2) by the position angle."""
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


class MagnetoEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = (nn.Embedding(config.max_position_embeddings, config.hidden_size)
                         if config.position_embedding_type == "learned" else None)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids, position_ids):
        x = self.word(input_ids)                                     # [b, s, d]
        if self.position is not None:
            if int(position_ids.max()) >= self.position.num_embeddings:
                raise ValueError(f"position {int(position_ids.max())} is beyond the learned "
                                 f"table (max_position_embeddings="
                                 f"{self.position.num_embeddings})")
            x = x + self.position(position_ids)
        return self.dropout(x)


class MagnetoSublayer(nn.Module):
    """x -> post_norm(alpha * x + output_norm(dropout(f(pre_norm(x) * input_scale))))."""

    def __init__(self, config, slots, layer_number):
        super().__init__()
        scheme = config.slots
        self.pre_norm = make_norm(config, config.hidden_size) if slots["pre_norm"] else None
        self.output_norm = make_norm(config, config.hidden_size) if slots["output_norm"] else None
        self.post_norm = make_norm(config, config.hidden_size) if slots["post_norm"] else None
        self.residual_alpha = config.residual_alpha if scheme["scaled_residual"] else 1.0
        # LayerNorm Scaling: the pre-norm output times 1/sqrt(layer number)
        self.input_scale = 1.0 / math.sqrt(layer_number) if scheme["depth_scaled_input"] else 1.0
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, **kwargs):
        h = x
        if self.pre_norm is not None:
            h = self.pre_norm(x)
            if self.input_scale != 1.0:
                h = h * self.input_scale
        y = self.dropout(self.transform(h, **kwargs))
        if self.output_norm is not None:
            y = self.output_norm(y)
        x = x * self.residual_alpha + y if self.residual_alpha != 1.0 else x + y
        return self.post_norm(x) if self.post_norm is not None else x


class MagnetoAttention(MagnetoSublayer):
    def __init__(self, config, layer_number):
        slots = config.slots["attention"]
        super().__init__(config, slots, layer_number)
        d, gain, hd = config.hidden_size, config.init_gain, config.head_dim
        kv = config.num_key_value_heads * hd  # grouped-query attention: narrower k and v
        self.q_proj = linear(config, d, d, 1.0)
        self.k_proj = linear(config, d, kv, 1.0)
        self.v_proj = linear(config, d, kv, gain)
        self.out_proj = linear(config, d, d, gain)
        # QK-norm per head: one gain of width head_dim shared by every head
        self.q_norm = make_norm(config, hd) if config.qk_norm else None
        self.k_norm = make_norm(config, hd) if config.qk_norm else None
        # Sub-LN: normalizes the merged heads (width d) before W_o.
        self.inner_norm = make_norm(config, d) if slots["inner_norm"] else None
        self.head_scale = (nn.Parameter(torch.ones(config.num_attention_heads))
                           if slots["head_scale"] else None)
        self.head_dim = hd
        self.softmax_scale = config.attention_scale  # None: 1/sqrt(head_dim)
        self.layer_index = layer_number - 1  # its slot in the KV cache
        self.attn_dropout = config.dropout
        self.config = config  # its _attn_implementation is set when the model loads

    def transform(self, h, mask=None, is_causal=False, rope=None, cache=None, attentions=None):
        """h: [b, s, d]; mask: bool [b, 1, s, t] (True = may attend) or None; attentions: a
        list that gets this layer's probabilities [b, heads, s, t] (eager attention only)."""
        b, s, _ = h.shape
        q = self.q_proj(h).view(b, s, -1, self.head_dim)                   # [b, s, heads, hd]
        k = self.k_proj(h).view(b, s, -1, self.head_dim)                   # [b, s, groups, hd]
        v = self.v_proj(h).view(b, s, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:  # before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if cache is not None:  # k, v of every position so far: [b, groups, t, hd]
            k, v = cache.update(k, v, self.layer_index)
        heads = q.shape[1]  # each group serves heads / groups consecutive query heads
        if k.shape[1] != heads:
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
        dropout = self.attn_dropout if self.training else 0.0
        if self.config._attn_implementation == "eager":
            y, probs = eager_attention(q, k, v, mask, is_causal, dropout,
                                       self.softmax_scale)                 # [b, heads, s, hd]
            if attentions is not None:
                attentions.append(probs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               scale=self.softmax_scale,
                                               dropout_p=dropout)          # [b, heads, s, hd]
        if self.head_scale is not None:
            y = y * self.head_scale.view(1, -1, 1, 1).to(y.dtype)
        y = y.transpose(1, 2).reshape(b, s, -1)                            # [b, s, d]
        if self.inner_norm is not None:
            y = self.inner_norm(y)
        return self.out_proj(y)


def eager_attention(q, k, v, mask, is_causal, dropout, scale=None):
    """What scaled_dot_product_attention computes, written out so that the probabilities can be
    returned: (output [b, heads, s, hd], probabilities [b, heads, s, t]). scale: the one on the
    scores (muP's 1/head_dim), None for 1/sqrt(head_dim) as in sdpa. The softmax is in fp32; a
    causal mask puts the s queries at the last s of the t key positions."""
    s, t = q.shape[-2], k.shape[-2]
    scale = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-2, -1)).float() * scale                     # [b, heads, s, t]
    if is_causal:
        mask = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(t - s)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1).type_as(q)
    return F.dropout(probs, p=dropout, training=dropout > 0) @ v, probs


class MagnetoFeedForward(MagnetoSublayer):
    """W_2 [inner_norm] act(W_1 x); SwiGLU uses silu(gate x) * (W_1 x)."""

    def __init__(self, config, layer_number):
        slots = config.slots["ffn"]
        super().__init__(config, slots, layer_number)
        d, f, gain = config.hidden_size, config.intermediate_size, config.init_gain
        self.fc1 = linear(config, d, f, gain)
        self.fc1_gate = linear(config, d, f, gain) if config.hidden_act == "swiglu" else None
        # Sub-LN: normalizes the FFN hidden activation (width ffn) before W_2.
        self.inner_norm = make_norm(config, f) if slots["inner_norm"] else None
        self.fc2 = linear(config, f, d, gain)

    def transform(self, h):
        if self.fc1_gate is not None:
            hidden = F.silu(self.fc1_gate(h)) * self.fc1(h)  # [b, s, ffn]
        else:
            hidden = F.gelu(self.fc1(h))                     # [b, s, ffn]
        if self.inner_norm is not None:
            hidden = self.inner_norm(hidden)
        return self.fc2(hidden)


class MagnetoLayer(nn.Module):
    def __init__(self, config, layer_number):
        super().__init__()
        self.self_attn = MagnetoAttention(config, layer_number)
        self.ffn = MagnetoFeedForward(config, layer_number)

    def forward(self, x, **attention):
        return self.ffn(self.self_attn(x, **attention))


class MagnetoStack(nn.Module):
    gradient_checkpointing = False  # set by PreTrainedModel.gradient_checkpointing_enable()

    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(MagnetoLayer(config, i + 1)
                                    for i in range(config.num_hidden_layers))
        self.final_norm = (make_norm(config, config.hidden_size)
                           if config.slots["final_norm"] else None)

    def forward(self, x, hidden_states=None, **attention):
        """x: [b, s, d] -> [b, s, d]; hidden_states: a list that gets the input of every layer
        and the stack's output, transformers' num_layers + 1 (the last one after the final
        norm, where the scheme has one, as in its models)."""
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(x)
            if self.gradient_checkpointing and self.training:
                # partial, not a closure: the recompute in backward must call this layer
                x = self._gradient_checkpointing_func(functools.partial(layer.__call__,
                                                                        **attention), x)
            else:
                x = layer(x, **attention)
        x = self.final_norm(x) if self.final_norm is not None else x
        if hidden_states is not None:
            hidden_states.append(x)
        return x


def attention_mask_4d(attention_mask, s, t, causal, device):
    """(bool mask [b, 1, s, t] or None, is_causal) for s queries over t keys, the last s of
    which are the queries themselves. Without padding the plain kernels run (is_causal when
    queries and keys coincide), as in training. A padded query may still see itself: a row
    with nothing to attend to is 0 in torch 2.13 but NaN in older versions, and a NaN would
    leak into later layers through 0 * NaN."""
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and (not causal or s == t):
        return None, causal
    if not padded and s == 1:
        return None, False  # one new token sees every cached one
    keys = torch.arange(t, device=device)
    queries = keys[t - s:]
    mask = (keys[None, :] <= queries[:, None]) if causal else torch.ones(
        s, t, dtype=torch.bool, device=device)                               # [s, t]
    mask = mask[None, None]                                                  # [1, 1, s, t]
    if padded:
        mask = mask & attention_mask[:, None, None, :t].bool()              # [b, 1, s, t]
        mask = mask | (keys[None, :] == queries[:, None])[None, None]
    return mask, False


def readout_input(config, hidden):
    """The head's input: muP multiplies it (so the logits) by base width / width."""
    return hidden * config.logit_multiplier if config.logit_multiplier != 1.0 else hidden


def token_loss(logits, labels, num_items_in_batch=None):
    """Cross entropy over the labelled tokens (-100: none): their mean, or their sum over
    num_items_in_batch when transformers' Trainer passes it (the labelled tokens of the whole
    accumulated batch; it then leaves the loss undivided by the accumulation steps)."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten().to(logits.device),
                           ignore_index=-100,
                           reduction="mean" if num_items_in_batch is None else "sum")
    if num_items_in_batch is not None:
        loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
    return loss


def wanted(flag, config, name):
    """A per-call output flag, else the config's (transformers' precedence)."""
    return bool(flag if flag is not None else getattr(config, name, False))


class MagnetoPreTrainedModel(PreTrainedModel):
    config_class = MagnetoConfig
    base_model_prefix = "model"
    _no_split_modules = ["MagnetoLayer"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]

    @torch.no_grad()
    def _init_weights(self, module):
        """The trainer's init, for models made from a config (from_config): xavier normal with
        the Magneto / DeepNet gain (or torchscale's scaled default), normal embeddings, norms
        at identity. Loaded weights are never touched (transformers skips them)."""
        config = self.config
        if isinstance(module, nn.Linear) and hasattr(module, "magneto_init_gain"):
            gain = module.magneto_init_gain
            if config.init_style == "paper":
                nn.init.xavier_normal_(module.weight, gain=gain)
            else:
                bound = gain / math.sqrt(module.weight.shape[1])
                nn.init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding) or module is getattr(self, "lm_head", None):
            nn.init.normal_(module.weight, 0.0, config.embedding_init_std)
        elif isinstance(module, tuple(NORMS.values())):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, MagnetoAttention) and module.head_scale is not None:
            nn.init.ones_(module.head_scale)


class MagnetoModel(MagnetoPreTrainedModel):
    """Embeddings and one stack: `decoder` (causal) or `encoder`; returns hidden states."""

    def __init__(self, config):
        super().__init__(config)
        self.causal = config.magneto_arch == "decoder"
        self.embed = MagnetoEmbeddings(config)
        self.add_module("decoder" if self.causal else "encoder", MagnetoStack(config))
        self.post_init()

    @property
    def stack(self):
        return self.decoder if self.causal else self.encoder

    def get_input_embeddings(self):
        return self.embed.word

    def set_input_embeddings(self, value):
        self.embed.word = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, use_cache=None, output_hidden_states=None,
                output_attentions=None, return_dict=None, **kwargs):
        b, s = input_ids.shape
        use_cache = self.causal and (use_cache if use_cache is not None
                                     else self.config.use_cache)
        if use_cache and self.stack.gradient_checkpointing and self.training:
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing "
                                "(the recompute would append to the cache again); setting "
                                "use_cache=False")
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        cache = past_key_values if use_cache else None
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=input_ids.device)[None].expand(b, s)
        mask, is_causal = attention_mask_4d(attention_mask, s, past + s, self.causal,
                                            input_ids.device)
        rope = (rotary_tables(self.config, position_ids)
                if self.config.position_embedding_type == "rope" else None)
        hidden_states = [] if wanted(output_hidden_states, self.config,
                                     "output_hidden_states") else None
        attentions = self._attentions_list(output_attentions)
        x = self.stack(self.embed(input_ids, position_ids), hidden_states, mask=mask,
                       is_causal=is_causal, rope=rope, cache=cache,
                       attentions=attentions)                                # [b, s, d]
        out = BaseModelOutputWithPast(
            last_hidden_state=x, past_key_values=cache,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            attentions=tuple(attentions) if attentions is not None else None)
        return out if wanted(return_dict, self.config, "return_dict") else out.to_tuple()

    def _attentions_list(self, output_attentions):
        """[] to collect the layers' attention probabilities, or None. Scaled-dot-product
        attention never forms them: as transformers' models do, a warning and an empty tuple
        (load with attn_implementation="eager" to get them)."""
        if not wanted(output_attentions, self.config, "output_attentions"):
            return None
        if self.config._attn_implementation != "eager":
            logger.warning_once(f"{self.config._attn_implementation} attention does not "
                                "support output_attentions=True; load the model with "
                                "attn_implementation=\"eager\" to get the attention weights")
        return []


class MagnetoForCausalLM(MagnetoPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed.word.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = MagnetoModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, labels=None, use_cache=None, logits_to_keep=0,
                output_hidden_states=None, output_attentions=None, return_dict=None,
                num_items_in_batch=None, **kwargs):
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, use_cache=use_cache,
                         output_hidden_states=output_hidden_states,
                         output_attentions=output_attentions, return_dict=True)
        hidden = out.last_hidden_state
        if logits_to_keep:  # generate() needs only the last position's logits
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(readout_input(self.config, hidden))            # [b, s, vocab]
        loss = None
        if labels is not None:  # labels are the inputs; position i predicts token i + 1
            loss = token_loss(logits[:, :-1], labels[:, 1:], num_items_in_batch)
        result = CausalLMOutputWithPast(loss=loss, logits=logits,
                                        past_key_values=out.past_key_values,
                                        hidden_states=out.hidden_states,
                                        attentions=out.attentions)
        return result if wanted(return_dict, self.config, "return_dict") else result.to_tuple()


class MagnetoForMaskedLM(MagnetoPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed.word.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = MagnetoModel(config)
        # BERT's MLM transform: dense -> gelu -> norm, then the (tied) vocabulary projection.
        self.mlm_dense = linear(config, config.hidden_size, config.hidden_size, 1.0, bias=True)
        self.mlm_norm = make_norm(config, config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None,
                output_hidden_states=None, output_attentions=None, return_dict=None,
                num_items_in_batch=None, **kwargs):
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         output_hidden_states=output_hidden_states,
                         output_attentions=output_attentions, return_dict=True)
        transformed = self.mlm_norm(F.gelu(self.mlm_dense(out.last_hidden_state)))
        logits = self.lm_head(readout_input(self.config, transformed))        # [b, s, vocab]
        loss = None
        if labels is not None:  # -100 marks the positions that were not masked
            loss = token_loss(logits, labels, num_items_in_batch)
        result = MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                attentions=out.attentions)
        return result if wanted(return_dict, self.config, "return_dict") else result.to_tuple()
