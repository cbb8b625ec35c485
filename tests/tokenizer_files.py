"""Test helpers: tokenizers of every type made offline, and Megatron-LM's preprocessing path
rebuilt from megatron-core's classes as the reference the project's output must equal."""
import argparse
import json
import os
import warnings

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from magneto_dist.data.corpus import stdlib_sources
from magneto_dist.data.tokenizer_training import (train_byte_level_bpe, train_sentencepiece,
                                                   write_tiktoken_vocab)

# Documents with the edges: empty, blank, special-token texts inside, CRLF, non-ASCII, a list
# of sentences (Megatron-LM takes a list as the document's sentences).
EDGE_DOCS = ["", "   ", "a <|endoftext|> b </s> c <s>", "line one\r\nline two\n\n\nthree",
             "naïve café — 東京 🙂", ["first sentence.", "", "second one"], "x"]


def stdlib_docs(n: int, chars: int = 2000):
    return [text[:chars] for _, text in stdlib_sources()][:n]


def write_jsonl(path, docs, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({key: doc}) + "\n")
    return str(path)


def make_tokenizers(directory, texts):
    """{type: spec kwargs} for a sentencepiece model, a byte-level BPE directory (with
    vocab.json + merges.txt of the same BPE), a tiktoken vocabulary made from that BPE and a
    BPE with masked-LM tokens."""
    d = str(directory)
    with open(os.path.join(d, "train.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(line for t in texts for line in t.splitlines() if line.strip()))
    spm = train_sentencepiece(os.path.join(d, "train.txt"), os.path.join(d, "spm"), 400)
    bpe = train_byte_level_bpe(texts, os.path.join(d, "bpe"), 500)
    mlm = train_byte_level_bpe(texts, os.path.join(d, "bpe_mlm"), 500, masked_lm_tokens=True)
    tiktoken = write_tiktoken_vocab(os.path.join(bpe, "tokenizer.json"),
                                    os.path.join(d, "tiktoken.json"))
    return {"spm": spm, "bpe": bpe, "bpe_mlm": mlm, "tiktoken": tiktoken,
            "vocab": os.path.join(bpe, "vocab.json"), "merges": os.path.join(bpe, "merges.txt")}


def megatron_tokenizer(tokenizer_type, **kw):
    """megatron-core's build_tokenizer with Megatron-LM 0.16.1's default flags."""
    from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer
    args = dict(tokenizer_type=tokenizer_type, tokenizer_model=None, vocab_file=None,
                merge_file=None, tokenizer_metadata=None, tokenizer_special_tokens=None,
                tokenizer_sentencepiece_legacy=False, tokenizer_hf_use_fast=False,
                tokenizer_hf_include_special_tokens=False, trust_remote_code=False,
                tiktoken_pattern=None, tiktoken_num_special_tokens=1000, vocab_size=None)
    args.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_tokenizer(argparse.Namespace(**args))


def megatron_preprocess(jsonl, tokenizer, output_prefix, keys=("text",), append_eod=True):
    """Megatron-LM's tools/preprocess_data.py (Encoder.encode + process_json_file) for one
    jsonl file and one process: the reference bytes."""
    builders = {k: IndexedDatasetBuilder(f"{output_prefix}_{k}_document.bin",
                                         dtype=DType.optimal_dtype(tokenizer.vocab_size))
                for k in keys}
    with open(jsonl, encoding="utf-8") as fin:
        for line in fin:
            data = json.loads(line)
            for key in keys:
                text = data[key]
                sentences = text if isinstance(text, list) else [text]
                doc_ids, lens = [], []
                for sentence in sentences:
                    ids = tokenizer.tokenize(sentence)
                    if len(ids) > 0:
                        doc_ids.extend(ids)
                        lens.append(len(ids))
                if len(doc_ids) > 0 and append_eod:
                    doc_ids.append(tokenizer.eod)
                    lens[-1] += 1
                builders[key].add_document(doc_ids, lens)
    for key in keys:
        builders[key].finalize(f"{output_prefix}_{key}_document.idx")
    return output_prefix


def read_bytes(prefix):
    return [open(prefix + ext, "rb").read() for ext in (".bin", ".idx")]


def empty_documents(prefix):
    """Documents of an indexed dataset with no sequence (an empty line's boundary)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    data = IndexedDataset(prefix)  # held: its arrays are views of its memory map
    return int(np.sum(np.diff(data.document_indices) == 0))
