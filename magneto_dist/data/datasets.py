"""Train/valid/test datasets from a weighted blend, through megatron-core's dataset builder.

What megatron-core lacks and is written here:
- Per-node index caches. megatron-core builds the sample/shuffle index caches on global rank 0
  and lets the other ranks load them after a barrier, which fails on a filesystem that is not
  shared between nodes. Here every node's local rank 0 builds (or finds) the caches before
  torch.distributed starts, in a solo process group, and the other local ranks wait for its
  record of them; afterwards every rank loads from its own node's cache. The caches are written
  aside and checked against their recorded sizes before use (index_cache.py).
- A sampler driven by a global sample index (Megatron-LM's MegatronPretrainingSampler lives in
  megatron-training, not megatron-core): resuming at sample k gives exactly samples k, k+1, ...
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import megatron.core
import torch
import torch.distributed as dist
from megatron.core.datasets.bert_dataset import (BERTMaskedWordPieceDataset,
                                                 BERTMaskedWordPieceDatasetConfig)
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from ..compat.megatron import solo_process_group
from ..files import WAIT_TIMEOUT_S, build_lock
from .checks import check_exists, check_splits
from .index_cache import build_directory, cache_problem, publish, wait_for_caches
from .tokenizer import Tokenizer


@dataclass
class DatasetRequest:
    """What to build: a blend of indexed datasets cut into train/valid/test."""
    prefixes: Sequence[str]               # .bin/.idx path prefixes
    weights: Optional[Sequence[float]]    # blend weights (None: proportional to size)
    split: str                            # e.g. "969,30,1": document split into train/valid/test
    seq_len: int                          # tokens per sample (the model input length)
    seed: int                             # shuffling seed
    num_samples: Tuple[int, int, int]     # samples wanted per split (repeated epochs if needed)
    cache_dir: str                        # where the sample/shuffle index caches go
    masked_lm: bool = False               # BERT-style samples instead of GPT ones
    masking_probability: float = 0.15     # masked LM only
    # GPT only, megatron-core's GPTDatasetConfig flags: positions restarting after each eod
    # token, and no loss where the input is the eod (the attention mask is built by the model
    # from the eod tokens, not by megatron-core, whose mask is sequence x sequence per sample).
    # Not in the cache key: megatron-core's sample and shuffle indices do not depend on them.
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False


def _megatron_config(req: DatasetRequest, tokenizer: Tokenizer, cache_dir: str):
    weights = list(req.weights) if req.weights is not None else None
    common = dict(random_seed=req.seed, sequence_length=req.seq_len,
                  blend=(list(req.prefixes), weights), split=req.split,
                  path_to_cache=cache_dir, tokenizer=tokenizer, mid_level_dataset_surplus=0.005)
    if req.masked_lm:
        return BERTMaskedWordPieceDatasetConfig(
            masking_probability=req.masking_probability, short_sequence_probability=0.1,
            masking_max_ngram=3, masking_do_full_word=False, masking_do_permutation=False,
            masking_use_longer_ngrams=False, masking_use_geometric_distribution=False,
            classification_head=False, **common)
    return GPTDatasetConfig(reset_position_ids=req.reset_position_ids,
                            reset_attention_mask=req.reset_attention_mask,
                            eod_mask_loss=req.eod_mask_loss, create_attention_mask=False,
                            **common)


def _marker_path(req: DatasetRequest, tokenizer: Tokenizer) -> str:
    """The record of this request's caches; megatron-core's version is in the key because its
    cache file names and contents are its own."""
    key = json.dumps([list(req.prefixes), req.weights, req.split, req.seq_len, req.seed,
                      list(req.num_samples), req.masked_lm, req.masking_probability,
                      tokenizer.sha256, megatron.core.__version__])
    digest = hashlib.md5(key.encode()).hexdigest()
    return os.path.join(req.cache_dir, f"built-{digest}.done")


def build_datasets(req: DatasetRequest, tokenizer: Tokenizer, local_rank: Optional[int] = None,
                   wait_timeout_s: float = WAIT_TIMEOUT_S, log=print
                   ) -> List[Optional[torch.utils.data.Dataset]]:
    """[train, valid, test]; call before torch.distributed is initialized, on every rank."""
    if dist.is_initialized():
        raise RuntimeError("build_datasets must run before torch.distributed is initialized, so "
                           "that each node builds its own index caches")
    cls = BERTMaskedWordPieceDataset if req.masked_lm else GPTDataset
    if req.masked_lm:
        tokenizer.masked_lm_ids()  # DataError naming a missing cls/sep/mask token
    for prefix in req.prefixes:  # before megatron-core, which loops forever on an empty split
        check_exists(prefix)
        check_splits(prefix, cls.numel_low_level_dataset(IndexedDataset(prefix)), req.split)
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
    marker = _marker_path(req, tokenizer)

    def build(cache_dir: str):
        return BlendedMegatronDatasetBuilder(cls, list(req.num_samples), lambda: True,
                                             _megatron_config(req, tokenizer, cache_dir)).build()

    if local_rank != 0:
        wait_for_caches(marker, "the dataset index caches", wait_timeout_s)
        return build(req.cache_dir)
    os.makedirs(req.cache_dir, exist_ok=True)
    with build_lock(marker + ".lock"), solo_process_group():  # one node at a time
        problem = cache_problem(marker)
        if problem is None:
            return build(req.cache_dir)
        if os.path.exists(marker):
            log(f"index cache: {problem}; building the caches again")
            os.remove(marker)
        with build_directory(req.cache_dir) as fresh:
            datasets = build(fresh)
            publish(fresh, marker)
    return datasets


def train_samples(train_iters: int, global_batch: int, step: int = 0, consumed: int = 0,
                  at_least: int = 0) -> int:
    """The training split's size, counted from sample 0: the samples consumed in the first
    `step` steps, then a global batch for each step left; never less than `at_least`. A resume
    with another global batch needs another size than train_iters x global batch (sized so, a
    run resumed with half the batch ran out of samples and raised StopIteration), and keeping
    the size an earlier run of the checkpoint used (at_least) keeps the order of the samples
    still to come: megatron-core's shuffle depends on how many epochs the size spans."""
    return max(consumed + (train_iters - step) * global_batch, at_least)


class GlobalSampleBatches(torch.utils.data.Sampler):
    """Micro-batches of sample indices for one data-parallel rank, starting at a global index.

    The global batch at step t holds samples [t*G, (t+1)*G) (G = global batch); data-parallel rank
    r takes micro-batch m as [start + m*B*D + r*B, ... + B) (B = micro batch, D = DP size), so
    the set of samples in each global batch does not depend on D. Iteration starts at
    `consumed_samples`, the only state a checkpoint needs to resume the data exactly.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        super().__init__()
        self.total, self.consumed = total_samples, consumed_samples
        self.micro, self.rank, self.size = micro_batch_size, dp_rank, dp_size

    def __iter__(self) -> Iterator[List[int]]:
        stride = self.micro * self.size
        for start in range(self.consumed, self.total - stride + 1, stride):
            first = start + self.rank * self.micro
            yield list(range(first, first + self.micro))

    def __len__(self) -> int:
        return max(0, (self.total - self.consumed) // (self.micro * self.size))
