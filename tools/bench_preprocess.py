"""Preprocessing throughput: tools/preprocess_data.py's pipeline at 1 and 2 workers, as ratios to
a plain single-process reference that encodes with the same tokenizer and writes with
megatron-core's IndexedDatasetBuilder directly (no pool, no chunking, no checks).

    python tools/bench_preprocess.py [--input FILE.jsonl --tokenizer-model M.model] [--repeats 3]

Without --input it uses the built-in corpus (the stdlib as jsonl, ~3M tokens), building it into
--cache-dir if needed. Each variant runs --repeats times, interleaved, and reports its median.
"""
import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from magneto_dist.data.corpus import build_builtin_corpus
from magneto_dist.data.preprocess import preprocess
from magneto_dist.data.tokenizer import SentencePieceTokenizer


def reference(jsonl: str, model: str, out_prefix: str) -> int:
    """The plainest correct loop: read, encode, add, finalize. Returns the token count."""
    tok = SentencePieceTokenizer(model)
    builder = IndexedDatasetBuilder(out_prefix + ".bin", dtype=DType.optimal_dtype(tok.vocab_size))
    tokens = 0
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            ids = tok.encode(json.loads(line)["text"]) + [tok.eod]
            tokens += len(ids)
            builder.add_document(np.asarray(ids, dtype=np.int64), [len(ids)])
    builder.finalize(out_prefix + ".idx")
    return tokens


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", help="jsonl with a 'text' key (default: the built-in corpus)")
    p.add_argument("--tokenizer-model")
    p.add_argument("--cache-dir", default="data_cache")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.input:
        jsonl, model = args.input, args.tokenizer_model
    else:
        corpus = build_builtin_corpus(args.cache_dir)
        jsonl, model = corpus.jsonl, corpus.tokenizer_model
    variants = {
        "reference (1 process)": lambda out: reference(jsonl, model, out),
        "preprocess, 1 worker": lambda out: preprocess([jsonl], model, out, workers=1,
                                                       append_eod=True, progress=False).tokens,
        "preprocess, 2 workers": lambda out: preprocess([jsonl], model, out, workers=2,
                                                        append_eod=True, progress=False).tokens,
    }
    times = {name: [] for name in variants}
    tokens = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for i, (name, run) in enumerate(variants.items()):
                start = time.perf_counter()
                tokens[name] = run(os.path.join(tmp, f"v{i}r{r}"))
                times[name].append(time.perf_counter() - start)
    ref = "reference (1 process)"
    assert len(set(tokens.values())) == 1, f"variants disagree on the token count: {tokens}"
    print(f"input {jsonl}: {tokens[ref]:,} tokens, cpus={os.cpu_count()}")
    print(f"{'variant':<24}{'tokens/s':>14}{'speed vs reference':>22}")
    for name in variants:
        t = statistics.median(times[name])
        print(f"{name:<24}{tokens[name] / t:>14,.0f}"
              f"{statistics.median(times[ref]) / t:>22.2f}")


if __name__ == "__main__":
    main()
