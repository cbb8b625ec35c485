"""data/hf_tokenizer.py: tokenizer files that AutoTokenizer loads and that give the run's ids
exactly, for the project's own sentencepiece models and other sentencepiece options, a copy of a
Hugging Face tokenizer directory, and refusals of what cannot be converted."""
import os

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from magneto_dist.data import hf_tokenizer
from magneto_dist.data.tokenizer import TokenizerSpec
from magneto_dist.data.tokenizer_types import build_tokenizer
from magneto_dist.data.tokenizer_training import train_byte_level_bpe
from magneto_dist.errors import CheckpointError

from tests.hf_fixtures import VOCAB, other_tokenizer, project_tokenizer

# Where conversions usually slip: the dummy prefix before a user-defined piece, control pieces
# typed as text (sentencepiece never produces them from text), repeated whitespace, bytes.
EDGES = ["<mask>", "a<sep>b <cls>x", "</s> <s> <pad>", "x   y\t\tz\n\n", "\U0001f916\u00e9"]
SAMPLE_TEXT = "def f(x):\n    return x + 1  # a comment\nclass Thing:\n    pass\n"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return project_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def written(model_file, directory):
    """The export's tokenizer files for a tokenizer named as --tokenizer names it."""
    os.makedirs(directory)
    tokenizer = hf_tokenizer.tokenizer_of_path(model_file)
    special = hf_tokenizer.write_hf_tokenizer(tokenizer, str(directory), 64)
    return special, AutoTokenizer.from_pretrained(str(directory))


def test_the_projects_tokenizer_converts_exactly(tmp_path, model_file):
    special, tokenizer = written(model_file, tmp_path / "hf")
    assert sorted(os.listdir(tmp_path / "hf")) == ["tokenizer.json", "tokenizer_config.json"]
    sp = spm.SentencePieceProcessor(model_file=model_file)
    # eod (</s>) begins a text as it separates documents in training; <pad> pads
    assert special == {"bos": sp.eos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(),
                       "unk": sp.unk_id()}
    assert tokenizer.model_max_length == 64 and len(tokenizer) == VOCAB
    for text in EDGES:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(text), text
        assert tokenizer.decode(ids) == sp.decode(ids)


@pytest.mark.parametrize("name,options", [
    ("no_byte_fallback", dict(model_type="bpe", byte_fallback=False)),
    ("nfkc_and_whitespace_removal", dict(model_type="bpe", normalization_rule_name="nmt_nfkc",
                                         remove_extra_whitespaces=True)),
    ("no_dummy_prefix", dict(model_type="bpe", add_dummy_prefix=False)),
])
def test_other_sentencepiece_options_convert_exactly(tmp_path, name, options):
    """Each passes write_hf_tokenizer's own comparison on the default samples, and the edges."""
    model_file = other_tokenizer(tmp_path, name, **options)
    _, tokenizer = written(model_file, tmp_path / "hf")
    sp = spm.SentencePieceProcessor(model_file=model_file)
    for text in EDGES:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text


def test_a_unigram_model_is_refused_not_approximated(tmp_path):
    model_file = other_tokenizer(tmp_path, "unigram", model_type="unigram")
    with pytest.raises(CheckpointError, match="its Hugging Face conversion gives other ids on "
                       ".*refusing to export a tokenizer that changes the ids"):
        written(model_file, tmp_path / "hf")


def test_a_hugging_face_tokenizer_directory_is_copied_and_checked(tmp_path, model_file):
    written(model_file, tmp_path / "source")
    special, tokenizer = written(str(tmp_path / "source"), tmp_path / "copy")
    assert (tmp_path / "copy" / "tokenizer.json").read_bytes() == (
        tmp_path / "source" / "tokenizer.json").read_bytes()
    sp = spm.SentencePieceProcessor(model_file=model_file)
    assert special["eos"] == sp.eos_id()
    assert tokenizer("def f(x):", add_special_tokens=False)["input_ids"] == sp.encode("def f(x):")
    os.remove(tmp_path / "source" / "tokenizer.json")
    with pytest.raises(CheckpointError, match="transformers cannot load it as a tokenizer "
                                              "directory"):
        written(str(tmp_path / "source"), tmp_path / "again")


def test_a_gpt2_bpe_tokenizer_exports_as_its_hugging_face_form(tmp_path):
    """vocab.json + merges.txt (Megatron's GPT2BPETokenizer) give the same ids through the
    export's tokenizer files."""
    bpe = train_byte_level_bpe([SAMPLE_TEXT] * 20, str(tmp_path / "bpe"), vocab_size=300)
    run = build_tokenizer(TokenizerSpec("GPT2BPETokenizer",
                                        vocab_file=os.path.join(bpe, "vocab.json"),
                                        merge_file=os.path.join(bpe, "merges.txt")))
    os.makedirs(tmp_path / "hf")
    special = hf_tokenizer.write_hf_tokenizer(run, str(tmp_path / "hf"), 64)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert special["eos"] == run.eod
    for text in EDGES + [SAMPLE_TEXT]:
        assert loaded(text, add_special_tokens=False)["input_ids"] == run.encode(text), text


def test_unreadable_tokenizers_and_types_without_a_hugging_face_form_are_refused(tmp_path):
    not_a_model = tmp_path / "x.model"
    not_a_model.write_bytes(b"not a sentencepiece model")
    with pytest.raises(CheckpointError, match="x.model is not a sentencepiece model"):
        written(str(not_a_model), tmp_path / "a")
    null = build_tokenizer(TokenizerSpec("NullTokenizer", vocab_size=100))
    with pytest.raises(CheckpointError, match="a NullTokenizer has no Hugging Face form here"):
        hf_tokenizer.write_hf_tokenizer(null, str(tmp_path), 64)
