"""Data: sentencepiece tokenizer, jsonl -> .bin/.idx preprocessing, megatron-core datasets,
and the built-in corpus. Import submodules directly; this package imports nothing heavy so that
preprocessing workers start fast."""
