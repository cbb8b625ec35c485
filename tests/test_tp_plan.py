"""The one tensor-parallel plan covers every parameter of every model variant, and the
universal-checkpoint patterns are read from it (so sharding and merging cannot disagree)."""
import itertools
import re

import pytest
from deepspeed.checkpoint import constants as ds_ckpt

from magneto_dist.model import ModelConfig, build_model
from magneto_dist.model.config import NORM_SCHEMES
from magneto_dist.checkpoint.universal_info import universal_checkpoint_info
from magneto_dist.parallel.tp_plan import (COLUMN, REPLICATED, ROW, SLICED, VOCAB, NotInPlan,
                                           tp_kind)

# QK-norm and GQA on everywhere: their parameters are a superset of the plain model's
VARIANTS = [dict(norm=norm, arch=arch, activation=act, norm_type=norm_type, tie_embeddings=tie,
                 qk_norm=True, num_query_groups=2)
            for norm, (arch, act, norm_type, tie) in itertools.product(
                NORM_SCHEMES, [("decoder", "gelu", "layernorm", True),
                               ("encoder", "swiglu", "rmsnorm", False),
                               ("encoder_decoder", "gelu", "layernorm", True)])]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_every_parameter_of_every_variant_is_in_the_plan(variant):
    model = build_model(ModelConfig(num_layers=2, hidden_size=32, num_heads=4, vocab_size=64,
                                    max_seq_len=16, position="learned", **variant))
    kinds = {name: tp_kind(name) for name, _ in model.named_parameters()}
    assert kinds["decoder.layers.0.self_attn.q_proj.weight" if variant["arch"] != "encoder"
                 else "encoder.layers.0.self_attn.q_proj.weight"] == COLUMN
    for name, kind in kinds.items():
        if name.endswith("out_proj.weight") or name.endswith("fc2.weight"):
            assert kind == ROW, name
        if "inner_norm" in name or name.endswith("head_scale"):
            assert kind == SLICED, name
        if "q_norm" in name or "k_norm" in name:  # one gain per head dim, shared by all heads
            assert kind == REPLICATED, name
    # the universal patterns ds_to_universal receives agree with the plan, name by name
    info = universal_checkpoint_info([n for n, _ in model.named_parameters()], 64,
                                     pipelined=False, tied=True)[ds_ckpt.UNIVERSAL_CHECKPOINT_INFO]
    declared = {REPLICATED: ds_ckpt.TP_REPLICATED_PARAMETER_PATTERNS,
                ROW: ds_ckpt.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
                VOCAB: ds_ckpt.VOCABULARY_PARAMETER_PATTERNS}

    for name, kind in kinds.items():
        for plan_kind, key in declared.items():
            matched = any(re.match(p, name) for p in info[key])
            assert matched == (kind == plan_kind), (name, kind, key)


def test_a_parameter_outside_the_plan_is_an_error():
    """A projection added to the model but not to the plan used to be merged wrongly, silently."""
    with pytest.raises(NotInPlan, match=r"parameter 'decoder.layers.0.ffn.fc3.weight' is not "
                                        r"covered by the tensor-parallel plan"):
        tp_kind("decoder.layers.0.ffn.fc3.weight")
    assert tp_kind("3.layer.self_attn.out_proj.bias") == REPLICATED  # pipeline-stage names
    assert tp_kind("0.word.weight") == tp_kind("lm_head.weight") == VOCAB
