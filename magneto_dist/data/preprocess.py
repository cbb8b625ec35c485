"""Documents -> Megatron .bin/.idx, in parallel, in bounded memory, byte-identical to Megatron-LM.

Megatron-LM's tools/preprocess_data.py, per input line: the tokenizer's `tokenize` of each
sentence (a text, or each string of a list), empty sentences dropped, eod appended to the last
one when --append-eod and the document is not empty, then one `add_document(ids, lengths)` per
line (an empty document still adds a boundary), into an IndexedDatasetBuilder of dtype
`DType.optimal_dtype(vocab_size)`. The same here, for any worker count and any container.

Records are read in order and sent to a worker pool in fixed-size chunks; at most `4 * workers`
chunks are in flight (multiprocessing.Pool.imap would read the whole input ahead), and results are
written back in submission order. The pool is concurrent.futures' ProcessPoolExecutor: a worker
that dies (OOM killer, kill -9) breaks it with an error, where a multiprocessing.Pool waits
forever for the lost chunk. Writing goes to temporary names, renamed only once every document
is in: a failed run leaves nothing behind.
"""
from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence, Union

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm

from ..errors import ConfigError
from .jsonl import BadInputError
from .sources import expand_inputs, read_records, record_texts, record_where
from .tokenizer import Tokenizer, TokenizerSpec
from .tokenizer_types import UnencodableText, build_tokenizer

CHUNK_RECORDS = 256


class WorkerDied(RuntimeError):
    """A tokenizing worker process died; nothing was written."""


@dataclass
class PreprocessStats:
    documents: int = 0          # documents written (one per input line or row)
    tokens: int = 0
    skipped_lines: List[str] = field(default_factory=list)  # "file:line: why", --skip-bad-lines
    empty_documents: int = 0    # of `documents`, those without a token (written, as Megatron)
    seconds: float = 0.0


def output_prefix_for(output_prefix: str, key: str, sentences: bool) -> str:
    """Megatron's naming: OUT_text_document (OUT_text_sentence with --split-sentences)."""
    return f"{output_prefix}_{key}_{'sentence' if sentences else 'document'}"


_PARAGRAPH = re.compile(r"\n\s*\n")


def split_sentences(text: str) -> List[str]:
    """Sentence units for masked-LM data: blank-line separated paragraphs (code and prose alike;
    nltk's punkt would need a download)."""
    return [p for p in _PARAGRAPH.split(text) if p.strip()]


# ---- worker side: the tokenizer comes with the fork (no reload), set by the pool initializer
_worker: dict = {}


def init_worker(tokenizer: Tokenizer, keys: Sequence[str], append_eod: bool, sentences: bool):
    # Parallelism comes from the worker processes: a Hugging Face tokenizer's own thread pool
    # would only contend with them for the same cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(tok=tokenizer, keys=keys, append_eod=append_eod, sentences=sentences)


def _units(value) -> List[str]:
    if isinstance(value, list):  # Megatron-LM: a list is the document's sentences
        return value
    return split_sentences(value) if _worker["sentences"] else [value]


def _document(unit_ids: List[List[int]]):
    """(flat int32 ids, sentence lengths) of one document under one key, as Megatron's encode."""
    ids = [s for s in unit_ids if s]
    if ids and _worker["append_eod"]:
        ids[-1] = list(ids[-1]) + [_worker["tok"].eod]
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32)
    return flat, [len(s) for s in ids]


def _encode_documents(texts: list) -> list:
    """Per document, per key (ids, lengths); one encode_batch for all of them (a Hugging Face
    tokenizer encodes a batch in one call)."""
    units = [[_units(value) for value in doc] for doc in texts]
    encoded = iter(_worker["tok"].encode_batch(
        [u for doc in units for key_units in doc for u in key_units]))
    return [[_document([next(encoded) for _ in key_units]) for key_units in doc]
            for doc in units]


def _encode_one(record, texts):
    try:
        return _encode_documents([texts])[0]
    except UnencodableText as err:
        return BadInputError(f"{record_where(record)}: {err}")


def encode_chunk(records: list) -> list:
    """Per record, in order: BadInputError, or per key (token ids, sentence lengths). Ids come
    back as one int32 array per key: pickling Python int lists back to the parent cost more
    than the encoding itself."""
    out: list = []
    parsed = []  # (position in out, record, texts)
    for record in records:
        try:
            parsed.append((len(out), record, record_texts(record, _worker["keys"])))
            out.append(None)
        except BadInputError as err:
            out.append(err)
    try:
        results = _encode_documents([texts for _, _, texts in parsed])
    except UnencodableText:  # again one by one, to name the record
        results = [_encode_one(record, texts) for _, record, texts in parsed]
    for (position, _, _), result in zip(parsed, results):
        out[position] = result
    return out


# ---- parent side ----
def _chunks(records: Iterator, size: int) -> Iterator[list]:
    while True:
        chunk = list(itertools.islice(records, size))
        if not chunk:
            return
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


def _blocking_file(directory: str) -> str:
    """The nearest existing ancestor of `directory` that is not a directory."""
    path = directory
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def open_builders(temps: Dict[str, str], dtype, output_prefix: str
                  ) -> Dict[str, IndexedDatasetBuilder]:
    """A builder per key, writing to its temporary .bin; an output place that cannot be
    written is a ConfigError naming it (before a byte of input is read)."""
    directory = os.path.dirname(os.path.abspath(next(iter(temps.values()))))
    try:
        os.makedirs(directory, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"output prefix {output_prefix}: {_blocking_file(directory)} is a file, "
                          "not a directory; choose another --output-prefix") from None
    except PermissionError:
        raise ConfigError(f"output prefix {output_prefix}: cannot create the directory "
                          f"{directory} (permission denied); choose a writable --output-prefix"
                          ) from None
    builders = {}
    try:
        for key, temp in temps.items():
            builders[key] = IndexedDatasetBuilder(temp + ".bin", dtype=dtype)
    except OSError as err:  # PermissionError, a read-only filesystem, ...
        raise ConfigError(f"output prefix {output_prefix}: cannot write in {directory} "
                          f"({err.strerror}); choose a writable --output-prefix") from None
    return builders


def preprocess(inputs: Sequence[str], tokenizer: Union[Tokenizer, TokenizerSpec, str],
               output_prefix: str, json_keys: Sequence[str] = ("text",), workers: int = 1,
               append_eod: bool = False, split_sentences: bool = False,
               skip_bad_lines: bool = False, progress: bool = True) -> PreprocessStats:
    """Tokenize every document of `inputs` (files, globs, directories: see sources.py) into one
    .bin/.idx pair per key; `tokenizer` may be a loaded one, a spec, or a tokenizer model path
    (its type told by the file). Returns the counts."""
    inputs = expand_inputs(inputs)
    if not isinstance(tokenizer, Tokenizer):
        spec = tokenizer if isinstance(tokenizer, TokenizerSpec) else TokenizerSpec(model=tokenizer)
        tokenizer = build_tokenizer(spec)
    finals = {k: output_prefix_for(output_prefix, k, split_sentences) for k in json_keys}
    temps = {k: f"{p}.tmp{os.getpid()}" for k, p in finals.items()}
    stats = PreprocessStats()
    start = time.perf_counter()
    try:
        builders = open_builders(temps, DType.optimal_dtype(tokenizer.vocab_size), output_prefix)
        try:
            _tokenize_into(builders, inputs, json_keys, workers,
                           (tokenizer, tuple(json_keys), append_eod, split_sentences), stats,
                           skip_bad_lines, progress)
        except BrokenProcessPool as err:
            raise WorkerDied(f"a tokenizing worker died ({err}); nothing was written to "
                             f"{output_prefix}; rerun (with fewer --workers if memory ran out)"
                             ) from None
        if stats.documents == stats.empty_documents:
            raise BadInputError(f"no text in {', '.join(inputs)}: the input is empty"
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
    # ~3 s each) and loads the tokenizer again; the workers only tokenize and parse json.
    with ProcessPoolExecutor(workers, multiprocessing.get_context("fork"), init_worker,
                             init_args) as pool, \
            tqdm(unit=" docs", disable=not progress, mininterval=1.0) as bar:
        chunks = _chunks(read_records(inputs, json_keys), CHUNK_RECORDS)
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
    stats.documents += 1
    tokens = sum(len(ids) for ids, _ in result)
    stats.empty_documents += tokens == 0
    stats.tokens += tokens
    for key, (ids, lengths) in zip(keys, result):
        builders[key].add_document(ids, lengths)
