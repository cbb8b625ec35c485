"""Training tokenizers of both kinds: sentencepiece (the default, and the built-in corpus's) and a
byte-level BPE with the Hugging Face `tokenizers` library, saved as a directory that
transformers' AutoTokenizer loads (HuggingFaceTokenizer) and, from the same BPE, GPT-2's
vocab.json + merges.txt (GPT2BPETokenizer). Each is written under a temporary name and renamed,
so a killed run never leaves half a tokenizer behind.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
from typing import Iterable

# Special pieces every sentencepiece model we train has, at fixed ids (pad, unk, bos, eos first).
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
MASKED_LM_PIECES = ("<cls>", "<sep>", "<mask>")
# The byte-level BPE's end of document, as GPT-2's; first, so it has id 0.
BPE_EOD = "<|endoftext|>"


def train_sentencepiece(text_file: str, output_prefix: str, vocab_size: int,
                        model_type: str = "bpe", input_sentence_size: int = 2_000_000,
                        num_threads: int = os.cpu_count() or 1) -> str:
    """Train from a plain-text file (one sentence per line); returns the .model path."""
    import sentencepiece as spm
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


def train_byte_level_bpe(texts: Iterable[str], output_dir: str, vocab_size: int,
                         masked_lm_tokens: bool = False) -> str:
    """Train GPT-2's kind of BPE (bytes, no unknown token) into output_dir: tokenizer.json and
    tokenizer_config.json (eos/bos/unk = <|endoftext|>; with masked_lm_tokens also
    [CLS] [SEP] [MASK] [PAD]), plus vocab.json and merges.txt. Returns output_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    extra = ["[CLS]", "[SEP]", "[MASK]", "[PAD]"] if masked_lm_tokens else []
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOD] + extra,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": BPE_EOD,
              "bos_token": BPE_EOD, "unk_token": BPE_EOD, "model_max_length": 1 << 30}
    if masked_lm_tokens:
        config.update(cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                      pad_token="[PAD]")
    tmp = f"{output_dir.rstrip(os.sep)}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    try:
        tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        tokenizer.model.save(tmp)  # vocab.json and merges.txt
        with open(os.path.join(tmp, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        if os.path.isdir(output_dir):  # a retrained tokenizer replaces the old one whole
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def write_tiktoken_vocab(tokenizer_json: str, path: str) -> str:
    """Megatron's TikTokenizer vocabulary (a JSON list of {rank, token_bytes, token_str}, ranks
    0-255 the single bytes in order, then the merged tokens in id order) from a byte-level
    BPE's tokenizer.json: the same BPE for Megatron's tiktoken path. Its special tokens are
    dropped (TikTokenizer has its own, below tiktoken_num_special_tokens)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    with open(tokenizer_json, encoding="utf-8") as f:
        saved = json.load(f)
    special = {t["content"] for t in saved.get("added_tokens", [])}
    merged = [bytes(to_byte[c] for c in token)
              for token, _ in sorted(saved["model"]["vocab"].items(), key=lambda kv: kv[1])
              if len(token) > 1 and token not in special]
    ranks = [bytes([i]) for i in range(256)] + merged
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump([{"rank": r, "token_bytes": base64.b64encode(b).decode(),
                    "token_str": b.decode("utf-8", "replace")} for r, b in enumerate(ranks)], f)
    os.replace(tmp, path)
    return path
