"""Train a tokenizer: sentencepiece (BPE or unigram; the default) or, with --library hf, a
byte-level BPE (GPT-2's kind) with the Hugging Face `tokenizers` library.

    python tools/train_tokenizer.py --input corpus.jsonl more.txt.gz --vocab-size 8192 \
        --output-prefix tok/spm
    python tools/train_tokenizer.py --library hf --input 'shards/*.parquet' --vocab-size 32000 \
        --output-prefix tok/bpe

sentencepiece writes tok/spm.model and tok/spm.vocab, with <pad>=0 <unk>=1 <s>=2 </s>=3 (end of
document) and <cls> <sep> <mask> for masked-LM data. --library hf writes the directory tok/bpe:
tokenizer.json and tokenizer_config.json (transformers' AutoTokenizer loads it:
HuggingFaceTokenizer) and vocab.json + merges.txt of the same BPE (GPT2BPETokenizer); its end of
document is <|endoftext|> (id 0), and --masked-lm-tokens adds [CLS] [SEP] [MASK] [PAD].
--input takes what tools/preprocess_data.py takes (jsonl, parquet and datasets directories give
the text under --json-keys); any other file contributes its lines.
"""
import argparse
import os
import sys
import tempfile
import time

from magneto_dist.data.sources import write_training_text
from magneto_dist.data.tokenizer_training import train_byte_level_bpe, train_sentencepiece
from magneto_dist.errors import MagnetoError


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files, globs or directories")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output-prefix", required=True,
                   help="sentencepiece: PREFIX.model; hf: the directory PREFIX")
    p.add_argument("--library", choices=["sentencepiece", "hf"], default="sentencepiece")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe",
                   help="sentencepiece only")
    p.add_argument("--masked-lm-tokens", action="store_true",
                   help="hf only: add [CLS] [SEP] [MASK] [PAD] (sentencepiece models have them)")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--max-lines", type=int, default=5_000_000,
                   help="stop reading after this many lines (sentencepiece samples anyway)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as text:
        try:
            lines = write_training_text(
                args.input, args.json_keys, text, args.max_lines,
                log=lambda m: print(m, file=sys.stderr, flush=True))
        except MagnetoError as err:
            print(f"{err.label}: {err}", file=sys.stderr)
            sys.exit(err.exit_code)
        text.flush()
        if lines == 0:
            sys.exit(f"error: no text in {', '.join(args.input)}")
        print(f"training a {args.library} tokenizer of {args.vocab_size} tokens on {lines:,} "
              "lines", file=sys.stderr, flush=True)
        if args.library == "hf":
            with open(text.name, encoding="utf-8") as f:
                out = train_byte_level_bpe(f, args.output_prefix, args.vocab_size,
                                           args.masked_lm_tokens)
        else:
            try:
                out = train_sentencepiece(text.name, args.output_prefix, args.vocab_size,
                                          args.model_type)
            except RuntimeError as err:  # sentencepiece reports e.g. a vocab too large
                sys.exit(f"error: sentencepiece: {err}")
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
