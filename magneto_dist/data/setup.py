"""A run's data, from its config: the tokenizer and data prefixes (the built-in corpus built when
no prefix is given), then checked train/valid/test datasets. Used by the run, the stability
sweep (which prepares the caches once before its cells start) and the benchmarks; all of it
runs before torch.distributed starts."""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

from ..config import Config
from ..launch_env import RankInfo
from .checks import check_token_ids
from .corpus import build_builtin_corpus
from .datasets import DatasetRequest, build_datasets, train_samples
from .tokenizer import Tokenizer, TokenizerSpec
from .tokenizer_types import build_tokenizer, sentencepiece_tokenizer


def load_tokenizer(cfg: Config, ranks: RankInfo) -> Tuple[Tokenizer, List[str]]:
    """The tokenizer (logged: type, files, vocabulary size, end of document) and the data
    prefixes (the built-in corpus is built here if needed)."""
    d = cfg.data
    if d.prefixes:
        tokenizer, prefixes = build_tokenizer(TokenizerSpec.from_data_config(d)), list(d.prefixes)
    else:
        corpus = build_builtin_corpus(d.cache_dir, d.builtin_vocab_size,
                                      local_rank=ranks.local_rank, log=ranks.log)
        tokenizer, prefixes = sentencepiece_tokenizer(corpus.tokenizer_model), [corpus.data_prefix]
    ranks.log(tokenizer.describe())
    return tokenizer, prefixes


def prepare_data(cfg: Config, task: str, tokenizer: Tokenizer, prefixes: List[str],
                 ranks: RankInfo, num_train: Optional[int] = None):
    """Checked [train, valid, test] datasets; before torch.distributed starts. num_train: the
    training split's size (default: train_iters x global batch, a fresh start's)."""
    d, t = cfg.data, cfg.train
    for prefix in prefixes:
        checked = check_token_ids(prefix, tokenizer.vocab_size, tokenizer.setting)
        ranks.log(f"data check: {checked}")
    evals = (t.train_iters // t.eval_interval + 1) if t.eval_interval else 0
    request = DatasetRequest(
        prefixes=prefixes, weights=d.weights, split=d.split, seq_len=cfg.model.max_seq_len,
        seed=t.seed, cache_dir=os.path.join(d.cache_dir, "index"), masked_lm=task == "bert",
        masking_probability=d.masking_probability, reset_position_ids=d.reset_position_ids,
        reset_attention_mask=d.reset_attention_mask, eod_mask_loss=d.eod_mask_loss,
        num_samples=(num_train or train_samples(t.train_iters, t.global_batch_size),
                     max(1, evals * t.eval_iters * t.global_batch_size),
                     max(1, t.eval_iters * t.global_batch_size)))
    return build_datasets(request, tokenizer, local_rank=ranks.local_rank, log=ranks.log)
