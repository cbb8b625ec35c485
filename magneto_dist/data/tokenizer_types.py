"""Each tokenizer type, loaded the way Megatron-LM loads it: megatron-core's `build_tokenizer`
(megatron.core.tokenizers, which goes through `MegatronTokenizer.from_pretrained`) with
Megatron-LM's default flags, so that the ids are Megatron's own. Written here: the one type
megatron-core cannot load from local files (GPT2BPETokenizer), batch encoding for Hugging Face
tokenizers, the end-of-document rules and the masked-LM ids; and `build_tokenizer`, which loads
any type.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import warnings
from typing import Iterable, List, Optional, Sequence

from ..compat.megatron import library_tokenizer
from ..errors import DataError
from .tokenizer import Tokenizer, TokenizerSpec, flag

GPT2_EOD = "<|endoftext|>"
# Megatron-LM's TikTokenizer default vocabulary size (megatron-core's DEFAULT_TIKTOKEN_MAX_VOCAB).
TIKTOKEN_MAX_VOCAB = 2 ** 17


class UnencodableText(DataError):
    """A document the tokenizer cannot encode (NullTokenizer: not a list of ids); the caller
    adds the file and line."""


def megatron_build(spec: TokenizerSpec):
    """megatron-core's build_tokenizer with the flags Megatron-LM's tools/preprocess_data.py
    passes by default (megatron-core 0.16.1: use_fast and include_special_tokens off, no
    legacy sentencepiece, no extra special tokens)."""
    from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer
    args = argparse.Namespace(
        tokenizer_type=spec.type, tokenizer_model=spec.model, vocab_file=spec.vocab_file,
        merge_file=spec.merge_file, tokenizer_metadata=None, tokenizer_special_tokens=None,
        tokenizer_sentencepiece_legacy=False, tokenizer_hf_use_fast=False,
        tokenizer_hf_include_special_tokens=False, trust_remote_code=False,
        tiktoken_pattern=spec.tiktoken_pattern, tiktoken_num_special_tokens=spec.
        tiktoken_num_special_tokens, vocab_size=spec.vocab_size)
    with warnings.catch_warnings():  # megatron-core's import warns about missing apex/TE
        warnings.simplefilter("ignore")
        return build_tokenizer(args)


class SentencePiece(Tokenizer):
    """A sentencepiece .model; eod is its </s>. The project's own models have <pad> <unk> <s>
    </s> at 0-3 and <cls> <sep> <mask> for masked-LM data."""

    def __init__(self, spec: TokenizerSpec):
        self.spec = spec
        try:
            self._mt = megatron_build(spec)
        except (RuntimeError, OSError) as err:  # sentencepiece: "could not parse ModelProto"
            raise DataError(f"tokenizer model {spec.model} is not a sentencepiece model "
                            f"({str(err).strip()}); pass the .model file written by "
                            "tools/train_tokenizer.py") from None
        self._sp = library_tokenizer(self._mt).tokenizer  # sentencepiece.SentencePieceProcessor
        self.vocab_size = self._mt.vocab_size
        # A model without a pad piece (one not trained here) pads with <unk>: never eod, so
        # megatron-core's pad/eod collision check holds.
        self.pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else self._sp.unk_id()
        eos = self._sp.eos_id()
        self.set_eod(eos, self._sp.id_to_piece(eos) if eos >= 0 else None)
        self.cls, self.sep, self.mask = (self.token_id(p) for p in ("<cls>", "<sep>", "<mask>"))

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self._mt.tokenize(text) for text in texts]  # Megatron's call, one per document

    def decode(self, ids: Iterable[int]) -> str:
        return self._mt.detokenize([int(i) for i in ids])

    def token_id(self, text: str) -> Optional[int]:
        i = self._sp.piece_to_id(text)
        return i if self._sp.id_to_piece(i) == text else None

    def vocab_by_id(self) -> dict:
        return self._mt.inv_vocab


class HuggingFace(Tokenizer):
    """A transformers tokenizer: a local directory (HuggingFaceTokenizer, through megatron-core),
    or GPT-2 BPE files (GPT2BPETokenizer, see gpt2_bpe_from_files); eod is its eos_token."""

    def __init__(self, spec: TokenizerSpec):
        self.spec = spec
        if spec.type == "GPT2BPETokenizer":
            self._hf, eos = gpt2_bpe_from_files(spec), GPT2_EOD
        else:
            try:
                self._hf = library_tokenizer(megatron_build(spec)).tokenizer
            except ValueError as err:  # megatron-core wraps AutoTokenizer's error in this
                raise DataError(f"tokenizer model {spec.model}: transformers cannot load it as "
                                f"a tokenizer directory ({str(err).splitlines()[0]})") from None
            eos = self._hf.eos_token
        self._vocab = self._hf.get_vocab()
        self.vocab_size = len(self._hf)  # what megatron-core's HuggingFaceTokenizer reports
        self.pad = self._hf.pad_token_id if self._hf.pad_token_id is not None else -1
        self.set_eod(self._vocab.get(eos) if eos is not None else None, eos)
        # megatron-core's HuggingFaceTokenizer made cls = bos and sep = eos where missing
        self.cls, self.sep, self.mask = (self._hf.cls_token_id, self._hf.sep_token_id,
                                         self._hf.mask_token_id)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        # One call per batch instead of Megatron's tokenize() + convert_tokens_to_ids() per
        # document (a Python loop over tokens); the same ids (tests/test_tokenizers.py).
        return self._hf(list(texts), add_special_tokens=False, verbose=False)["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_id(self, text: str) -> Optional[int]:
        return self._vocab.get(text)

    def save_pretrained(self, out_dir: str) -> None:
        """The tokenizer's own Hugging Face files (the export writes GPT-2 BPE ones so)."""
        self._hf.save_pretrained(out_dir)

    def vocab_by_id(self) -> dict:
        return {i: t for t, i in self._vocab.items()}


def gpt2_bpe_from_files(spec: TokenizerSpec):
    """GPT2BPETokenizer from local vocab.json + merges.txt.

    Why not megatron-core's: its GPT2BPETokenizer (library "megatron", megatron-core 0.16.1)
    maps the type to the Hub id "gpt2" (no offline use), passes `merge_files=` (sic), which
    transformers ignores, and hands the vocab file over as the merges file. transformers 5's
    GPT2TokenizerFast(vocab=PATH, merges=PATH) builds the same byte-level BPE as a
    tokenizer.json of the same vocabulary and merges (the ids are compared in
    tests/test_tokenizers.py); its vocab_file=/merges_file= keywords silently give an empty
    tokenizer of size 1, and a vocabulary without <|endoftext|> gets it appended as a new id,
    which is refused here instead.
    """
    from transformers import GPT2TokenizerFast
    vocab = _read_json(spec.vocab_file, "vocab_file", dict,
                       "a GPT-2 vocab.json (a JSON object of token -> id)")
    if spec.eod_token is None and GPT2_EOD not in vocab:
        raise DataError(f"tokenizer vocab_file {spec.vocab_file} has no {GPT2_EOD} token; name "
                        f"the end-of-document token with {flag('eod_token')}")
    try:
        return GPT2TokenizerFast(vocab=spec.vocab_file, merges=spec.merge_file)
    except Exception as err:  # the tokenizers library raises a bare Exception on bad merges
        if "initializing BPE" not in str(err):
            raise
        raise DataError(f"tokenizer merge_file {spec.merge_file} does not fit vocab_file "
                        f"{spec.vocab_file}: {err}") from None


class TikToken(Tokenizer):
    """Megatron's TikTokenizer: a JSON list of {rank, token_bytes, token_str}, ids shifted up by
    tiktoken_num_special_tokens (<unk> <s> </s> <mask> <pad> <cls> <sep> first); eod is </s>."""

    def __init__(self, spec: TokenizerSpec):
        if not spec.vocab_size:
            # Megatron-LM's default is 2**17, and a smaller vocabulary fails its assertion;
            # the whole file is the natural size then (the same ids where Megatron works).
            spec = dataclasses.replace(spec, vocab_size=min(
                TIKTOKEN_MAX_VOCAB, spec.tiktoken_num_special_tokens + _count_ranks(spec)))
        self.spec = spec
        try:
            self._mt = megatron_build(spec)
        except (AssertionError, ValueError, KeyError) as err:  # megatron-core asserts the format
            raise DataError(f"tokenizer model {spec.model} is not a Megatron tiktoken vocabulary "
                            f"for these settings ({type(err).__name__}: {err}); check "
                            f"{flag('vocab_size')} and {flag('tiktoken_num_special_tokens')}"
                            ) from None
        self._lib = library_tokenizer(self._mt)
        self.vocab_size, self.pad = self._mt.vocab_size, self._mt.pad
        self.set_eod(self._mt.eod, self._lib.special_tokens[self._mt.eod])
        self.cls, self.sep, self.mask = self._mt.cls, self._mt.sep, self._mt.mask

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self._mt.tokenize(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return self._mt.detokenize([int(i) for i in ids])

    def token_id(self, text: str) -> Optional[int]:
        if text in self._lib.special_tokens:
            return self._lib.special_tokens.index(text)
        try:
            return self._lib.tokenizer.encode_single_token(text)
        except KeyError:
            return None

    def vocab_by_id(self) -> dict:
        return self._mt.inv_vocab


def _count_ranks(spec: TokenizerSpec) -> int:
    return len(_read_json(spec.model, "model", list, "a Megatron tiktoken vocabulary (a JSON "
                          "list of {rank, token_bytes, token_str})"))


def _read_json(path: str, key: str, kind: type, what: str):
    """The JSON value in `path` (the tokenizer's `key` file), which must be a `kind`; a file
    that is not one is a DataError naming it and saying it is not `what`."""
    label = f"tokenizer {key} {path}"
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{label} is not {what} ({err})") from None
    if not isinstance(value, kind):
        raise DataError(f"{label} is not {what}")
    return value


class Null(Tokenizer):
    """Pre-tokenized data (Megatron's NullTokenizer): each document is its ids separated by
    single spaces. With data.vocab_size=N the ids are below N, the end of document is N, and
    the model's vocabulary is N + 1."""

    def __init__(self, spec: TokenizerSpec):
        self.spec = spec
        self._mt = megatron_build(spec)
        self.vocab_size, self.pad = self._mt.vocab_size, -1
        self.set_eod(self._mt.eod, None)
        self.cls = self.sep = self.mask = None

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self._ids(text) for text in texts]

    def _ids(self, text: str) -> List[int]:
        if not text.strip():
            return []
        try:
            ids = self._mt.tokenize(text)
        except ValueError:
            raise UnencodableText("a NullTokenizer reads token ids separated by single spaces, "
                                  f"not {text[:40]!r}") from None
        bad = [i for i in (min(ids), max(ids)) if not 0 <= i < self.vocab_size]
        if bad:
            raise UnencodableText(f"token id {bad[0]} is outside 0..{self.vocab_size - 1} "
                                  f"({flag('vocab_size')}={self.spec.vocab_size}, eod "
                                  f"{self.eod})")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._mt.detokenize([int(i) for i in ids])

    def token_id(self, text: str) -> Optional[int]:
        return None


# The class of each config.TOKENIZER_TYPES name (tests/test_tokenizers.py checks they match).
TOKENIZER_CLASSES = {"SentencePieceTokenizer": SentencePiece, "HuggingFaceTokenizer": HuggingFace,
                     "GPT2BPETokenizer": HuggingFace, "TikTokenizer": TikToken,
                     "NullTokenizer": Null}


def build_tokenizer(spec: TokenizerSpec) -> Tokenizer:
    """Load any tokenizer type; DataError (one line, naming the file) when it cannot be."""
    spec = spec.resolved()
    return TOKENIZER_CLASSES[spec.type](spec)


def sentencepiece_tokenizer(model_path: str) -> Tokenizer:
    """The project's own kind: a sentencepiece .model (the built-in corpus's tokenizer)."""
    return build_tokenizer(TokenizerSpec("SentencePieceTokenizer", model_path))
