"""Reading jsonl inputs: line parsing with file:line errors, encoding inside preprocessing
workers, and the line text a tokenizer is trained on.

Kept free of torch and megatron imports (numpy is cheap) so that workers start fast.
"""
from __future__ import annotations

import gzip
import itertools
import json
import os
import re
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError
from .tokenizer import SentencePieceTokenizer


class BadInputError(DataError):
    """A line of the input that cannot be used; the message names file and line."""


def open_text(path: str):
    """Binary reader for plain or gzip files (decoding is per line, to name the bad line)."""
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_lines(paths: Sequence[str]) -> Iterator[Tuple[str, int, bytes]]:
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file {path} does not exist")
        with open_text(path) as f:
            for number, raw in enumerate(f, start=1):
                if raw.strip():
                    yield path, number, raw


def parse_line(path: str, number: int, raw: bytes, keys: Sequence[str]) -> List[str]:
    """The texts under `keys` of one jsonl line, or BadInputError naming file:line."""
    where = f"{path}:{number}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadInputError(f"{where}: invalid UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadInputError(f"{where}: malformed JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(record, dict):
        raise BadInputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    texts = []
    for key in keys:
        if key not in record:
            raise BadInputError(f"{where}: missing key {key!r} (keys: {', '.join(record)}); "
                                "choose keys with --json-keys")
        if not isinstance(record[key], str):
            raise BadInputError(f"{where}: key {key!r} holds {type(record[key]).__name__}, "
                                "not a string")
        texts.append(record[key])
    return texts


_PARAGRAPH = re.compile(r"\n\s*\n")


def split_sentences(text: str) -> List[str]:
    """Sentence units for masked-LM data: blank-line separated paragraphs (code and prose alike;
    nltk's punkt would need a download)."""
    return [p for p in _PARAGRAPH.split(text) if p.strip()]


# ---- worker side: one tokenizer per process, loaded once by the pool initializer ----
_worker = {}


def init_worker(tokenizer_model: str, keys: Sequence[str], append_eod: bool, sentences: bool):
    _worker.update(tok=SentencePieceTokenizer(tokenizer_model), keys=keys, append_eod=append_eod,
                   sentences=sentences)


def encode_chunk(lines: List[Tuple[str, int, bytes]]):
    """Per line, in order: BadInputError, or per key (token ids, sentence lengths).

    Ids come back as one int32 array per key: pickling Python int lists back to the parent cost
    more than the encoding itself.
    """
    tok, keys = _worker["tok"], _worker["keys"]
    out = []
    for path, number, raw in lines:
        try:
            texts = parse_line(path, number, raw, keys)
        except BadInputError as err:
            out.append(err)
            continue
        doc = []
        for text in texts:
            units = split_sentences(text) if _worker["sentences"] else [text]
            ids = [s for s in tok.encode_batch(units) if s]
            if ids and _worker["append_eod"]:
                ids[-1].append(tok.eod)
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32)
            doc.append((flat, [len(s) for s in ids]))
        out.append(doc)
    return out


def is_jsonl(path: str) -> bool:
    return path.removesuffix(".gz").endswith((".jsonl", ".json"))


def write_training_text(inputs: Sequence[str], json_keys: Sequence[str], out,
                        max_lines: Optional[int] = None, log=None) -> int:
    """Tokenizer-training text: every non-empty line of every input document (jsonl: the
    texts under json_keys; other files: their lines), one per output line. -> lines written."""
    written = 0
    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file {path} does not exist")
        with open_text(path) as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                texts = (parse_line(path, number, raw, json_keys) if is_jsonl(path)
                         else [raw.decode("utf-8", errors="replace")])
                for text in texts:
                    for line in text.splitlines():
                        if line.strip():
                            out.write(line + "\n")
                            written += 1
                if max_lines is not None and written >= max_lines:
                    return written
        if log is not None:
            log(f"read {path}: {written:,} lines so far")
    return written
