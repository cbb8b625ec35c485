"""Tokenizer, preprocessing into .bin/.idx, megatron-core datasets, sampler, bad input."""
import contextlib
import gzip
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from magneto_dist.launch_env import ROOT
from magneto_dist.data import checks
from magneto_dist.data import preprocess as preprocess_module
from magneto_dist.data.checks import DataError, check_token_ids, split_sizes
from magneto_dist.data.corpus import stdlib_sources
from magneto_dist.data.datasets import DatasetRequest, GlobalSampleBatches, build_datasets
from magneto_dist.data.jsonl import BadInputError
from magneto_dist.data.preprocess import WorkerDied, preprocess
from magneto_dist.data.tokenizer_types import sentencepiece_tokenizer


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Two small jsonl corpora from the stdlib, and a 1000-piece tokenizer trained by the CLI."""
    d = tmp_path_factory.mktemp("corpus")
    docs = [text[:3000] for _, text in stdlib_sources()][:240]
    a = write_jsonl(d / "a.jsonl", [{"text": t} for t in docs[:160]])
    b = write_jsonl(d / "b.jsonl", [{"text": t} for t in docs[160:]])
    subprocess.run([sys.executable, "tools/train_tokenizer.py", "--input", a, b, "--vocab-size",
                    "1000", "--output-prefix", str(d / "spm")], cwd=ROOT, check=True,
                   capture_output=True)
    return {"dir": d, "a": a, "b": b, "docs": docs, "model": str(d / "spm.model")}


@pytest.fixture(scope="session")
def indexed(corpus):
    out = corpus["dir"] / "idx"
    pa = preprocess([corpus["a"]], corpus["model"], str(out / "a"), append_eod=True,
                    progress=False)
    pb = preprocess([corpus["b"]], corpus["model"], str(out / "b"), append_eod=True,
                    progress=False)
    assert pa.documents == 160 and pb.documents == 80
    return str(out / "a_text_document"), str(out / "b_text_document")


def test_tokenizer_attributes_and_identity(corpus):
    tok = sentencepiece_tokenizer(corpus["model"])
    assert tok.vocab_size == 1000
    assert (tok.pad, tok.eod) == (0, 3) and tok.masked_lm_ids() == (4, 5, 6)
    text = corpus["docs"][0]
    assert tok.decode(tok.encode(text)) == text
    assert tok.unique_identifiers["sha256"] == tok.sha256 and len(tok.sha256) == 64
    assert tok.identity["eod_text"] == "</s>" and tok.identity["paths"] == {
        "tokenizer_model": corpus["model"]}


def test_round_trip_through_indexed_dataset(corpus, indexed):
    tok = sentencepiece_tokenizer(corpus["model"])
    ds = IndexedDataset(indexed[0])
    assert len(ds) == 160
    assert ds[0].dtype == np.uint16  # a 1000-piece vocab fits
    for i in (0, 1, 77, 159):
        assert ds[i].tolist() == tok.encode(corpus["docs"][i]) + [tok.eod]


def test_same_bytes_for_one_and_two_workers_with_gzip_and_several_inputs(corpus, tmp_path):
    gz = tmp_path / "b.jsonl.gz"
    with open(corpus["b"], "rb") as src, gzip.open(gz, "wb") as dst:
        dst.write(src.read())
    outputs = []
    for workers in (1, 2):
        prefix = str(tmp_path / f"w{workers}")
        stats = preprocess([corpus["a"], str(gz)], corpus["model"], prefix, workers=workers,
                           progress=False)
        assert stats.documents == 240
        outputs.append([open(f"{prefix}_text_document{e}", "rb").read() for e in (".bin", ".idx")])
    assert outputs[0] == outputs[1]
    assert len(outputs[0][0]) > 10_000


BAD_LINES = [
    (b'{"text": "fine"}\n{"text": "oops"\n', "bad.jsonl:2: malformed JSON"),
    (b'{"text": "fine"}\n\n{"body": "x"}\n', "bad.jsonl:3: missing key 'text'"),
    (b'{"text": 42}\n', "bad.jsonl:1: key 'text' holds int, not a string"),
    (b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', "bad.jsonl:2: invalid UTF-8"),
    (b'["text"]\n', "bad.jsonl:1: expected a JSON object"),
]


@pytest.mark.parametrize("content,message", BAD_LINES)
def test_bad_lines_name_file_and_line(corpus, tmp_path, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    with pytest.raises(BadInputError, match=message):
        preprocess([str(bad)], corpus["model"], str(tmp_path / "out"), progress=False)
    assert os.listdir(tmp_path) == ["bad.jsonl"]  # nothing half-written is left


def test_skip_bad_lines_counts_them_and_empty_input_is_an_error(corpus, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "one"}\n{"text": 1}\nnot json\n{"text": "two"}\n')
    stats = preprocess([str(bad)], corpus["model"], str(tmp_path / "out"), skip_bad_lines=True,
                       progress=False)
    assert stats.documents == 2 and len(stats.skipped_lines) == 2
    assert "bad.jsonl:3" in stats.skipped_lines[1]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(BadInputError, match="empty.jsonl: the input is empty"):
        preprocess([str(empty)], corpus["model"], str(tmp_path / "e"), progress=False)


def test_cli_reports_bad_line_and_exits_nonzero(corpus, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"txt": "x"}\n')
    proc = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(bad),
                           "--tokenizer-model", corpus["model"], "--output-prefix",
                           str(tmp_path / "o"), "--no-progress"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode != 0
    assert f"{bad}:2: missing key 'text'" in proc.stderr
    proc = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(bad),
                           "--tokenizer-model", corpus["model"], "--output-prefix",
                           str(tmp_path / "o"), "--skip-bad-lines", "--workers", "2"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 bad lines" in proc.stderr and "1 documents" in proc.stderr


def _request(prefixes, weights, tmp_path, **kw):
    base = dict(split="80,10,10", seq_len=32, seed=7, num_samples=(600, 60, 60),
                cache_dir=str(tmp_path / "cache"))
    base.update(kw)
    return DatasetRequest(prefixes, weights, **base)


def test_blend_weights_are_respected(corpus, indexed, tmp_path):
    tok = sentencepiece_tokenizer(corpus["model"])
    train, _, _ = build_datasets(_request(list(indexed), [0.25, 0.75], tmp_path), tok)
    counts = np.bincount(np.asarray(train.dataset_index[:600]), minlength=2)
    # The blend is deterministic (megatron-core's greedy scheduler), within a sample or two.
    assert abs(counts[0] / 600 - 0.25) < 0.01, counts


def test_splits_are_disjoint(corpus, indexed, tmp_path):
    tok = sentencepiece_tokenizer(corpus["model"])
    splits = build_datasets(_request([indexed[0]], None, tmp_path), tok)
    docs = [set(np.asarray(s.indices).tolist()) for s in splits]
    assert all(docs) and not (docs[0] & docs[1] or docs[0] & docs[2] or docs[1] & docs[2])
    assert len(docs[0] | docs[1] | docs[2]) == 160


def test_resume_from_sample_k_gives_the_same_stream(corpus, indexed, tmp_path):
    tok = sentencepiece_tokenizer(corpus["model"])
    req = _request(list(indexed), [0.5, 0.5], tmp_path)
    first = build_datasets(req, tok)[0]
    again = build_datasets(req, tok)[0]  # a restarted job: cache hit, same samples
    k, micro, dp = 48, 4, 2
    straight = [b for r in range(dp) for b in GlobalSampleBatches(600, 0, micro, r, dp)]
    resumed = [b for r in range(dp) for b in GlobalSampleBatches(600, k, micro, r, dp)]
    straight_tail = [b for b in straight if b[0] >= k]
    assert sorted(map(tuple, resumed)) == sorted(map(tuple, straight_tail))
    for batch in resumed[:5]:
        for i in batch:
            assert first[i]["tokens"].tolist() == again[i]["tokens"].tolist()
    # each global batch holds the same samples whatever the DP size
    one_rank = list(GlobalSampleBatches(600, 0, micro * dp, 0, 1))
    assert sorted(straight[0] + straight[len(straight) // 2]) == one_rank[0]


def test_other_local_ranks_wait_for_the_node_cache(corpus, indexed, tmp_path):
    tok = sentencepiece_tokenizer(corpus["model"])
    req = _request([indexed[0]], None, tmp_path, seed=11)
    with pytest.raises(TimeoutError, match="did local rank 0 of this node fail"):
        build_datasets(req, tok, local_rank=1, wait_timeout_s=0.5)
    built = build_datasets(req, tok, local_rank=0)[0]
    waited = build_datasets(req, tok, local_rank=1)[0]
    assert built[5]["tokens"].tolist() == waited[5]["tokens"].tolist()


def test_a_truncated_index_cache_is_named_and_rebuilt(corpus, indexed, tmp_path):
    """megatron-core wrote its index caches in place and trusted any file of the right name: a
    kill while it wrote *-shuffle_index.npy left it short, and every later run died with "mmap
    length is greater than file size", naming no file, with nothing rebuilt."""
    tok = sentencepiece_tokenizer(corpus["model"])
    req = _request([indexed[0]], None, tmp_path, seed=5)
    first = build_datasets(req, tok)[0]
    want = [first[i]["tokens"].tolist() for i in range(0, 600, 50)]
    cache = tmp_path / "cache"
    shuffle = next(cache.glob("*-GPTDataset-train-shuffle_index.npy"))
    size = shuffle.stat().st_size
    os.truncate(shuffle, size // 2)
    damage = f"{shuffle} has {size // 2:,} bytes where {size:,} were written"
    # another local rank does not load it: it waits for local rank 0 to build it again
    with pytest.raises(TimeoutError, match=re.escape(damage)):
        build_datasets(req, tok, local_rank=1, wait_timeout_s=0.5)
    logs = []
    again = build_datasets(req, tok, log=logs.append)[0]
    assert logs == [f"index cache: {damage}; building the caches again"]
    assert shuffle.stat().st_size == size
    assert [again[i]["tokens"].tolist() for i in range(0, 600, 50)] == want
    # killed before its record was written (or a record of an older version): not trusted
    for marker_text in (None, "ok\n"):
        marker = next(cache.glob("built-*.done"))
        marker.unlink() if marker_text is None else marker.write_text(marker_text)
        os.truncate(shuffle, size // 2)
        again = build_datasets(req, tok, log=logs.append)[0]
        assert [again[i]["tokens"].tolist() for i in range(0, 600, 50)] == want
    assert shuffle.stat().st_size == size and not list(cache.glob(".build-*"))
    assert build_datasets(req, tok, local_rank=1)[0][50]["tokens"].tolist() == want[1]


def test_missing_prefix_says_how_to_make_it(corpus, tmp_path):
    tok = sentencepiece_tokenizer(corpus["model"])
    with pytest.raises(DataError, match="nothing_text_document.bin/.idx not found"):
        build_datasets(_request([str(tmp_path / "nothing_text_document")], None, tmp_path), tok)


@contextlib.contextmanager
def fails_within(seconds):
    """Turn a hang (megatron-core's endless epoch loop is pure Python) into a test failure."""
    def hung(signum, frame):
        raise AssertionError(f"hung for more than {seconds}s")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_empty_split_is_refused_instead_of_hanging(corpus, indexed, tmp_path):
    """80 documents and the default split "969,30,1": the test split gets none, and megatron-core
    used to loop forever, printing nothing."""
    tok = sentencepiece_tokenizer(corpus["model"])
    with fails_within(60), pytest.raises(DataError, match=re.escape(
            "b_text_document: data.split='969,30,1' leaves the test split with no documents "
            "(80 in all; megatron-core would loop forever looking for samples); use e.g. "
            "data.split=78,1,1")):
        build_datasets(_request([indexed[1]], None, tmp_path, split="969,30,1"), tok)
    # the advice works, and a split of weight 0 is not asked for
    assert split_sizes(80, "78,1,1") == [78, 1, 1] and split_sizes(80, "9,1,0") == [72, 8, -1]
    with fails_within(60):
        train, valid, test = build_datasets(_request([indexed[1]], None, tmp_path, split="78,1,1",
                                                     num_samples=(50, 5, 5)), tok)
    assert len(train) >= 50 and len(valid) >= 5 and len(test) >= 5


def test_token_ids_beyond_the_vocabulary_are_found(corpus, indexed):
    """Data made with a 1000-piece tokenizer, checked against a 500-piece one."""
    data = IndexedDataset(indexed[0])  # held: its documents are views of its memory map
    largest = max(int(data[i].max()) for i in range(len(data)))
    assert "largest" in check_token_ids(indexed[0], 1000, "data.tokenizer_model=m")
    with pytest.raises(DataError, match=rf"a_text_document: token id {largest} is outside the "
                       r"vocabulary of data.tokenizer_model=x.model \(500 pieces\)"):
        check_token_ids(indexed[0], 500, "data.tokenizer_model=x.model")


def test_token_id_check_samples_a_large_file(corpus, indexed, monkeypatch):
    monkeypatch.setattr(checks, "FULL_SCAN_TOKENS", 1000)
    monkeypatch.setattr(checks, "CHUNK_TOKENS", 100)
    assert "(evenly spaced chunks)" in check_token_ids(indexed[0], 1000, "data.tokenizer_model=m")
    with pytest.raises(DataError, match="is outside the vocabulary"):
        check_token_ids(indexed[0], 200, "data.tokenizer_model=m")


def test_not_a_sentencepiece_model_is_named(tmp_path):
    bad = tmp_path / "tok.model"
    bad.write_text("not a model")
    with pytest.raises(ValueError, match=rf"tokenizer model {bad} is not a sentencepiece model"):
        sentencepiece_tokenizer(str(bad))


def _die_in_worker(chunk):
    os._exit(9)  # a worker killed mid-chunk (OOM killer, kill -9)


def test_a_dead_worker_is_an_error_not_a_hang(corpus, tmp_path, monkeypatch):
    """multiprocessing.Pool waited forever for the chunk a dead worker held."""
    monkeypatch.setattr(preprocess_module, "encode_chunk", _die_in_worker)
    with fails_within(60), pytest.raises(WorkerDied, match="a tokenizing worker died"):
        preprocess([corpus["a"]], corpus["model"], str(tmp_path / "out"), workers=2,
                   progress=False)
    assert os.listdir(tmp_path) == []  # nothing half-written
