"""The built-in corpus: the Python standard library's source and docstrings, ready to train on.

Real text that every machine with Python has, so the default run needs no download. Built once
per cache directory (by local rank 0 of each node; the other ranks wait) in three steps, each
skipped when its output already exists: stdlib -> jsonl, jsonl -> sentencepiece model,
jsonl -> .bin/.idx. Different Python versions give different corpora; the tokenizer hash keeps
their caches apart.
"""
from __future__ import annotations

import json
import os
import sys
import sysconfig
import time
from typing import Iterator, NamedTuple, Tuple

from ..files import build_lock, wait_for_file
from .preprocess import output_prefix_for, preprocess
from .sources import write_training_text
from .tokenizer import TokenizerSpec
from .tokenizer_training import train_sentencepiece

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "lib2to3", "turtledemo"}


def stdlib_sources() -> Iterator[Tuple[str, str]]:
    """(relative path, source text) of every stdlib module outside tests, in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in SKIP_DIRS and not d.startswith("test"))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8", errors="replace") as f:
                    yield os.path.relpath(path, root), f.read()


def write_stdlib_jsonl(path: str) -> int:
    count = 0
    with open(path + ".tmp", "w", encoding="utf-8") as out:
        for rel, text in stdlib_sources():
            if text.strip():
                out.write(json.dumps({"path": rel, "text": text}) + "\n")
                count += 1
    os.replace(path + ".tmp", path)
    return count


class CorpusPaths(NamedTuple):
    jsonl: str            # the stdlib as jsonl
    tokenizer_model: str  # sentencepiece model trained on it
    data_prefix: str      # its .bin/.idx, tokenized with that model


def builtin_corpus_paths(cache_dir: str, vocab_size: int) -> CorpusPaths:
    base = os.path.join(os.path.abspath(cache_dir), f"stdlib-py{sys.version_info[0]}"
                                                    f"{sys.version_info[1]}")
    tokenized = f"{base}-spm{vocab_size}"
    return CorpusPaths(jsonl=base + ".jsonl", tokenizer_model=tokenized + ".model",
                       data_prefix=output_prefix_for(tokenized, "text", sentences=False))


def build_builtin_corpus(cache_dir: str, vocab_size: int = 8192, workers: int = 0,
                         local_rank: int = 0, log=print) -> CorpusPaths:
    """Make sure the corpus exists in cache_dir; returns its paths."""
    paths = builtin_corpus_paths(cache_dir, vocab_size)
    if os.path.exists(paths.data_prefix + ".idx") and os.path.exists(paths.tokenizer_model):
        return paths
    if local_rank != 0:
        wait_for_file(paths.data_prefix + ".idx", "the built-in corpus")
        return paths
    with build_lock(paths.data_prefix + ".lock"):  # another node may be building it
        if not (os.path.exists(paths.data_prefix + ".idx")
                and os.path.exists(paths.tokenizer_model)):
            _build(paths, vocab_size, workers, log)
    return paths


def _build(paths: CorpusPaths, vocab_size: int, workers: int, log) -> None:
    start = time.perf_counter()
    if not os.path.exists(paths.jsonl):
        log(f"built-in corpus: writing the Python standard library to {paths.jsonl}")
        log(f"built-in corpus: {write_stdlib_jsonl(paths.jsonl)} modules")
    if not os.path.exists(paths.tokenizer_model):
        log(f"built-in corpus: training a {vocab_size}-piece sentencepiece model")
        text_path = f"{paths.jsonl}.lines.tmp{os.getpid()}"
        try:
            with open(text_path, "w", encoding="utf-8") as out:
                write_training_text([paths.jsonl], ["text"], out)
            train_sentencepiece(text_path, paths.tokenizer_model.removesuffix(".model"),
                                vocab_size)
        finally:
            os.remove(text_path)
    log("built-in corpus: tokenizing")
    tokenizer = TokenizerSpec("SentencePieceTokenizer", paths.tokenizer_model)
    stats = preprocess([paths.jsonl], tokenizer, paths.data_prefix.removesuffix("_text_document"),
                       ["text"], workers=workers or os.cpu_count() or 1, append_eod=True,
                       progress=False)
    log(f"built-in corpus: {stats.documents} documents, {stats.tokens:,} tokens, built in "
        f"{time.perf_counter() - start:.0f}s")
