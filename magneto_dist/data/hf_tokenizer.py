"""A run's tokenizer as Hugging Face tokenizer files: `AutoTokenizer.from_pretrained(DIR)` loads
them, offline, and gives exactly the run's token ids, or nothing is written.

The run's tokenizer is the data layer's (tokenizer.py: its type and files as Megatron-LM names
them). Each type that converts has one writer in WRITERS: SentencePieceTokenizer (the trainer's
own kind), HuggingFaceTokenizer (its directory's files are the format) and GPT2BPETokenizer
(vocab.json + merges.txt as transformers' GPT-2 tokenizer saves them); TikTokenizer and
NullTokenizer have no Hugging Face form here and are refused. Before the files count as written,
they are loaded back through AutoTokenizer and compared with the run's own tokenizer, id for id
and text for text, on awkward strings and real text (the Python standard library's sources,
which every machine has); a tokenizer that converts inexactly is refused (CheckpointError,
exit 3: only the export uses this) rather than shipped with other ids.

SentencePiece: transformers' converters are written per model family (Llama, T5, ...) and
assume that family's options, so the tokenizers pipeline is built here from the model's own
normalizer and trainer settings: its normalization (a precompiled charsmap unless "identity"),
extra-whitespace removal, the dummy prefix and whitespace escaping; BPE with merges ordered by
piece score (sentencepiece merges the highest-scoring pair first) or Unigram; byte fallback.
Control pieces (<s>, </s>, <pad>) are special tokens that text never produces
(split_special_tokens), as in sentencepiece; user-defined pieces (<cls>, <sep>, <mask>) are split
out of the text after normalization, so the dummy prefix lands before them as sentencepiece puts it.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import re
import shutil
from typing import Dict, List, Sequence, Tuple

from ..errors import CheckpointError, DataError
from .corpus import stdlib_sources
from .run_tokenizer import run_tokenizer
from .tokenizer import TokenizerSpec
from .tokenizer_types import build_tokenizer

# Strings where converted tokenizers usually go wrong: leading, repeated and mixed whitespace,
# digits, bytes outside the vocabulary, the pieces' own spellings as text.
AWKWARD = ["", " ", "  ", "a", " a", "a ", "hello world", "  two  spaces\n\ttab\r\nend",
           "x\n\n\ny", "12345 3.14159 0x7f",
           "emoji \U0001f916 \u00fcn\u00efc\u00f6d\u00e9 \u4e2d\u6587",
           "<s> </s> <pad> <unk>", "<mask>", " <cls> a<sep>b <mask>x", "<0x41> \u2581 \u2581\u2581",
           "def f(x):\n    return x + 1  # comment\n"]
STDLIB_MODULES, STDLIB_CHARS = 40, 20000  # real text: every 15th stdlib module, truncated

HF_FILES = ("tokenizer.json", "tokenizer_config.json")
HF_OPTIONAL_FILES = ("special_tokens_map.json",)


def tokenizer_of_tag(tag_dir: str, cfg):
    """The tokenizer the run that wrote a checkpoint tag trained with (its copy in the run
    directory, else what its config names; data/run_tokenizer.py)."""
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(tag_dir)))
    try:
        return run_tokenizer(run_dir, cfg)
    except DataError as err:  # e.g. a run's relative data.cache_dir seen from elsewhere
        raise CheckpointError(f"the tokenizer of {tag_dir} cannot be read ({err}); pass "
                              "--tokenizer MODEL_OR_DIR") from None


def tokenizer_of_path(path: str):
    """A tokenizer named on the command line: any file or directory the data layer tells the
    type of, or a Hugging Face model directory (an export)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return HFDirectoryTokenizer(path)
    try:
        return build_tokenizer(TokenizerSpec(model=path))
    except DataError as err:
        raise CheckpointError(f"--tokenizer {path}: {err}") from None


def tokenizer_record(tokenizer) -> dict:
    """What an export's config.json records of its tokenizer (tokenizer_of_record reads it)."""
    return dataclasses.asdict(tokenizer.spec)


def tokenizer_of_record(record: dict):
    try:
        return build_tokenizer(TokenizerSpec(**record))
    except (DataError, TypeError) as err:
        files = " + ".join(str(record.get(k)) for k in ("model", "vocab_file", "merge_file")
                           if record.get(k))
        raise CheckpointError(f"the export's tokenizer ({record.get('type')} {files}) cannot be "
                              f"read ({err}); pass --tokenizer MODEL_OR_DIR") from None


@functools.lru_cache(maxsize=1)
def default_samples() -> List[str]:
    """The awkward strings and excerpts of the standard library's sources."""
    excerpts = (text[:STDLIB_CHARS] for _, text in itertools.islice(stdlib_sources(), 0, None, 15))
    return AWKWARD + list(itertools.islice(excerpts, STDLIB_MODULES))


class HFDirectoryTokenizer:
    """A Hugging Face tokenizer directory as a run reads it (AutoTokenizer): the text's ids,
    nothing added; eod is its eos token. Remote code is never run: where the directory is a
    model with custom code (an export), AutoTokenizer takes its config as a plain one. An
    export's tokenizer read back this way re-exports as a HuggingFaceTokenizer."""

    def __init__(self, directory: str):
        from transformers import AutoTokenizer
        from transformers.utils import logging

        missing = [name for name in HF_FILES if not os.path.isfile(os.path.join(directory, name))]
        if missing:
            raise CheckpointError(f"tokenizer directory {directory} has no "
                                  f"{' or '.join(missing)}; pass a directory written by a fast "
                                  "tokenizer's save_pretrained")
        level = logging.get_verbosity()
        logging.set_verbosity_error()  # "model of type magneto ... of type ''": expected here
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
        finally:
            logging.set_verbosity(level)
        self.vocab_size = len(self.tokenizer)
        self.eod = self.tokenizer.eos_token_id
        self.spec = TokenizerSpec("HuggingFaceTokenizer", os.path.abspath(directory))
        self.name = f"HuggingFaceTokenizer {self.spec.model}"

    def encode(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def decode(self, ids: List[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def write_hf_tokenizer(tokenizer, out_dir: str, model_max_length: int,
                       masked_lm: bool = False) -> Dict[str, int]:
    """Write the Hugging Face files of the run's `tokenizer` (tokenizer.Tokenizer, or an
    HFDirectoryTokenizer) into out_dir (an existing, new directory) and check them against it
    on default_samples(). masked_lm: for an encoder, whose training samples are <cls> text
    <sep> (megatron-core's BERT dataset): the tokenizer names its cls, sep and mask tokens
    (pipeline("fill-mask") needs the mask) and adds <cls> and <sep> around a text as BERT's
    does. Returns the special ids {bos, eos, pad, unk} (None where it has none)."""
    kind = tokenizer.spec.type
    if kind not in WRITERS:
        raise CheckpointError(f"tokenizer {tokenizer.name}: a {kind} has no Hugging Face form "
                              f"here (exported: {', '.join(WRITERS)}); pass --tokenizer with "
                              "one of those that gives the same ids")
    write, skip_special = WRITERS[kind]
    write(tokenizer, out_dir, model_max_length, masked_lm)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(out_dir)
    if len(loaded) != tokenizer.vocab_size:
        raise CheckpointError(f"tokenizer {tokenizer.name}: its Hugging Face conversion has "
                              f"{len(loaded)} tokens, the run's {tokenizer.vocab_size}")
    for text in default_samples():
        expected = tokenizer.encode(text)
        # verbose=False: a sample longer than model_max_length is no problem here
        got = loaded(text, add_special_tokens=False, verbose=False)["input_ids"]
        if got != expected:
            at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b),
                      min(len(expected), len(got)))
            raise CheckpointError(
                f"tokenizer {tokenizer.name}: its Hugging Face conversion gives other ids on "
                f"{text[:40]!r}... (token {at}: {got[at:at + 3]} instead of "
                f"{expected[at:at + 3]}); refusing to export a tokenizer that changes the ids")
        if loaded.decode(got, skip_special_tokens=skip_special) != tokenizer.decode(expected):
            raise CheckpointError(f"tokenizer {tokenizer.name}: its Hugging Face conversion "
                                  f"decodes {text[:40]!r}... to other text; refusing to export it")
    return {name: getattr(loaded, f"{name}_token_id") for name in ("bos", "eos", "pad", "unk")}


def _copy_hf_directory(tokenizer, out_dir: str, model_max_length: int, masked_lm: bool) -> None:
    """A Hugging Face tokenizer directory: its files are already the format (and its own
    special tokens)."""
    source = tokenizer.spec.model
    for name in HF_FILES + HF_OPTIONAL_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(out_dir, name))


def _gpt2_bpe_files(tokenizer, out_dir: str, model_max_length: int, masked_lm: bool) -> None:
    """vocab.json + merges.txt: transformers' GPT-2 tokenizer over them saves its own files."""
    tokenizer.save_pretrained(out_dir)


def _sentencepiece_files(tokenizer, out_dir: str, model_max_length: int,
                        masked_lm: bool) -> None:
    from sentencepiece import sentencepiece_model_pb2
    from transformers import PreTrainedTokenizerFast

    paths = [tokenizer.spec.model]
    proto = sentencepiece_model_pb2.ModelProto()
    with open(paths[0], "rb") as f:
        proto.ParseFromString(f.read())
    trainer, pieces = proto.trainer_spec, proto.pieces
    if proto.denormalizer_spec.precompiled_charsmap:
        raise CheckpointError(f"tokenizer {paths[0]}: a sentencepiece denormalizer has no "
                              "Hugging Face equivalent; cannot export it exactly")
    if trainer.treat_whitespace_as_suffix:
        raise CheckpointError(f"tokenizer {paths[0]}: treat_whitespace_as_suffix has no Hugging "
                              "Face equivalent; cannot export it exactly")
    pipeline = _sentencepiece_pipeline(proto, paths[0])
    special = {name: pieces[i].piece for name, i in (("unk", trainer.unk_id),
                                                      ("eos", trainer.eos_id),
                                                      ("pad", trainer.pad_id)) if i >= 0}
    if "eos" not in special:
        raise CheckpointError(f"tokenizer {paths[0]} has no end-of-sequence piece")
    # Training separates documents with eod (</s>), never <s>: eod is also what precedes a
    # document, so it is the beginning-of-text token (lm-eval's rolling windows start with it).
    special["bos"] = special["eos"]
    if masked_lm:
        special.update(_masked_lm_template(tokenizer, pipeline, pieces))
    wrapper = PreTrainedTokenizerFast(
        tokenizer_object=pipeline, split_special_tokens=True, model_max_length=model_max_length,
        **{f"{name}_token": piece for name, piece in special.items()})
    wrapper.save_pretrained(out_dir)  # tokenizer.json, tokenizer_config.json


def _masked_lm_template(tokenizer, pipeline, pieces) -> Dict[str, str]:
    """{cls, sep, mask: piece} of a masked-LM tokenizer, with the post-processor that puts a
    text between <cls> and <sep> (a pair: <cls> A <sep> B <sep>) as the training data does."""
    from tokenizers.processors import TemplateProcessing

    ids = {"cls": tokenizer.cls, "sep": tokenizer.sep, "mask": tokenizer.mask}
    found = {name: pieces[i].piece for name, i in ids.items() if i is not None}
    if len(found) == 3:
        cls, sep = found["cls"], found["sep"]
        pipeline.post_processor = TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B {sep}",
            special_tokens=[(cls, ids["cls"]), (sep, ids["sep"])])
    return found


NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # ModelProto.SentencePiece
SPACE = "\u2581"  # sentencepiece's visible space


def _sentencepiece_pipeline(proto, path: str):
    """tokenizers.Tokenizer doing what the sentencepiece model does."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers

    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    space = SPACE if norm.escape_whitespaces else " "
    charsmap = norm.precompiled_charsmap
    steps = [normalizers.Precompiled(charsmap)] if charsmap else []
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(space))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    user = [p.piece for p in proto.pieces if p.type == USER_DEFINED]
    tokenizer = Tokenizer(_sentencepiece_model(proto, path, bool(user)))
    tokenizer.normalizer = normalizers.Sequence(steps)
    if user:  # each user-defined piece is a word of its own, as sentencepiece matches them
        tokenizer.pre_tokenizer = pre_tokenizers.Split(
            Regex("|".join(re.escape(piece) for piece in sorted(user, key=len, reverse=True))),
            behavior="isolated")
    # Decoding works on each token's text, then on the fused string: <unk> reads as
    # sentencepiece's unk surface, byte pieces become their bytes, the dummy prefix goes.
    steps = [decoders.Replace(proto.pieces[trainer.unk_id].piece, trainer.unk_surface)]
    steps += [decoders.Replace(SPACE, " ")] if norm.escape_whitespaces else []
    steps += [decoders.ByteFallback()] if trainer.byte_fallback else []
    steps.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _sentencepiece_model(proto, path: str, user_pieces: bool):
    """BPE with merges in score order, or Unigram with the pieces' scores. Pieces that text
    never produces in sentencepiece (unknown, control, unused, byte) cannot win in a Unigram
    lattice."""
    from tokenizers.models import BPE, Unigram

    trainer, pieces = proto.trainer_spec, proto.pieces
    unk = pieces[trainer.unk_id].piece
    if trainer.model_type == 2:  # BPE
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        normal = {p.piece for p in pieces if p.type == NORMAL}
        ranked = []
        for i, p in enumerate(pieces):
            if p.type != NORMAL:
                continue
            for cut in range(1, len(p.piece)):
                left, right = p.piece[:cut], p.piece[cut:]
                if left in normal and right in normal:
                    ranked.append((-p.score, i, vocab[left], left, right))
        merges = [(left, right) for *_, left, right in sorted(ranked)]
        # ignore_merges: a word that is a piece is that piece (how a user-defined piece, split
        # out by the pre-tokenizer, maps to its id; no merges build it)
        return BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                   byte_fallback=trainer.byte_fallback, ignore_merges=user_pieces)
    if trainer.model_type == 1:  # Unigram
        never = (UNKNOWN, CONTROL, UNUSED, BYTE)
        vocab = [(p.piece, -1e9 if p.type in never else p.score) for p in pieces]
        return Unigram(vocab, unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback)
    raise CheckpointError(f"tokenizer {path}: sentencepiece model type {trainer.model_type} "
                          "(word/char) cannot be exported; only BPE and Unigram")


# type -> (writer, whether the run's decode skips special tokens: sentencepiece renders
# <unk> as " \u2047 " and control pieces as nothing; transformers' tokenizers drop specials)
WRITERS = {"SentencePieceTokenizer": (_sentencepiece_files, False),
           "HuggingFaceTokenizer": (_copy_hf_directory, True),
           "GPT2BPETokenizer": (_gpt2_bpe_files, True)}
