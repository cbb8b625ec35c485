"""Train a sentencepiece tokenizer (BPE or unigram) from jsonl or plain-text files.

    python tools/train_tokenizer.py --input corpus.jsonl more.txt.gz --vocab-size 8192 \
        --output-prefix tok/spm

writes tok/spm.model and tok/spm.vocab. jsonl files (.jsonl, .json, .jsonl.gz) contribute the
text under --json-keys; other files contribute their lines. Special pieces: <pad>=0 <unk>=1 <s>=2
</s>=3 (end of document) and <cls> <sep> <mask> for masked-LM data.
"""
import argparse
import os
import sys
import tempfile
import time


from magneto_dist.data.jsonl import write_training_text
from magneto_dist.errors import MagnetoError
from magneto_dist.data.tokenizer import train_sentencepiece


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="jsonl or text files (.gz allowed)")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
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
        except (MagnetoError, FileNotFoundError) as err:
            sys.exit(f"error: {err}")
        text.flush()
        if lines == 0:
            sys.exit(f"error: no text in {', '.join(args.input)}")
        print(f"training a {args.model_type} model of {args.vocab_size} pieces on {lines:,} lines",
              file=sys.stderr, flush=True)
        try:
            model = train_sentencepiece(text.name, args.output_prefix, args.vocab_size,
                                        args.model_type)
        except RuntimeError as err:  # sentencepiece reports e.g. a vocab too large for the text
            sys.exit(f"error: sentencepiece: {err}")
    print(f"wrote {model} in {time.perf_counter() - start:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
