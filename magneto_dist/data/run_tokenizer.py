"""The run's tokenizer, kept in its run directory.

A run copies its tokenizer's files into RUN_DIR/tokenizer/ with identity.json (the tokenizer's
identity: type, original paths, per-file hashes, vocabulary size, end-of-document id and text,
one digest), so that tools/generate.py, the checkpoint converter and an export find the very
tokenizer the weights were trained with even after the original files moved, and a resume with
a different tokenizer is refused naming both. The copy also carries megatron-core's
tokenizer_metadata.json, so MegatronTokenizer.from_pretrained loads it too.

    RUN_DIR/tokenizer/identity.json
    RUN_DIR/tokenizer/tokenizer_model/...        (a .model, a tiktoken .json, or HF files)
    RUN_DIR/tokenizer/vocab_file/vocab.json      (GPT2BPETokenizer)
    RUN_DIR/tokenizer/merge_file/merges.txt
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from typing import Optional

from ..config import TOKENIZER_TYPES
from ..errors import CheckpointError
from .tokenizer import Tokenizer, TokenizerSpec, file_sha256
from .tokenizer_types import build_tokenizer, sentencepiece_tokenizer

COPY_DIR = "tokenizer"
IDENTITY_FILE = "identity.json"
SPEC_PATHS = {"tokenizer_model": "model", "vocab_file": "vocab_file", "merge_file": "merge_file"}


def saved_identity(run_dir: str) -> Optional[dict]:
    path = os.path.join(run_dir, COPY_DIR, IDENTITY_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _label(identity: dict) -> str:
    files = " + ".join(identity["paths"].values()) or "(pre-tokenized ids)"
    return (f"{identity['type']} {files} (vocabulary {identity['vocab_size']}, eod "
            f"{identity['eod']}, sha256 {identity['sha256'][:12]})")


def check_resume_tokenizer(run_dir: str, tokenizer: Tokenizer) -> None:
    """Refuse to resume a run trained with another tokenizer (other ids mean other data)."""
    saved = saved_identity(run_dir)
    if saved is not None and saved["sha256"] != tokenizer.sha256:
        raise CheckpointError(
            f"run {run_dir} was trained with tokenizer {_label(saved)}, and this run's tokenizer "
            f"is {_label(tokenizer.identity)}; resume with the same tokenizer (its copy is in "
            f"{os.path.join(run_dir, COPY_DIR)}), or use a new logging.run_dir")


def save_run_tokenizer(run_dir: str, tokenizer: Tokenizer) -> None:
    """Copy the tokenizer's files and identity into run_dir (rank 0, before training); kept as
    it is when it already holds this tokenizer. Written aside and renamed into place."""
    saved = saved_identity(run_dir)
    if saved is not None and saved["sha256"] == tokenizer.sha256:
        return
    final = os.path.join(run_dir, COPY_DIR)
    tmp = f"{final}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    copy = {}
    for key, path in tokenizer.paths().items():
        os.makedirs(os.path.join(tmp, key))
        if os.path.isdir(path):  # a Hugging Face directory: its tokenizer files only
            for name in tokenizer.hashed_files():
                if name.startswith(key + "/"):
                    shutil.copy2(os.path.join(path, name[len(key) + 1:]),
                                 os.path.join(tmp, name))
            copy[key] = key
        else:
            copy[key] = os.path.join(key, os.path.basename(path))
            shutil.copy2(path, os.path.join(tmp, copy[key]))
    _write_megatron_metadata(tmp, tokenizer, copy)
    with open(os.path.join(tmp, IDENTITY_FILE), "w", encoding="utf-8") as f:
        json.dump({**tokenizer.identity, "copy": copy}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(tmp, final)


def _write_megatron_metadata(copy_dir: str, tokenizer: Tokenizer, copy: dict) -> None:
    """megatron-core's tokenizer_metadata.json beside the copied model file, for the libraries
    whose from_pretrained loads local files (not GPT-2 BPE, which it fetches from the Hub)."""
    library = TOKENIZER_TYPES[tokenizer.spec.type]
    if library not in ("sentencepiece", "huggingface", "tiktoken"):
        return
    from megatron.core.tokenizers import MegatronTokenizer
    with warnings.catch_warnings():  # megatron-core's import warns about missing apex/TE
        warnings.simplefilter("ignore")
        MegatronTokenizer.write_metadata(os.path.join(copy_dir, copy["tokenizer_model"]),
                                         library, overwrite=True)


def copied_tokenizer(run_dir: str) -> Optional[Tokenizer]:
    """The tokenizer from the run directory's copy, or None when the run has none (it was
    trained before runs kept one). A copied file that changed since is a CheckpointError."""
    saved = saved_identity(run_dir)
    if saved is None:
        return None
    root = os.path.join(run_dir, COPY_DIR)
    for name, digest in saved["file_sha256"].items():  # "key" or "key/file in a directory"
        key, _, inner = name.partition("/")
        path = os.path.join(root, saved["copy"][key], inner) if inner else os.path.join(
            root, saved["copy"][key])
        if not os.path.isfile(path) or file_sha256(path) != digest:
            raise CheckpointError(f"the run's tokenizer copy {path} is missing or differs from "
                                  f"its record {os.path.join(root, IDENTITY_FILE)}; restore it "
                                  f"(the original was {saved['paths'].get(key, key)})")
    paths = {SPEC_PATHS[key]: os.path.join(root, rel) for key, rel in saved["copy"].items()}
    options = {k: v for k, v in saved["options"].items()
               if k in {f.name for f in dataclasses.fields(TokenizerSpec)}}
    return build_tokenizer(TokenizerSpec(saved["type"], **paths, **options))


def run_tokenizer(run_dir: str, cfg) -> Tokenizer:
    """The tokenizer a run trained with: its copy in the run directory, else (an older run)
    the one its config names, else the built-in corpus's."""
    from .corpus import builtin_corpus_paths
    tokenizer = copied_tokenizer(run_dir)
    if tokenizer is not None:
        return tokenizer
    d = cfg.data
    if d.prefixes:
        return build_tokenizer(TokenizerSpec.from_data_config(d))
    return sentencepiece_tokenizer(
        builtin_corpus_paths(d.cache_dir, d.builtin_vocab_size).tokenizer_model)
