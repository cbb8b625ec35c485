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
from typing import Iterator, Tuple

from .datasets import wait_for_file
from .preprocess import output_prefix_for, preprocess
from .tokenizer import train_sentencepiece

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


def _write_tokenizer_text(jsonl: str, text_path: str) -> None:
    with open(jsonl, encoding="utf-8") as src, open(text_path, "w", encoding="utf-8") as out:
        for line in src:
            for text_line in json.loads(line)["text"].splitlines():
                if text_line.strip():
                    out.write(text_line + "\n")


def builtin_corpus_paths(cache_dir: str, vocab_size: int) -> Tuple[str, str]:
    """(data prefix, tokenizer model) of the built-in corpus in cache_dir."""
    base = os.path.join(os.path.abspath(cache_dir), f"stdlib-py{sys.version_info[0]}"
                                                    f"{sys.version_info[1]}")
    model = f"{base}-spm{vocab_size}.model"
    prefix = output_prefix_for(f"{base}-spm{vocab_size}", "text", sentences=False)
    return prefix, model


def build_builtin_corpus(cache_dir: str, vocab_size: int = 8192, workers: int = 0,
                         local_rank: int = 0, log=print) -> Tuple[str, str]:
    """Make sure the corpus exists in cache_dir; returns (data prefix, tokenizer model)."""
    prefix, model = builtin_corpus_paths(cache_dir, vocab_size)
    if os.path.exists(prefix + ".idx") and os.path.exists(model):
        return prefix, model
    if local_rank != 0:
        wait_for_file(prefix + ".idx", "the built-in corpus")
        return prefix, model
    os.makedirs(cache_dir, exist_ok=True)
    start = time.perf_counter()
    jsonl = model.rsplit("-spm", 1)[0] + ".jsonl"
    if not os.path.exists(jsonl):
        log(f"built-in corpus: writing the Python standard library to {jsonl}")
        log(f"built-in corpus: {write_stdlib_jsonl(jsonl)} modules")
    if not os.path.exists(model):
        log(f"built-in corpus: training a {vocab_size}-piece sentencepiece model")
        text_path = f"{jsonl}.lines.tmp{os.getpid()}"
        try:
            _write_tokenizer_text(jsonl, text_path)
            train_sentencepiece(text_path, model[: -len(".model")], vocab_size)
        finally:
            os.remove(text_path)
    log("built-in corpus: tokenizing")
    stats = preprocess([jsonl], model, prefix[: -len("_text_document")], ["text"],
                       workers=workers or os.cpu_count() or 1, append_eod=True, progress=False)
    log(f"built-in corpus: {stats.documents} documents, {stats.tokens:,} tokens, built in "
        f"{time.perf_counter() - start:.0f}s")
    return prefix, model
