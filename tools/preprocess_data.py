"""Tokenize a corpus into the Megatron indexed format (.bin/.idx), in parallel.

Megatron-LM's flag names, so a Megatron-LM command works unchanged:

    python tools/preprocess_data.py --input data.jsonl --output-prefix out/corpus \
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json \
        --merge-file gpt2-merges.txt --append-eod --workers 8

--input takes files, globs and directories of .jsonl/.json (plain, .gz, .zst), .parquet (the
column named by --json-keys) and Hugging Face `datasets` directories (save_to_disk). The
tokenizer: --tokenizer-model TOK.model (sentencepiece), --tokenizer-model DIR (a directory with
tokenizer.json), --vocab-file + --merge-file (GPT-2 BPE), --tokenizer-model VOCAB.json
--tokenizer-type TikTokenizer, or --tokenizer-type NullTokenizer --vocab-size N (documents of
space-separated ids); --tokenizer-type may be left out where the files tell.

Writes out/corpus_text_document.bin/.idx (out/corpus_text_sentence.* with --split-sentences),
byte-identical to Megatron-LM's tools/preprocess_data.py with the same tokenizer, for any
--workers; they appear only once complete. A bad line stops the run naming FILE:LINE (a table
row: FILE:row N), unless --skip-bad-lines; exit 2 on bad input or settings, nothing written.
"""
import argparse
import sys

from magneto_dist.data.preprocess import WorkerDied, output_prefix_for, preprocess
from magneto_dist.data.tokenizer import TokenizerSpec
from magneto_dist.data.tokenizer_types import build_tokenizer
from magneto_dist.errors import ExitCode, MagnetoError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files, globs or directories")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys (parquet: columns)")
    p.add_argument("--output-prefix", required=True)
    t = p.add_argument_group("tokenizer (Megatron-LM's flags)")
    t.add_argument("--tokenizer-type", help="SentencePieceTokenizer, HuggingFaceTokenizer, "
                   "GPT2BPETokenizer, TikTokenizer or NullTokenizer (default: told by the files)")
    t.add_argument("--tokenizer-model", help=".model file, tokenizer directory or tiktoken .json")
    t.add_argument("--vocab-file", help="GPT2BPETokenizer: vocab.json")
    t.add_argument("--merge-file", help="GPT2BPETokenizer: merges.txt")
    t.add_argument("--vocab-size", type=int, help="NullTokenizer: ids are 0..N (N: end of "
                   "document); TikTokenizer: cut the vocabulary to N")
    t.add_argument("--tiktoken-pattern", default="v2", choices=["v1", "v2"])
    t.add_argument("--tiktoken-num-special-tokens", type=int, default=1000)
    t.add_argument("--eod-token", help="end-of-document token text, for a tokenizer without one "
                   "(or with several end tokens)")
    p.add_argument("--append-eod", action="store_true", help="end every document with eod")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--split-sentences", action="store_true",
                   help="store blank-line separated paragraphs as sentences (masked-LM data)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip unusable lines and report how many, instead of stopping")
    p.add_argument("--no-progress", action="store_true")
    compat = p.add_argument_group("accepted for Megatron-LM commands; no effect here (the "
                                  "workers already split the input, in order)")
    compat.add_argument("--partitions", type=int, default=1)
    compat.add_argument("--keep-sequential-samples", action="store_true")
    compat.add_argument("--log-interval", type=int, default=1000)
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers={args.workers} must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    spec = TokenizerSpec(args.tokenizer_type, args.tokenizer_model, args.vocab_file,
                         args.merge_file, args.eod_token, args.vocab_size, args.tiktoken_pattern,
                         args.tiktoken_num_special_tokens)
    try:
        tokenizer = build_tokenizer(spec)
        print(tokenizer.describe(), file=sys.stderr, flush=True)
        stats = preprocess(args.input, tokenizer, args.output_prefix, args.json_keys,
                           workers=args.workers, append_eod=args.append_eod,
                           split_sentences=args.split_sentences,
                           skip_bad_lines=args.skip_bad_lines, progress=not args.no_progress)
    except MagnetoError as err:
        print(f"{err.label}: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except WorkerDied as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(ExitCode.FAILED)
    for line in stats.skipped_lines[:10]:
        print(f"skipped {line}", file=sys.stderr)
    if stats.skipped_lines:
        print(f"skipped {len(stats.skipped_lines)} bad lines", file=sys.stderr)
    rate = stats.tokens / max(stats.seconds, 1e-9)
    outputs = ", ".join(output_prefix_for(args.output_prefix, k, args.split_sentences)
                        for k in args.json_keys)
    empty = f" ({stats.empty_documents:,} empty)" if stats.empty_documents else ""
    workers = f"{args.workers} worker{'s' * (args.workers > 1)}"
    print(f"{stats.documents:,} documents{empty}, {stats.tokens:,} tokens in "
          f"{stats.seconds:.1f}s ({rate:,.0f} tokens/s, {workers}) -> {outputs}.bin/.idx",
          file=sys.stderr)


if __name__ == "__main__":
    main()
