"""SentencePiece tokenizer with the attributes megatron-core's datasets read, and its training.

megatron-core's datasets take any object with vocab_size, eod, pad (GPT) and cls, sep, mask,
inv_vocab (masked LM), plus `unique_identifiers`, which they hash into the index-cache key. We
put the model file's SHA-256 there, so caches built with one tokenizer are never reused with
another, whatever the file is called.
"""
from __future__ import annotations

import functools
import hashlib
import os
from collections import OrderedDict
from typing import Iterable, List

import sentencepiece as spm

from ..errors import DataError

# Special pieces every tokenizer we train has, at fixed ids (pad, unk, bos, eos first).
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
MASKED_LM_PIECES = ("<cls>", "<sep>", "<mask>")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class SentencePieceTokenizer:
    """A loaded .model file; ids are plain ints, eod is sentencepiece's </s>."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise DataError(f"tokenizer model {model_path} does not exist; train one with "
                                    "`python tools/train_tokenizer.py` or fix the path")
        self.model_path = os.path.abspath(model_path)
        self.sha256 = file_sha256(model_path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as err:  # sentencepiece: "could not parse ModelProto"
            raise DataError(f"tokenizer model {model_path} is not a sentencepiece model "
                             f"({str(err).strip()}); pass the .model file written by "
                             "tools/train_tokenizer.py") from None
        self.vocab_size = self.sp.get_piece_size()
        self.eod = self.sp.eos_id()
        self.bos = self.sp.bos_id()
        self.unk = self.sp.unk_id()
        # A model without a pad piece (one not trained here) pads with <unk>: never eod, so
        # megatron-core's pad/eod collision check holds.
        self.pad = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.unk
        if self.eod < 0:
            raise DataError(f"tokenizer model {model_path} has no end-of-sequence piece; "
                             "train it with eos_id set (tools/train_tokenizer.py does)")
        self.cls, self.sep, self.mask = (self.sp.piece_to_id(p) for p in MASKED_LM_PIECES)

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict([("class", "SentencePieceTokenizer"), ("model_sha256", self.sha256)])

    @functools.cached_property
    def inv_vocab(self) -> dict:
        """id -> piece; megatron-core's masking reads it once per token, so it is built once."""
        return {i: self.sp.id_to_piece(i) for i in range(self.vocab_size)}

    @property
    def has_masked_lm_pieces(self) -> bool:
        return self.unk not in (self.cls, self.sep, self.mask)

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Iterable[str]) -> List[List[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


def train_sentencepiece(text_file: str, output_prefix: str, vocab_size: int,
                        model_type: str = "bpe", input_sentence_size: int = 2_000_000,
                        num_threads: int = os.cpu_count() or 1) -> str:
    """Train from a plain-text file (one sentence per line); returns the .model path.

    Written to a temporary prefix and renamed, so a killed run never leaves a half model behind.
    """
    tmp_prefix = f"{output_prefix}.tmp{os.getpid()}"
    spm.SentencePieceTrainer.train(
        input=text_file, model_prefix=tmp_prefix, vocab_size=vocab_size, model_type=model_type,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece=PAD, unk_piece=UNK, bos_piece=BOS,
        eos_piece=EOS, user_defined_symbols=list(MASKED_LM_PIECES), byte_fallback=True,
        character_coverage=0.9999, input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True, max_sentence_length=8192, split_digits=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", num_threads=num_threads, minloglevel=2)
    for ext in (".model", ".vocab"):
        os.replace(tmp_prefix + ext, output_prefix + ext)
    return output_prefix + ".model"
