"""The model code shipped in Hugging Face exports (checkpoint/hf_model/) against the trainer's own
model: the same logits for every variant, an incremental KV cache, padding, the slot table, and
no import of this project.

Every combination (6 norm schemes x LayerNorm/RMSNorm x learned/RoPE x GELU/SwiGLU x tied/untied,
decoder and encoder: 192 tiny models) is built directly from the shipped classes with the
export's config and names; tests/test_hf_export.py loads a covering subset of them the way users
do, through from_pretrained(trust_remote_code=True).
"""
import ast
import dataclasses
import itertools
import pathlib

import pytest
import torch

from magneto_dist.checkpoint import hf_format
from magneto_dist.checkpoint.hf_model import configuration_magneto, modeling_magneto
from magneto_dist.config import load_config
from magneto_dist.model import build_model
from magneto_dist.model.config import ACTIVATIONS, NORM_SCHEMES, NORM_TYPES, POSITIONS
from magneto_dist.model.spec import SCHEMES

TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4",
        "model.ffn_hidden_size=48", "model.max_seq_len=64", "model.vocab_size=97"]
AXES = {"norm": NORM_SCHEMES, "norm_type": NORM_TYPES, "position": POSITIONS,
        "activation": ACTIVATIONS, "tie_embeddings": (True, False)}
EVERY = [dict(zip(AXES, values)) for values in itertools.product(*AXES.values())]
# Today's options over two schemes and both norm types: QK-norm, grouped-query attention (2 and
# 1 key/value heads), muP (base width 16 with a base head dim of 4: every muP factor differs
# from 1 at width 32), and all of them at once with RoPE, SwiGLU and an untied head.
MUP = {"parametrization": "mup", "mup_base_hidden_size": 16, "mup_base_head_dim": 4}
MODERN_OPTIONS = [{"qk_norm": True}, {"num_query_groups": 2}, {"num_query_groups": 1}, MUP,
                  {"qk_norm": True, "num_query_groups": 2, **MUP, "position": "rope",
                   "activation": "swiglu", "tie_embeddings": False}]
MODERN = [{"norm": norm, "norm_type": norm_type, **options}
          for norm in ("magneto", "pre_ln") for norm_type in NORM_TYPES
          for options in MODERN_OPTIONS]
SPECIAL = {"bos": 3, "eos": 3, "pad": 0}


def variant_id(variant):
    named = {"tie_embeddings": ("tied", "untied"), "qk_norm": ("qk_norm", "no_qk_norm")}
    return "-".join(named[k][0 if v else 1] if isinstance(v, bool) else
                    f"groups{v}" if k == "num_query_groups" else str(v)
                    for k, v in variant.items() if not k.startswith("mup_base"))


def native_model(arch, variant, seed=0):
    """A tiny native model whose every parameter is perturbed from its init, so a norm gain,
    bias or head scale in the wrong place cannot hide behind an identity init."""
    overrides = TINY + [f"model.arch={arch}"] + [f"model.{k}={v}" for k, v in variant.items()]
    cfg = load_config(None, overrides).model
    model = build_model(cfg, seed=seed).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return cfg, model


def shipped_model(cfg, native):
    """The shipped class for cfg, built from the export's config.json and loaded with the
    export's names."""
    config = {k: v for k, v in hf_format.hf_config(cfg, SPECIAL, "fp32").items()
              if k not in ("architectures", "auto_map", "model_type", "dtype")}
    head = getattr(modeling_magneto, hf_format.HEAD_CLASSES[cfg.arch][0])
    model = head(configuration_magneto.MagnetoConfig(**config)).eval()
    model.load_state_dict({hf_format.hf_name(k): v for k, v in native.state_dict().items()},
                          strict=True)
    return model


def tokens(vocab, batch=2, length=24, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def max_logit_difference(arch, variant) -> float:
    cfg, native = native_model(arch, variant)
    model = shipped_model(cfg, native)
    ids = tokens(cfg.vocab_size)
    if arch == "decoder":
        return float((native(ids) - model(ids).logits).abs().max())
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 17:] = False  # the second row is padded
    expected, got = native(ids, padding_mask=mask), model(ids, attention_mask=mask).logits
    return float((expected - got)[mask].abs().max())  # padded rows are nobody's output


@pytest.mark.parametrize("variant", EVERY, ids=variant_id)
@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_shipped_model_gives_the_native_logits(arch, variant):
    assert max_logit_difference(arch, variant) <= 1e-5


@pytest.mark.parametrize("variant", MODERN, ids=variant_id)
@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_shipped_model_gives_the_native_logits_with_qk_norm_gqa_and_mup(arch, variant):
    assert max_logit_difference(arch, variant) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("variant", [EVERY[0], EVERY[-1], MODERN[-1]], ids=variant_id)
def test_kv_cache_continues_exactly_where_a_full_forward_is(variant):
    cfg, native = native_model("decoder", variant)
    model = shipped_model(cfg, native)
    ids = tokens(cfg.vocab_size, length=20)
    full = native(ids)
    prefill = model(ids[:, :12], use_cache=True)
    cache = prefill.past_key_values
    assert cache.get_seq_length() == 12
    step = model(ids[:, 12:13], past_key_values=cache, use_cache=True)      # one new token
    chunk = model(ids[:, 13:20], past_key_values=step.past_key_values, use_cache=True)  # seven
    assert (prefill.logits - full[:, :12]).abs().max() <= 1e-5
    assert (step.logits[:, 0] - full[:, 12]).abs().max() <= 1e-5
    assert (chunk.logits - full[:, 13:20]).abs().max() <= 1e-5


@torch.no_grad()
def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    cfg, native = native_model("decoder", EVERY[0])
    model = shipped_model(cfg, native)
    long, short = tokens(cfg.vocab_size, batch=1, length=10)[0], tokens(cfg.vocab_size, 1, 6)[0]
    batch = torch.stack([long, torch.cat([torch.zeros(4, dtype=torch.long), short])])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    together = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              pad_token_id=0, eos_token_id=None)
    for row, prompt in enumerate([long, short]):
        alone = model.generate(prompt[None], max_new_tokens=8, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
        assert together[row, -8:].tolist() == alone[0, -8:].tolist()


def test_learned_positions_refuse_a_sequence_longer_than_the_table():
    cfg, native = native_model("decoder", dict(EVERY[0], position="learned"))
    with pytest.raises(ValueError, match="beyond the learned table"):
        shipped_model(cfg, native)(tokens(cfg.vocab_size, length=cfg.max_seq_len + 1))


def test_slot_table_is_the_trainers():
    shipped = configuration_magneto.SCHEMES
    assert shipped == {name: dataclasses.asdict(slots) for name, slots in SCHEMES.items()}


def test_export_config_names_every_model_field():
    """A new model field must reach config.json (or the export would silently drop it);
    num_decoder_layers belongs to encoder-decoders, which the export refuses."""
    from magneto_dist.model.config import ModelConfig

    assert set(hf_format.CONFIG_KEYS) == ModelConfig.field_names() - {"num_decoder_layers"}


def test_shipped_code_imports_only_torch_and_transformers():
    folder = pathlib.Path(modeling_magneto.__file__).parent
    allowed = {"functools", "math", "torch", "transformers"}
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:  # relative imports stay inside the shipped files
                continue
            assert roots <= allowed, (path.name, roots)


def test_from_config_initializes_as_the_trainer_does():
    """A model made from the config alone (pretraining in transformers) starts with the paper's
    init: the Magneto gain on W_v and W_1, 1 on W_q, norms at identity."""
    torch.manual_seed(0)
    cfg = load_config(None, TINY + ["model.hidden_size=256", "model.num_heads=4",
                                    "model.ffn_hidden_size=512"]).model
    config = configuration_magneto.MagnetoConfig(**{
        k: v for k, v in hf_format.hf_config(cfg, SPECIAL, "fp32").items()
        if k not in ("architectures", "auto_map", "model_type", "dtype")})
    model = modeling_magneto.MagnetoForCausalLM(config)
    native = build_model(cfg, seed=0)
    for name in ("decoder.layers.0.self_attn.q_proj.weight",
                 "decoder.layers.0.self_attn.v_proj.weight", "decoder.layers.1.ffn.fc1.weight",
                 "embed.word.weight"):
        ours = model.get_parameter(hf_format.hf_name(name))
        assert abs(ours.std() / native.get_parameter(name).std() - 1) < 0.05, name
    assert torch.equal(model.get_parameter("model.decoder.layers.0.ffn.inner_norm.weight"),
                       torch.ones(cfg.ffn_hidden_size))
    assert model.lm_head.weight is model.model.embed.word.weight  # tied
