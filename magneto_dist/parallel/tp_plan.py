"""How tensor parallelism splits each parameter: one table, read everywhere.

apply_tensor_parallel (tensor_parallel.py) swaps modules by it, and the universal-checkpoint
patterns that DeepSpeed's ds_to_universal merges by (setup.py) are derived from it, so a
projection can never be sharded one way and merged another. A parameter that no row covers is
an error, and tests/test_tp_plan.py walks every model variant to keep it so.

Kinds, and how ds_to_universal merges them:
- column: output features split (dim 0), bias too             -> concatenated along dim 0
- row: input features split (dim 1)                           -> declared row-parallel
- vocab: vocabulary rows split (dim 0), padded to a multiple  -> declared vocabulary
- sliced: a 1-D gain, bias or scale over a dimension TP splits (the Sub-LN inner norms, which
  normalize merged heads or the FFN hidden; NormFormer's head scales)  -> dim 0, like column
- replicated: whole and identical on every TP rank (the QK-norm gains too: their gradient is
  summed over TP, since each rank normalizes only its own heads)  -> declared TP-replicated
"""
from __future__ import annotations

import re

COLUMN, ROW, VOCAB, SLICED, REPLICATED = "column", "row", "vocab", "sliced", "replicated"

# (regex matched against a full parameter name, kind). Names are the model's, or a pipeline
# stage's ("3.layer.self_attn.q_proj.weight"), hence the optional prefix before each name.
_PREFIX = r"(.*\.)?"
TP_PLAN = (
    (_PREFIX + r"(q_proj|k_proj|v_proj|fc1|fc1_gate)\.(weight|bias)$", COLUMN),
    (_PREFIX + r"(out_proj|fc2)\.weight$", ROW),
    (_PREFIX + r"(out_proj|fc2)\.bias$", REPLICATED),  # added after the row all-reduce
    (_PREFIX + r"inner_norm\.(weight|bias)$", SLICED),
    (_PREFIX + r"head_scale$", SLICED),
    (_PREFIX + r"(word|lm_head)\.weight$", VOCAB),
    (_PREFIX + r"(pre_norm|post_norm|output_norm|final_norm)\.(weight|bias)$", REPLICATED),
    # QK-norm: one gain of width head_dim shared by every head; each rank's gradient covers its
    # own heads and is summed over TP (tensor_parallel.head_norm_from)
    (_PREFIX + r"(q_norm|k_norm)\.(weight|bias)$", REPLICATED),
    (_PREFIX + r"(mlm_dense|mlm_norm)\.(weight|bias)$", REPLICATED),
    (_PREFIX + r"position\.weight$", REPLICATED),
)


# The dimension each kind splits (None: whole on every TP rank); the TP modules are marked with
# it and the shards are cut along it (materialize.py).
SHARD_DIM = {COLUMN: 0, ROW: 1, VOCAB: 0, SLICED: 0, REPLICATED: None}


def padded_vocab_size(vocab_size: int, multiple: int, tp: int) -> int:
    """The vocabulary rows of the vocab-parallel embedding and head: padded to a multiple of
    parallel.vocab_padding_multiple x TP, so every TP rank holds an equal slice (the padding
    rows are zero and no token has their id)."""
    step = multiple * tp
    return -(-vocab_size // step) * step


class NotInPlan(KeyError):
    pass


def tp_kind(name: str) -> str:
    """How TP splits the parameter called `name`."""
    for pattern, kind in TP_PLAN:
        if re.match(pattern, name):
            return kind
    raise NotInPlan(f"parameter {name!r} is not covered by the tensor-parallel plan "
                    "(magneto_dist/parallel/tp_plan.py): add a row saying how TP splits it")


def patterns_of(kind: str) -> list:
    return [pattern for pattern, k in TP_PLAN if k == kind]
