"""The tokenizer layer: which tokenizer (a TokenizerSpec, in Megatron-LM's terms) and the one
interface that preprocessing, datasets, training, sampling and export share. Each type's
loading, and `build_tokenizer`, are tokenizer_types.py's (which imports this module, never the
other way round).

megatron-core's datasets take any object with vocab_size, eod, pad (GPT) and cls, sep, mask,
inv_vocab (masked LM), plus `unique_identifiers`, which they hash into the index-cache key. We
put there the tokenizer's type and a digest of its files' contents (and of the options that
change its ids), so caches built with one tokenizer are never reused with another, whatever the
files are called. The same digest, with the type, the file paths, the vocabulary size and the
end-of-document id and text, is the tokenizer's `identity`: what a run directory records and a
resume compares.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..config import TOKENIZER_TYPES
from ..errors import DataError

# megatron-core's convention: a tokenizer directory may say its library in this file.
METADATA_FILE = "tokenizer_metadata.json"
# The files of a Hugging Face tokenizer directory that decide its ids (a model directory may hold
# gigabytes of weights beside them: only these are hashed and copied).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
                      "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                      "chat_template.jinja")
MASKED_LM_TOKENS = ("cls", "sep", "mask")


def flag(key: str) -> str:
    """How a user names a tokenizer setting: the run config key and the tools' flag."""
    return f"data.{key} (--{key.replace('_', '-')})"


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """Which tokenizer: the same settings as Megatron-LM's tokenizer flags."""
    type: Optional[str] = None          # a TOKENIZER_TYPES name; None: told by the files
    model: Optional[str] = None         # .model file, Hugging Face directory, tiktoken .json
    vocab_file: Optional[str] = None    # GPT2BPETokenizer: vocab.json
    merge_file: Optional[str] = None    # GPT2BPETokenizer: merges.txt
    eod_token: Optional[str] = None     # end-of-document token text, instead of the tokenizer's
    vocab_size: Optional[int] = None    # NullTokenizer: ids below it; TikTokenizer: cut to it
    tiktoken_pattern: str = "v2"        # TikTokenizer: Megatron's split pattern, v1 or v2
    tiktoken_num_special_tokens: int = 1000  # TikTokenizer: ids below it are special tokens

    @classmethod
    def from_data_config(cls, d) -> "TokenizerSpec":
        """From the run config's data section (magneto_dist.config.DataConfig)."""
        return cls(d.tokenizer_type, d.tokenizer_model, d.vocab_file, d.merge_file, d.eod_token,
                   d.vocab_size, d.tiktoken_pattern, d.tiktoken_num_special_tokens)

    def resolved(self) -> "TokenizerSpec":
        """The type named (told from the files when not given) and the paths made absolute;
        DataError naming the setting when something needed is missing."""
        kind = self.type or self._inferred_type()
        if kind not in TOKENIZER_TYPES:
            raise DataError(f"{flag('tokenizer_type')}={kind!r} is not a tokenizer type; use one "
                            f"of {', '.join(TOKENIZER_TYPES)}")
        absolute = {key: os.path.abspath(getattr(self, key))
                    for key in ("model", "vocab_file", "merge_file") if getattr(self, key)}
        spec = dataclasses.replace(self, type=kind, **absolute)
        if kind == "HuggingFaceTokenizer" and spec.model and os.path.basename(
                spec.model) == "tokenizer.json":
            spec = dataclasses.replace(spec, model=os.path.dirname(spec.model))
        for key, path in spec.required_paths():
            if not path:
                raise DataError(f"a {kind} needs {flag(key)}")
            if not os.path.exists(path):
                raise DataError(f"tokenizer {'model' if key == 'tokenizer_model' else key} "
                                f"{path} does not exist; train one with `python "
                                "tools/train_tokenizer.py` or fix the path")
        if kind == "NullTokenizer" and not spec.vocab_size:
            raise DataError(f"a NullTokenizer needs {flag('vocab_size')}: the data's ids are "
                            "below it and its end of document is vocab_size itself")
        return spec

    def required_paths(self) -> List[Tuple[str, Optional[str]]]:
        """(Megatron's setting, path) of each file this type is made of."""
        if self.type == "GPT2BPETokenizer":
            return [("vocab_file", self.vocab_file), ("merge_file", self.merge_file)]
        if self.type == "NullTokenizer":
            return []
        return [("tokenizer_model", self.model)]

    def _inferred_type(self) -> str:
        """A .model file: sentencepiece; a directory with tokenizer.json: Hugging Face;
        vocab_file + merge_file: GPT-2 BPE; a .json list of ranks: tiktoken; or what a
        tokenizer_metadata.json beside it says."""
        if not self.model:
            if self.vocab_file and self.merge_file:
                return "GPT2BPETokenizer"
            raise DataError(f"no tokenizer: set {flag('tokenizer_model')} (or "
                            f"{flag('vocab_file')} and {flag('merge_file')} for GPT-2 BPE)")
        path = self.model
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        metadata = os.path.join(directory, METADATA_FILE)
        if os.path.isfile(metadata):
            try:
                with open(metadata, encoding="utf-8") as f:
                    library = json.load(f).get("library")
            except (ValueError, AttributeError) as err:  # not JSON, or not an object
                raise DataError(f"{metadata} is not megatron-core tokenizer metadata ({err}); "
                                f"fix it, or set {flag('tokenizer_type')}") from None
            for kind, lib in TOKENIZER_TYPES.items():
                if lib == library and lib != "megatron":
                    return kind
        if os.path.isdir(path):
            if any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json",
                                                                  "tokenizer_config.json")):
                return "HuggingFaceTokenizer"
        elif path.endswith(".model"):
            return "SentencePieceTokenizer"
        elif os.path.basename(path) == "tokenizer.json":
            return "HuggingFaceTokenizer"
        elif path.endswith(".json") and os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                if f.read(64).lstrip().startswith("["):  # Megatron's tiktoken vocabulary
                    return "TikTokenizer"
        if not os.path.exists(path):
            raise DataError(f"tokenizer model {path} does not exist; train one with `python "
                            "tools/train_tokenizer.py` or fix the path")
        raise DataError(f"cannot tell which tokenizer {path} is; set {flag('tokenizer_type')} "
                        f"to one of {', '.join(TOKENIZER_TYPES)}")

    def options(self) -> Dict[str, object]:
        """The settings besides the files that change the ids (part of the identity)."""
        out: Dict[str, object] = {}
        if self.eod_token is not None:
            out["eod_token"] = self.eod_token
        if self.type in ("NullTokenizer", "TikTokenizer") and self.vocab_size:
            out["vocab_size"] = self.vocab_size
        if self.type == "TikTokenizer":
            out.update(tiktoken_pattern=self.tiktoken_pattern,
                       tiktoken_num_special_tokens=self.tiktoken_num_special_tokens)
        return out


class Tokenizer:
    """A loaded tokenizer of any type (made by build_tokenizer); ids are plain ints.

    Subclasses (tokenizer_types.py) set vocab_size, eod, pad and the masked-LM ids, and
    implement encode_batch (the same ids as Megatron-LM's per-document `tokenize`), decode,
    token_id and (for masked LM) vocab_by_id.
    """
    spec: TokenizerSpec
    vocab_size: int
    eod: int
    eod_text: Optional[str]
    pad: int                 # -1 when the tokenizer has none (megatron-core's own fallback)
    cls: Optional[int] = None
    sep: Optional[int] = None
    mask: Optional[int] = None

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_id(self, text: str) -> Optional[int]:
        """The id of the token spelled `text`, or None if the vocabulary has no such token."""
        raise NotImplementedError

    @functools.cached_property
    def inv_vocab(self) -> dict:
        """id -> token text, built once: megatron-core's masking reads it once per token."""
        return self.vocab_by_id()

    def vocab_by_id(self) -> dict:
        raise NotImplementedError

    def encode(self, text: str) -> List[int]:
        return self.encode_batch([text])[0]

    @property
    def name(self) -> str:
        """The type and its files, as messages name the tokenizer."""
        return f"{self.spec.type} {' + '.join(self.paths().values()) or '(pre-tokenized ids)'}"

    @property
    def setting(self) -> str:
        """How the run config names this tokenizer (data.tokenizer_model=PATH, ...)."""
        if self.spec.type == "NullTokenizer":
            return f"data.tokenizer_type=NullTokenizer data.vocab_size={self.spec.vocab_size}"
        return " ".join(f"data.{key}={path}" for key, path in self.paths().items())

    def paths(self) -> Dict[str, str]:
        """Megatron's setting -> path: tokenizer_model, or vocab_file and merge_file."""
        return {key: path for key, path in self.spec.required_paths()}

    def hashed_files(self) -> Dict[str, str]:
        """Name -> path of every file the ids depend on (a Hugging Face directory: its
        tokenizer files; the name is the setting, then the file's name inside a directory)."""
        out = {}
        for key, path in self.paths().items():
            if os.path.isdir(path):
                for name in HF_TOKENIZER_FILES:
                    if os.path.isfile(os.path.join(path, name)):
                        out[f"{key}/{name}"] = os.path.join(path, name)
            else:
                out[key] = path
        return out

    def set_eod(self, native: Optional[int], native_text: Optional[str]) -> None:
        """The end-of-document id: the spec's eod_token if named, else the tokenizer's own;
        DataError when there is none (never a silent default)."""
        text = self.spec.eod_token
        if text is not None:
            if self.spec.type == "NullTokenizer":
                raise DataError(f"{flag('eod_token')} does not apply to a NullTokenizer (its end "
                                "of document is vocab_size)")
            native = self.token_id(text)
            if native is None:
                raise DataError(f"{flag('eod_token')}={text!r} is not a token of {self.name}; "
                                "name a token of its vocabulary")
            native_text = text
        elif native is None or native < 0:
            raise DataError(f"tokenizer {self.name} has no end-of-document token; name one with "
                            f"{flag('eod_token')} (e.g. the text of its end-of-text token)")
        self.eod, self.eod_text = int(native), native_text

    def masked_lm_ids(self) -> Tuple[int, int, int]:
        """(cls, sep, mask) for masked-LM data, or DataError naming the missing tokens."""
        ids = [getattr(self, k) for k in MASKED_LM_TOKENS]
        missing = [k for k, i in zip(MASKED_LM_TOKENS, ids) if i is None or i < 0]
        if missing:
            raise DataError(
                f"tokenizer {self.name} has no {', '.join(missing)} token"
                f"{'s' if len(missing) > 1 else ''}; masked-LM data needs cls, sep and mask "
                "tokens: a sentencepiece model from tools/train_tokenizer.py has <cls> <sep> "
                "<mask>, a Hugging Face tokenizer needs cls_token, sep_token and mask_token")
        return tuple(ids)

    @functools.cached_property
    def identity(self) -> dict:
        """What the run directory keeps and index caches are keyed by (see the module doc)."""
        file_hashes = {name: file_sha256(path)
                       for name, path in sorted(self.hashed_files().items())}
        digest = hashlib.sha256(json.dumps(
            [self.spec.type, file_hashes, self.spec.options()], sort_keys=True).encode())
        return {"type": self.spec.type, "paths": self.paths(), "file_sha256": file_hashes,
                "options": self.spec.options(), "vocab_size": self.vocab_size, "eod": self.eod,
                "eod_text": self.eod_text, "sha256": digest.hexdigest()}

    @property
    def sha256(self) -> str:
        return self.identity["sha256"]

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict([("class", self.spec.type), ("sha256", self.sha256)])

    def describe(self) -> str:
        """One log line: type, files, vocabulary size, end-of-document id and text."""
        eod = f"eod {self.eod}" + (f" {self.eod_text!r}" if self.eod_text is not None else
                                   " (= vocab_size - 1)")
        return f"tokenizer: {self.name} (vocabulary {self.vocab_size}, {eod})"

