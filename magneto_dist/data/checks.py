"""Checks of indexed data against the run, before any index is built or step taken.

Two mistakes that megatron-core does not catch, each of which costs a user a run:
- A split with no documents (a small corpus and the default "969,30,1"): megatron-core's
  GPTDataset._get_num_epochs then adds empty epochs forever, printing nothing.
- Token ids beyond the tokenizer's vocabulary (data preprocessed with another tokenizer): an
  IndexError inside the embedding on CPU, a device-side assert on a GPU, or, under tensor
  parallelism, an infinite loss that trains on silently.
"""
from __future__ import annotations

from typing import List

import numpy as np
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix, parse_and_normalize_split)
from megatron.core.datasets.indexed_dataset import IndexedDataset

from ..errors import DataError

SPLIT_NAMES = ("train", "valid", "test")
# A .bin of up to this many tokens is scanned whole (0.015 s per 100M tokens from the page cache
# here; a cold file reads at disk speed); a larger one is sampled in SAMPLE_CHUNKS evenly spaced
# chunks, which still catches a wrong tokenizer (its ids fill the whole range) at a bounded cost.
FULL_SCAN_TOKENS = 1 << 30
SAMPLE_CHUNKS, CHUNK_TOKENS = 256, 1 << 20


def check_exists(prefix: str) -> None:
    if not IndexedDataset.exists(prefix):
        raise DataError(f"data prefix {prefix}: {prefix}.bin/.idx not found; create them with "
                        "`python tools/preprocess_data.py --output-prefix ...` (the prefix ends in "
                        "_text_document)")


def split_sizes(num_elements: int, split: str) -> List[int]:
    """Documents per split, with megatron-core's own parsing and rounding (its
    BlendedMegatronDatasetBuilder._build_megatron_dataset_splits); -1 marks a split of weight 0,
    which megatron-core does not build."""
    sizes = []
    for bounds in convert_split_vector_to_split_matrix(parse_and_normalize_split(split)):
        if bounds is None:
            sizes.append(-1)
        else:
            begin, end = (int(round(b * num_elements)) for b in bounds)
            sizes.append(end - begin)
    return sizes


def check_splits(prefix: str, num_elements: int, split: str) -> None:
    """Every split that is asked for gets at least one document of `prefix`."""
    sizes = split_sizes(num_elements, split)
    empty = [SPLIT_NAMES[i] for i, n in enumerate(sizes) if n == 0]
    if not empty:
        return
    wanted = sum(1 for n in sizes if n != -1)
    if num_elements >= wanted:
        parts = [str(num_elements - wanted + 1)] + ["1" if n != -1 else "0" for n in sizes[1:]]
        advice = (f"use e.g. data.split={','.join(parts)} (one document each for valid and "
                  "test), or 0 for a split you do not need")
    else:
        advice = "use more documents, or data.split=1,0,0 with train.eval_interval=0"
    raise DataError(f"data prefix {prefix}: data.split={split!r} leaves the {' and '.join(empty)} "
                    f"split{'s' if len(empty) > 1 else ''} with no documents ({num_elements} in "
                    f"all; megatron-core would loop forever looking for samples); {advice}")


def token_ids(prefix: str) -> np.memmap:
    """Every token id of prefix.bin, in the dtype its .idx records (no copy)."""
    check_exists(prefix)
    return np.memmap(prefix + ".bin", dtype=np.dtype(IndexedDataset(prefix).index.dtype),
                     mode="r")


def check_token_ids(prefix: str, vocab_size: int, tokenizer_setting: str) -> str:
    """Refuse token ids >= vocab_size in prefix.bin; returns how the check was done.
    tokenizer_setting names the tokenizer as the config does (data.tokenizer_model=PATH)."""
    tokens = token_ids(prefix)
    dtype = tokens.dtype
    if np.iinfo(dtype).max < vocab_size:
        return f"{prefix}: dtype {dtype} cannot hold an id >= {vocab_size}"
    if len(tokens) <= FULL_SCAN_TOKENS:
        chunks = [(start, start + FULL_SCAN_TOKENS // 16)
                  for start in range(0, len(tokens), FULL_SCAN_TOKENS // 16)]
        how = f"all {len(tokens):,} token ids"
    else:
        starts = np.linspace(0, len(tokens) - CHUNK_TOKENS, SAMPLE_CHUNKS).astype(np.int64)
        chunks = [(int(s), int(s) + CHUNK_TOKENS) for s in starts]
        how = (f"{SAMPLE_CHUNKS * CHUNK_TOKENS:,} of {len(tokens):,} token ids (evenly spaced "
               "chunks)")
    largest = max((int(tokens[a:b].max()) for a, b in chunks if b > a), default=-1)
    if largest >= vocab_size:
        raise DataError(
            f"data prefix {prefix}: token id {largest} is outside the vocabulary of "
            f"{tokenizer_setting} ({vocab_size} pieces): the data was preprocessed with another "
            "tokenizer; set the data.tokenizer_* keys to the tokenizer given to "
            "tools/preprocess_data.py, or preprocess the data again with this one")
    return f"{prefix}: checked {how}, largest {largest} < {vocab_size}"
