"""Every tokenizer type through the one layer: ids byte-identical to Megatron-LM's preprocessing,
the end-of-document rules, masked-LM tokens, identities, and the run directory's copy."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from magneto_dist.launch_env import ROOT
from magneto_dist.data.datasets import DatasetRequest, build_datasets
from magneto_dist.data.preprocess import preprocess
from magneto_dist.data.run_tokenizer import (check_resume_tokenizer, copied_tokenizer,
                                             save_run_tokenizer)
from magneto_dist.config import TOKENIZER_TYPES
from magneto_dist.data.tokenizer import TokenizerSpec
from magneto_dist.data.tokenizer_types import TOKENIZER_CLASSES, build_tokenizer
from magneto_dist.errors import CheckpointError, DataError

from .tokenizer_files import (EDGE_DOCS, empty_documents, make_tokenizers, megatron_preprocess,
                              megatron_tokenizer, read_bytes, stdlib_docs, write_jsonl)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("toks")
    docs = stdlib_docs(120) + EDGE_DOCS
    paths = make_tokenizers(d, stdlib_docs(60))
    return {**paths, "dir": d, "docs": docs, "jsonl": write_jsonl(d / "docs.jsonl", docs)}


def test_every_tokenizer_type_the_config_accepts_has_a_class():
    assert list(TOKENIZER_CLASSES) == list(TOKENIZER_TYPES)


def spec_and_reference(toks, kind):
    """Our spec of a tokenizer type and megatron-core's own tokenizer of the same files (for
    GPT2BPETokenizer, whose megatron-core path needs the Hub: its tokenizer.json twin)."""
    if kind == "SentencePieceTokenizer":
        return (TokenizerSpec(model=toks["spm"]),
                megatron_tokenizer(kind, tokenizer_model=toks["spm"]))
    if kind == "HuggingFaceTokenizer":
        return (TokenizerSpec(model=toks["bpe"]),
                megatron_tokenizer(kind, tokenizer_model=toks["bpe"]))
    if kind == "GPT2BPETokenizer":
        return (TokenizerSpec(vocab_file=toks["vocab"], merge_file=toks["merges"]),
                megatron_tokenizer("HuggingFaceTokenizer", tokenizer_model=toks["bpe"]))
    return (TokenizerSpec(kind, toks["tiktoken"]),
            megatron_tokenizer(kind, tokenizer_model=toks["tiktoken"],
                               vocab_size=build_tokenizer(TokenizerSpec(
                                   kind, toks["tiktoken"])).vocab_size))


@pytest.mark.parametrize("kind", ["SentencePieceTokenizer", "HuggingFaceTokenizer",
                                  "GPT2BPETokenizer", "TikTokenizer"])
def test_bin_idx_are_byte_identical_to_megatron_for_any_worker_count(toks, tmp_path, kind):
    spec, reference = spec_and_reference(toks, kind)
    megatron = megatron_preprocess(toks["jsonl"], reference, str(tmp_path / "megatron"))
    want = read_bytes(megatron + "_text_document")
    tokenizer = build_tokenizer(spec)
    assert (tokenizer.spec.type, tokenizer.vocab_size, tokenizer.eod) == (
        kind, reference.vocab_size, reference.eod)
    for workers in (1, 2):
        prefix = str(tmp_path / f"ours{workers}")
        stats = preprocess([toks["jsonl"]], tokenizer, prefix, workers=workers,
                           append_eod=True, progress=False)
        assert read_bytes(prefix + "_text_document") == want, (kind, workers)
    empty = empty_documents(megatron + "_text_document")
    assert stats.documents == len(toks["docs"]) and stats.empty_documents == empty >= 1
    assert len(want[0]) > 20_000


def test_null_tokenizer_reads_ids_like_megatron(tmp_path):
    docs = ["1 2 3", "99 0 7 7", "5", "100 3"]  # Megatron's NullTokenizer fails on ""
    jsonl = write_jsonl(tmp_path / "ids.jsonl", docs)
    want = read_bytes(megatron_preprocess(jsonl, megatron_tokenizer("NullTokenizer",
                                                                    vocab_size=100),
                                          str(tmp_path / "megatron")) + "_text_document")
    tok = build_tokenizer(TokenizerSpec("NullTokenizer", vocab_size=100))
    assert (tok.vocab_size, tok.eod) == (101, 100)
    preprocess([jsonl], tok, str(tmp_path / "ours"), workers=2, append_eod=True, progress=False)
    assert read_bytes(str(tmp_path / "ours_text_document")) == want
    assert tok.encode("") == [] and tok.decode([1, 2, 100]) == "1 2 100"
    bad = write_jsonl(tmp_path / "bad.jsonl", ["1 2", "3 x 4"])
    with pytest.raises(DataError, match=r"bad.jsonl:2: a NullTokenizer reads token ids separated "
                       r"by single spaces, not '3 x 4'"):
        preprocess([bad], tok, str(tmp_path / "bad"), workers=2, progress=False)
    big = write_jsonl(tmp_path / "big.jsonl", ["1 101"])
    with pytest.raises(DataError, match=r"big.jsonl:1: token id 101 is outside 0..100"):
        preprocess([big], tok, str(tmp_path / "big"), progress=False)
    with pytest.raises(DataError, match=r"a NullTokenizer needs data.vocab_size \(--vocab-size\)"):
        build_tokenizer(TokenizerSpec("NullTokenizer"))


def test_types_are_told_by_their_files(toks, tmp_path):
    told = {path: build_tokenizer(TokenizerSpec(model=path)).spec.type
            for path in (toks["spm"], toks["bpe"], os.path.join(toks["bpe"], "tokenizer.json"),
                         toks["tiktoken"])}
    assert list(told.values()) == ["SentencePieceTokenizer", "HuggingFaceTokenizer",
                                   "HuggingFaceTokenizer", "TikTokenizer"]
    # megatron-core's tokenizer_metadata.json convention names the library
    odd = tmp_path / "odd"
    odd.mkdir()
    shutil.copy(toks["spm"], odd / "tok.bin")
    (odd / "tokenizer_metadata.json").write_text(json.dumps({"library": "sentencepiece"}))
    assert build_tokenizer(TokenizerSpec(model=str(odd / "tok.bin"))).spec.type == (
        "SentencePieceTokenizer")
    (tmp_path / "what.txt").write_text("?")
    with pytest.raises(DataError, match=r"cannot tell which tokenizer .*what.txt is; set "
                       r"data.tokenizer_type \(--tokenizer-type\) to one of "
                       r"SentencePieceTokenizer, HuggingFaceTokenizer"):
        build_tokenizer(TokenizerSpec(model=str(tmp_path / "what.txt")))
    with pytest.raises(DataError, match=r"tokenizer model .*/nothing does not exist"):
        build_tokenizer(TokenizerSpec(model=str(tmp_path / "nothing")))
    with pytest.raises(DataError, match=r"a GPT2BPETokenizer needs data.merge_file"):
        build_tokenizer(TokenizerSpec("GPT2BPETokenizer", vocab_file=toks["vocab"]))


def test_a_tokenizer_without_an_end_of_document_is_refused_until_one_is_named(toks, tmp_path):
    no_eos = tmp_path / "no_eos"
    shutil.copytree(toks["bpe"], no_eos)
    config = json.loads((no_eos / "tokenizer_config.json").read_text())
    del config["eos_token"]
    (no_eos / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match=r"tokenizer HuggingFaceTokenizer .*no_eos has no "
                       r"end-of-document token; name one with data.eod_token \(--eod-token\)"):
        build_tokenizer(TokenizerSpec(model=str(no_eos)))
    named = build_tokenizer(TokenizerSpec(model=str(no_eos), eod_token="<|endoftext|>"))
    assert (named.eod, named.eod_text) == (0, "<|endoftext|>")
    assert named.sha256 != build_tokenizer(TokenizerSpec(model=str(no_eos),
                                                         eod_token="e")).sha256
    with pytest.raises(DataError, match=r"data.eod_token \(--eod-token\)='<eot>' is not a token"):
        build_tokenizer(TokenizerSpec(model=str(no_eos), eod_token="<eot>"))
    # GPT-2 files without <|endoftext|>: transformers would append it as a new id, silently
    vocab = json.loads(open(toks["vocab"]).read())
    del vocab["<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(DataError, match=r"vocab.json has no <\|endoftext\|> token; name the "
                       r"end-of-document token with data.eod_token"):
        build_tokenizer(TokenizerSpec(vocab_file=str(tmp_path / "vocab.json"),
                                      merge_file=toks["merges"]))


def test_masked_lm_needs_cls_sep_and_mask(toks, tmp_path):
    with pytest.raises(DataError, match=r"tokenizer HuggingFaceTokenizer .*bpe has no mask token; "
                       r"masked-LM data needs cls, sep and mask tokens"):
        build_tokenizer(TokenizerSpec(model=toks["bpe"])).masked_lm_ids()
    with pytest.raises(DataError, match=r"NullTokenizer .* has no cls, sep, mask tokens"):
        build_tokenizer(TokenizerSpec("NullTokenizer", vocab_size=9)).masked_lm_ids()
    tok = build_tokenizer(TokenizerSpec(model=toks["bpe_mlm"]))
    cls, sep, mask = tok.masked_lm_ids()
    assert len({cls, sep, mask, tok.eod, tok.pad}) == 5
    # BERT samples from paragraphs tokenized by the Hugging Face tokenizer
    text = ["\n\n".join(d.split("\n")[:12]) for d in stdlib_docs(60)]
    jsonl = write_jsonl(tmp_path / "p.jsonl", text)
    preprocess([jsonl], tok, str(tmp_path / "mlm"), split_sentences=True, progress=False)
    req = DatasetRequest([str(tmp_path / "mlm_text_sentence")], None, "90,5,5", 64, 1,
                         (20, 2, 2), str(tmp_path / "cache"), masked_lm=True)
    train = build_datasets(req, tok, log=lambda m: None)[0]
    samples = [train[i] for i in range(20)]
    assert all(s["text"][0] == cls and sep in s["text"] for s in samples)
    assert any(mask in s["text"] for s in samples)
    assert sum(int(s["loss_mask"].sum()) for s in samples) > 20


def test_identity_follows_contents_not_paths(toks, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(toks["bpe"], moved)
    (moved / "model.safetensors").write_bytes(b"weights are not tokenizer files")
    a = build_tokenizer(TokenizerSpec(model=toks["bpe"]))
    b = build_tokenizer(TokenizerSpec(model=str(moved)))
    assert a.sha256 == b.sha256 and a.unique_identifiers == b.unique_identifiers
    assert a.identity["paths"] == {"tokenizer_model": toks["bpe"]}
    assert set(a.identity["file_sha256"]) == {"tokenizer_model/" + n for n in (
        "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")}
    gpt2 = build_tokenizer(TokenizerSpec(vocab_file=toks["vocab"], merge_file=toks["merges"]))
    assert gpt2.sha256 != a.sha256  # another type, other files
    (moved / "tokenizer_config.json").write_text(
        (moved / "tokenizer_config.json").read_text().replace("1073741824", "2048"))
    assert build_tokenizer(TokenizerSpec(model=str(moved))).sha256 != a.sha256
    assert a.describe() == (f"tokenizer: HuggingFaceTokenizer {toks['bpe']} (vocabulary "
                            f"{a.vocab_size}, eod 0 '<|endoftext|>')")


def test_run_directory_keeps_the_tokenizer_and_refuses_another(toks, tmp_path):
    run = str(tmp_path / "run")
    os.makedirs(run)
    gpt2 = build_tokenizer(TokenizerSpec(vocab_file=toks["vocab"], merge_file=toks["merges"]))
    check_resume_tokenizer(run, gpt2)  # nothing recorded yet
    save_run_tokenizer(run, gpt2)
    check_resume_tokenizer(run, gpt2)
    copy = copied_tokenizer(run)
    text = "def f(x):\n    return x <|endoftext|>"
    assert copy.sha256 == gpt2.sha256 and copy.encode(text) == gpt2.encode(text)
    assert copy.paths()["vocab_file"] == os.path.join(run, "tokenizer", "vocab_file",
                                                      "vocab.json")
    spm = build_tokenizer(TokenizerSpec(model=toks["spm"]))
    with pytest.raises(CheckpointError, match=(
            rf"run {run} was trained with tokenizer GPT2BPETokenizer {toks['vocab']} \+ "
            rf"{toks['merges']} \(vocabulary 500, eod 0, sha256 {gpt2.sha256[:12]}\), and this "
            rf"run's tokenizer is SentencePieceTokenizer {toks['spm']} \(vocabulary 400, eod 3, "
            rf"sha256 {spm.sha256[:12]}\); resume with the same tokenizer")):
        check_resume_tokenizer(run, spm)
    save_run_tokenizer(run, spm)  # a fresh run in the directory records its own
    assert copied_tokenizer(run).spec.type == "SentencePieceTokenizer"
    # megatron-core loads the copy by its tokenizer_metadata.json
    from megatron.core.tokenizers import MegatronTokenizer
    loaded = MegatronTokenizer.from_pretrained(copied_tokenizer(run).spec.model)
    assert loaded.tokenize(text) == spm.encode(text)
    with open(copied_tokenizer(run).spec.model, "ab") as f:
        f.write(b"\0")
    with pytest.raises(CheckpointError, match=rf"the run's tokenizer copy {run}/tokenizer/"
                       rf"tokenizer_model/spm.model is missing or differs from its record "
                       rf"{run}/tokenizer/identity.json; restore it \(the original was "
                       rf"{toks['spm']}\)"):
        copied_tokenizer(run)


def test_train_tokenizer_hf_makes_a_directory_autotokenizer_loads(toks, tmp_path):
    from transformers import AutoTokenizer
    proc = subprocess.run([sys.executable, "tools/train_tokenizer.py", "--library", "hf",
                           "--input", toks["jsonl"], "--vocab-size", "300", "--output-prefix",
                           str(tmp_path / "tok")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    ours = build_tokenizer(TokenizerSpec(model=str(tmp_path / "tok")))
    text = toks["docs"][3]
    assert auto(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert (ours.eod, ours.eod_text, ours.vocab_size) == (0, "<|endoftext|>", 300)
    assert ours.decode(ours.encode(text)) == text
