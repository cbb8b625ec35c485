"""The `universal_checkpoint_info` every checkpoint carries in its client state: how DeepSpeed's
ds_to_universal must merge each parameter's TP slices (it re.match-es these patterns against
the names), derived from the one TP plan (parallel/tp_plan.py), so a projection can never be
sharded one way and merged another. Column-parallel and sliced parameters are its default
(concatenated along dim 0)."""
from __future__ import annotations

import re
from typing import Iterable

from deepspeed.checkpoint import constants as ds_ckpt

from ..parallel.tp_plan import REPLICATED, ROW, VOCAB, patterns_of

UNIVERSAL_PATTERNS = {
    ds_ckpt.TP_REPLICATED_PARAMETER_PATTERNS: patterns_of(REPLICATED),
    ds_ckpt.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: patterns_of(ROW),
    ds_ckpt.VOCABULARY_PARAMETER_PATTERNS: patterns_of(VOCAB),
}


def universal_checkpoint_info(names: Iterable[str], vocab_size: int, pipelined: bool,
                              tied: bool) -> dict:
    """The client-state entry ds_to_universal needs for a model with these parameter names (the
    whole model's, whatever its layout: every rank saves the same entry). It insists that every
    pattern matches some parameter, so only the patterns the names use are kept. With a
    pipeline, a tied word embedding lives on the first and the last stage."""
    names = list(names)
    info = {kind: [p for p in patterns if any(re.match(p, n) for n in names)]
            for kind, patterns in UNIVERSAL_PATTERNS.items()}
    info[ds_ckpt.PIPELINE_REPLICATED_PARAMETER_PATTERNS] = (
        [r"(.*\.)?word\.weight$"] if pipelined and tied else [])
    info[ds_ckpt.UNIVERSAL_CHECKPOINT_VERSION_KEY] = ds_ckpt.UNIVERSAL_CHECKPOINT_VERSION_VALUE
    info["original_vocab_size"] = vocab_size
    return {ds_ckpt.UNIVERSAL_CHECKPOINT_INFO: info}
