"""jsonl -> Megatron .bin/.idx, in parallel, in bounded memory, identical for any worker count.

Lines are read in order and sent to a worker pool in fixed-size chunks; at most `4 * workers`
chunks are in flight (multiprocessing.Pool.imap would read the whole input ahead), and results are
written back in submission order, so the output bytes do not depend on the worker count. The pool
is concurrent.futures' ProcessPoolExecutor: a worker that dies (OOM killer, kill -9) breaks it
with an error, where a multiprocessing.Pool waits forever for the lost chunk. Writing
goes through megatron-core's IndexedDatasetBuilder to temporary names that are renamed only once
every document is in.
"""
from __future__ import annotations

import collections
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Iterator, List, Sequence

from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm

from .jsonl import BadInputError, encode_chunk, init_worker, read_lines
from .tokenizer import SentencePieceTokenizer

CHUNK_LINES = 256


class WorkerDied(RuntimeError):
    """A tokenizing worker process died; nothing was written."""


@dataclass
class PreprocessStats:
    documents: int = 0
    tokens: int = 0
    skipped_lines: List[str] = field(default_factory=list)  # "file:line: why", --skip-bad-lines
    empty_documents: int = 0
    seconds: float = 0.0


def _chunks(lines: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in lines:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _ordered_bounded_map(pool, func, items: Iterator, window: int) -> Iterator:
    """Like pool.map, but never reads more than `window` items ahead of the consumer."""
    pending = collections.deque()
    for item in items:
        pending.append(pool.submit(func, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def output_prefix_for(output_prefix: str, key: str, sentences: bool) -> str:
    """Megatron's naming: OUT_text_document (OUT_text_sentence with --split-sentences)."""
    return f"{output_prefix}_{key}_{'sentence' if sentences else 'document'}"


def preprocess(inputs: Sequence[str], tokenizer_model: str, output_prefix: str,
               json_keys: Sequence[str] = ("text",), workers: int = 1, append_eod: bool = False,
               split_sentences: bool = False, skip_bad_lines: bool = False,
               progress: bool = True) -> PreprocessStats:
    """Tokenize jsonl inputs into one .bin/.idx pair per json key; returns the counts."""
    tokenizer = SentencePieceTokenizer(tokenizer_model)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    finals = {k: output_prefix_for(output_prefix, k, split_sentences) for k in json_keys}
    temps = {k: f"{p}.tmp{os.getpid()}" for k, p in finals.items()}
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    builders = {k: IndexedDatasetBuilder(p + ".bin", dtype=dtype) for k, p in temps.items()}
    stats = PreprocessStats()
    start = time.perf_counter()
    init_args = (tokenizer_model, tuple(json_keys), append_eod, split_sentences)
    try:
        try:
            _tokenize_into(builders, inputs, json_keys, workers, init_args, stats,
                           skip_bad_lines, progress)
        except BrokenProcessPool as err:
            raise WorkerDied(f"a tokenizing worker died ({err}); nothing was written to "
                             f"{output_prefix}; rerun (with fewer --workers if memory ran out)"
                             ) from None
        if stats.documents == 0:
            raise BadInputError(f"no documents in {', '.join(inputs)}: the input is empty"
                                + (f" ({len(stats.skipped_lines)} bad lines skipped)"
                                   if stats.skipped_lines else ""))
        for key, builder in builders.items():
            builder.finalize(temps[key] + ".idx")
        for key in json_keys:  # .bin first: a reader checks for .idx (IndexedDataset.exists)
            os.replace(temps[key] + ".bin", finals[key] + ".bin")
            os.replace(temps[key] + ".idx", finals[key] + ".idx")
    finally:
        for path in temps.values():
            for ext in (".bin", ".idx"):
                if os.path.exists(path + ext):
                    os.remove(path + ext)
    stats.seconds = time.perf_counter() - start
    return stats


def _tokenize_into(builders, inputs, json_keys, workers, init_args, stats: PreprocessStats,
                   skip_bad_lines: bool, progress: bool) -> None:
    start = time.perf_counter()
    # fork, not spawn: a spawned worker re-imports the caller's __main__ (torch, megatron:
    # ~3 s each); workers only run sentencepiece and json, which are safe after fork.
    with ProcessPoolExecutor(workers, multiprocessing.get_context("fork"), init_worker,
                             init_args) as pool, \
            tqdm(unit=" docs", disable=not progress, mininterval=1.0) as bar:
        chunks = _chunks(read_lines(inputs), CHUNK_LINES)
        for results in _ordered_bounded_map(pool, encode_chunk, chunks, 4 * workers):
            for result in results:
                _write_document(result, builders, json_keys, stats, skip_bad_lines)
            bar.update(len(results))
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{stats.tokens / elapsed:,.0f} tokens/s", refresh=False)


def _write_document(result, builders, keys, stats: PreprocessStats, skip_bad_lines: bool):
    if isinstance(result, BadInputError):
        if not skip_bad_lines:
            raise result
        stats.skipped_lines.append(str(result))
        return
    if not any(len(lengths) for _, lengths in result):
        stats.empty_documents += 1
        return
    stats.documents += 1
    for key, (tokens, lengths) in zip(keys, result):
        stats.tokens += len(tokens)
        builders[key].add_document(tokens, lengths)
