"""Data of the local lm-evaluation-harness tasks: documents of the built-in corpus (the Python
standard library's sources) that a run held out of training.

A run splits the corpus's documents in order by data.split (megatron-core's rounding): the
documents after the training range (validation and test) are never trained on. Both tasks read
those; tools/evaluate.py passes the run's corpus and split as lm-eval metadata, and without them
(`lm_eval --include_path configs/eval ...`) the corpus is this Python's standard library with
the default split, as the default run sees it. Needs magneto_dist importable; no download.
"""
import json
import re

import datasets

from magneto_dist.config import DataConfig
from magneto_dist.data.checks import split_sizes
from magneto_dist.data.corpus import stdlib_sources

MAX_CHARS = 8000         # of each document: the perplexity task's cost is bounded
CLOZE_PER_DOCUMENT = 25  # next-word items per document, evenly spaced
CLOZE_CONTEXT = 600      # characters of context before the word (lm-eval truncates to the model)
# A word of 3+ characters after a single space that follows a non-space: the boundary sits at a
# space, so tokenizing context and continuation apart cuts no token in two.
CLOZE_WORD = re.compile(r"(?<=\S) ([A-Za-z_][A-Za-z0-9_]{2,})\b")


def heldout_documents(corpus_jsonl=None, split=None, max_chars=MAX_CHARS, **_):
    """The held-out documents' text, truncated to max_chars, in corpus order."""
    split = split or DataConfig().split
    if corpus_jsonl:
        with open(corpus_jsonl, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
    else:  # the built-in corpus's documents, as data/corpus.py writes them
        texts = [text for _, text in stdlib_sources() if text.strip()]
    trained = split_sizes(len(texts), split)[0]
    held_out = texts[trained:]
    if not held_out:
        raise ValueError(f"data.split={split!r} trains on all {len(texts)} documents of "
                         f"{corpus_jsonl or 'the built-in corpus'}: none is held out")
    return [text[:max_chars] for text in held_out]


def documents(**metadata):
    """custom_dataset of magneto_stdlib_ppl: {"text"} per held-out document."""
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict(
        {"text": heldout_documents(**metadata)})})


def cloze_items(**metadata):
    """custom_dataset of magneto_stdlib_cloze: {"context", "target"} where target is the next
    word (with its leading space) after up to CLOZE_CONTEXT characters of a held-out document."""
    contexts, targets = [], []
    for text in heldout_documents(**metadata):
        matches = [m for m in CLOZE_WORD.finditer(text) if m.start() >= CLOZE_CONTEXT // 4]
        step = max(1, len(matches) // CLOZE_PER_DOCUMENT)
        for match in matches[::step][:CLOZE_PER_DOCUMENT]:
            contexts.append(text[max(0, match.start() - CLOZE_CONTEXT):match.start()])
            targets.append(match.group(0))
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict(
        {"context": contexts, "target": targets})})


def perplexity_results(doc, results):
    """Per document: (log-likelihood, words) and (log-likelihood, bytes), as lm-eval's wikitext."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"]))
    size = len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, size),
            "bits_per_byte": (loglikelihood, size)}
