"""Tokenize jsonl into the Megatron indexed format (.bin/.idx), in parallel.

    python tools/preprocess_data.py --input data.jsonl [more.jsonl.gz ...] --json-keys text \
        --tokenizer-model tok/spm.model --output-prefix out/corpus --workers 8 --append-eod

writes out/corpus_text_document.bin/.idx (out/corpus_text_sentence.* with --split-sentences),
readable by megatron-core's IndexedDataset and Megatron-LM. The output is byte-identical for any
--workers, and appears only once complete. A malformed line stops the run with its file and line
number, unless --skip-bad-lines.
"""
import argparse
import sys


from magneto_dist.errors import MagnetoError
from magneto_dist.data.preprocess import WorkerDied, output_prefix_for, preprocess


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="jsonl files (.gz allowed)")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--tokenizer-model", required=True, help="sentencepiece .model file")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--append-eod", action="store_true", help="end every document with </s>")
    p.add_argument("--split-sentences", action="store_true",
                   help="store blank-line separated paragraphs as sentences (masked-LM data)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip unusable lines and report how many, instead of stopping")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers={args.workers} must be at least 1")
    try:
        stats = preprocess(args.input, args.tokenizer_model, args.output_prefix, args.json_keys,
                           workers=args.workers, append_eod=args.append_eod,
                           split_sentences=args.split_sentences,
                           skip_bad_lines=args.skip_bad_lines, progress=not args.no_progress)
    except (MagnetoError, FileNotFoundError, WorkerDied) as err:
        sys.exit(f"error: {err}")
    for line in stats.skipped_lines[:10]:
        print(f"skipped {line}", file=sys.stderr)
    if stats.skipped_lines:
        print(f"skipped {len(stats.skipped_lines)} bad lines", file=sys.stderr)
    rate = stats.tokens / max(stats.seconds, 1e-9)
    outputs = ", ".join(output_prefix_for(args.output_prefix, k, args.split_sentences)
                        for k in args.json_keys)
    print(f"{stats.documents:,} documents, {stats.tokens:,} tokens in {stats.seconds:.1f}s "
          f"({rate:,.0f} tokens/s, {args.workers} workers) -> {outputs}.bin/.idx", file=sys.stderr)


if __name__ == "__main__":
    main()
