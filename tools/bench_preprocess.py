"""Preprocessing throughput per tokenizer type and input form: tools/preprocess_data.py's
pipeline at 1 and 2 workers, as ratios to a plain single-process reference of the same
tokenizer (read jsonl, json.loads, encode_batch per 256 documents as the workers do, eod,
megatron-core's IndexedDatasetBuilder; no pool, no chunking, no checks), in one run.

    python tools/bench_preprocess.py [--docs 600] [--repeats 3] [--cache-dir data_cache]

The corpus is the built-in one (the stdlib as jsonl; built into --cache-dir if needed), cut to
--docs documents. Tokenizers, all made here from it: its sentencepiece model
(SentencePieceTokenizer), a byte-level BPE of the same size (HuggingFaceTokenizer; its
vocab.json + merges.txt as GPT2BPETokenizer; its Megatron tiktoken vocabulary as TikTokenizer)
and NullTokenizer over the sentencepiece ids written as text. Forms (with the sentencepiece and
the Hugging Face tokenizers): jsonl, .jsonl.gz, .jsonl.zst, parquet, a datasets directory.
Each variant runs --repeats times, interleaved, and reports its median. Hugging Face tokenizers
run single-threaded (TOKENIZERS_PARALLELISM=false), so every process uses one core. Besides the
wall-clock ratio, each variant's CPU seconds (its processes together) against the reference's:
the pipeline's overhead, which holds on a machine whose cores are shared while wall-clock
ratios do not.
"""
import argparse
import gzip
import json
import os
import resource
import statistics
import tempfile
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"

import numpy as np  # noqa: E402
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder  # noqa: E402

from magneto_dist.data.corpus import build_builtin_corpus  # noqa: E402
from magneto_dist.data.preprocess import CHUNK_RECORDS, preprocess  # noqa: E402
from magneto_dist.data.tokenizer import TokenizerSpec  # noqa: E402
from magneto_dist.data.tokenizer_types import (build_tokenizer,  # noqa: E402
                                               sentencepiece_tokenizer)
from magneto_dist.data.tokenizer_training import (train_byte_level_bpe,  # noqa: E402
                                                  write_tiktoken_vocab)


def reference(jsonl: str, tokenizer, out_prefix: str) -> int:
    """The plainest correct loop; returns the token count."""
    builder = IndexedDatasetBuilder(out_prefix + ".bin",
                                    dtype=DType.optimal_dtype(tokenizer.vocab_size))
    tokens = 0
    with open(jsonl, encoding="utf-8") as f:
        while True:
            lines = [line for _, line in zip(range(CHUNK_RECORDS), f)]
            if not lines:
                break
            for ids in tokenizer.encode_batch([json.loads(line)["text"] for line in lines]):
                ids = ids + [tokenizer.eod] if ids else ids
                tokens += len(ids)
                builder.add_document(np.asarray(ids, dtype=np.int64), [len(ids)] if ids else [])
    builder.finalize(out_prefix + ".idx")
    return tokens


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def make_inputs(work: str, corpus_jsonl: str, docs: int, spm) -> dict:
    """form -> input path for the same documents; "ids" -> the NullTokenizer's jsonl."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    with open(corpus_jsonl, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(docs), f)]
    paths = {"jsonl": os.path.join(work, "docs.jsonl")}
    with open(paths["jsonl"], "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    raw = open(paths["jsonl"], "rb").read()
    for form, compress in (("jsonl.gz", gzip.compress),
                           ("jsonl.zst", zstandard.ZstdCompressor().compress)):
        paths[form] = os.path.join(work, "docs." + form)
        open(paths[form], "wb").write(compress(raw))
    paths["parquet"] = os.path.join(work, "docs.parquet")
    pq.write_table(pa.table({"text": texts}), paths["parquet"], row_group_size=256)
    paths["datasets"] = os.path.join(work, "docs_hf")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(paths["datasets"])
    paths["ids"] = os.path.join(work, "ids.jsonl")
    with open(paths["ids"], "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": " ".join(map(str, spm.encode(t)))}) + "\n"
                     for t in texts)
    return paths


def make_tokenizers(work: str, corpus, spm) -> dict:
    with open(corpus.jsonl, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(400), f)]
    bpe = train_byte_level_bpe(texts, os.path.join(work, "bpe"), spm.vocab_size)
    return {
        "SentencePieceTokenizer": spm,
        "HuggingFaceTokenizer": build_tokenizer(TokenizerSpec(model=bpe)),
        "GPT2BPETokenizer": build_tokenizer(TokenizerSpec(
            vocab_file=os.path.join(bpe, "vocab.json"),
            merge_file=os.path.join(bpe, "merges.txt"))),
        "TikTokenizer": build_tokenizer(TokenizerSpec("TikTokenizer", write_tiktoken_vocab(
            os.path.join(bpe, "tokenizer.json"), os.path.join(work, "tiktoken.json")))),
        "NullTokenizer": build_tokenizer(TokenizerSpec("NullTokenizer",
                                                       vocab_size=spm.vocab_size)),
    }


def variants(tokenizers: dict, inputs: dict) -> dict:
    """(tokenizer type, form, variant) -> run(out_prefix) -> tokens."""
    out = {}
    for kind, tok in tokenizers.items():
        jsonl = inputs["ids" if kind == "NullTokenizer" else "jsonl"]
        out[kind, "jsonl", "reference"] = lambda p, t=tok, j=jsonl: reference(j, t, p)
        forms = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "datasets") if kind in (
            "SentencePieceTokenizer", "HuggingFaceTokenizer") else ("jsonl",)
        for form in forms:
            path = jsonl if form == "jsonl" else inputs[form]
            for workers in (1, 2):
                out[kind, form, f"{workers} worker{'s' * (workers > 1)}"] = (
                    lambda p, t=tok, i=path, w=workers: preprocess(
                        [i], t, p, workers=w, append_eod=True, progress=False).tokens)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cache-dir", default="data_cache")
    p.add_argument("--docs", type=int, default=600, help="documents of the built-in corpus")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    corpus = build_builtin_corpus(args.cache_dir)
    spm = sentencepiece_tokenizer(corpus.tokenizer_model)
    with tempfile.TemporaryDirectory() as work:
        runs = variants(make_tokenizers(work, corpus, spm),
                        make_inputs(work, corpus.jsonl, args.docs, spm))
        times, cpu, tokens = {key: [] for key in runs}, {key: [] for key in runs}, {}
        load_before = os.getloadavg()[0]
        for r in range(args.repeats):
            for i, (key, run) in enumerate(runs.items()):
                start, start_cpu = time.perf_counter(), cpu_seconds()
                tokens[key] = run(os.path.join(work, f"out{i}r{r}"))
                times[key].append(time.perf_counter() - start)
                cpu[key].append(cpu_seconds() - start_cpu)
        load_after = os.getloadavg()[0]
    print(f"{args.docs} documents of {corpus.jsonl}; cpus={os.cpu_count()}, 1-minute load "
          f"average {load_before:.1f} before, {load_after:.1f} after; median of {args.repeats}")
    print(f"{'tokenizer':<24}{'input':<11}{'variant':<11}{'tokens':>11}{'tokens/s':>12}"
          f"{'vs reference':>14}{'cpu s':>8}{'cpu vs ref':>12}")
    for (kind, form, variant), run_times in times.items():
        ref, ref_cpu = (statistics.median(m[kind, "jsonl", "reference"]) for m in (times, cpu))
        t, c = statistics.median(run_times), statistics.median(cpu[kind, form, variant])
        assert tokens[kind, form, variant] == tokens[kind, "jsonl", "reference"], (kind, form)
        print(f"{kind:<24}{form:<11}{variant:<11}{tokens[kind, form, variant]:>11,}"
              f"{tokens[kind, form, variant] / t:>12,.0f}{ref / t:>14.2f}{c:>8.2f}"
              f"{c / ref_cpu:>12.2f}")


if __name__ == "__main__":
    main()
