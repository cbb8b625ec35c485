"""Corpora in every container give the same bytes; damaged inputs and unusable output places are
one clear line naming the path, exit 2, nothing written."""
import gzip
import importlib.util
import json
import os
import shutil
import stat
import tempfile

import pytest

from magneto_dist.launch_env import ROOT
from magneto_dist.data.jsonl import BadInputError
from magneto_dist.data.preprocess import preprocess
from magneto_dist.data.tokenizer import TokenizerSpec
from magneto_dist.data.tokenizer_types import build_tokenizer
from magneto_dist.data.tokenizer_training import train_byte_level_bpe
from magneto_dist.errors import ConfigError, ExitCode

from .tokenizer_files import read_bytes, stdlib_docs, write_jsonl

DOCS = stdlib_docs(90, 1500) + ["", "   ", "a <|endoftext|> b", "naïve 東京 🙂", "x\r\ny"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return build_tokenizer(TokenizerSpec(model=train_byte_level_bpe(stdlib_docs(40), str(d / "bpe"),
                                                                    400)))


def zstd_frames(data: bytes, frames: int) -> bytes:
    import zstandard
    step = len(data) // frames + 1
    return b"".join(zstandard.ZstdCompressor().compress(data[i:i + step])
                    for i in range(0, len(data), step))


def write_containers(d, docs):
    """The same documents as jsonl, .jsonl.gz, .jsonl.zst (several frames), parquet (several
    row groups), a datasets directory, and jsonl shards in a directory."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    jsonl = write_jsonl(d / "all.jsonl", docs)
    raw = open(jsonl, "rb").read()
    (d / "all.jsonl.gz").write_bytes(gzip.compress(raw))
    (d / "all.jsonl.zst").write_bytes(zstd_frames(raw, 3))
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), d / "all.parquet",
                   row_group_size=16)
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(d / "hf"))
    shards = d / "shards"
    shards.mkdir()
    write_jsonl(shards / "part-000.jsonl", docs[:40])
    (shards / "part-001.jsonl.gz").write_bytes(gzip.compress(
        open(write_jsonl(d / "mid.jsonl", docs[40:70]), "rb").read()))
    (shards / "notes.txt").write_text("not an input: not read")
    sub = shards / "part-002"
    sub.mkdir()
    pq.write_table(pa.table({"text": docs[70:]}), sub / "rest.parquet")
    return {"jsonl": [jsonl], "gz": [str(d / "all.jsonl.gz")], "zst": [str(d / "all.jsonl.zst")],
            "parquet": [str(d / "all.parquet")], "datasets": [str(d / "hf")],
            "directory": [str(shards)], "glob": [str(shards / "part-00[01]*"),
                                                 str(sub / "*.parquet")]}


def test_the_same_documents_give_the_same_bytes_in_every_container(tok, tmp_path):
    inputs = write_containers(tmp_path, DOCS)
    outputs = {}
    for form, paths in inputs.items():
        for workers in (1, 2):
            prefix = str(tmp_path / f"{form}{workers}")
            stats = preprocess(paths, tok, prefix, workers=workers, append_eod=True,
                               progress=False)
            assert stats.documents == len(DOCS), form
            outputs[form, workers] = read_bytes(prefix + "_text_document")
    assert all(out == outputs["jsonl", 1] for out in outputs.values()), [
        k for k, out in outputs.items() if out != outputs["jsonl", 1]]
    assert stats.empty_documents == 1 and len(outputs["jsonl", 1][0]) > 30_000


def test_bad_tables_are_named(tok, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    out = str(tmp_path / "out" / "x")
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "nokey.parquet")
    pq.write_table(pa.table({"text": ["a", "b", None, "d"]}), tmp_path / "null.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(
        str(tmp_path / "dd"))
    cases = [("nokey.parquet", r"nokey.parquet: no column 'text' \(columns: body\); choose "
                               r"columns with --json-keys"),
             ("null.parquet", r"null.parquet:row 2: key 'text' holds null, not a string"),
             ("ints.parquet", r"ints.parquet:row 0: key 'text' holds int, not a string"),
             ("junk.parquet", r"junk.parquet: not a readable parquet file"),
             ("dd", r"dd is a DatasetDict with splits train; name one split directory, e\.g\. "
                    r"--input .*dd/train"),
             ("*.nothing", r"input .*\*\.nothing matches no file"),
             ("missing.jsonl", r"input file .*missing.jsonl does not exist")]
    for name, message in cases:
        with pytest.raises(BadInputError, match=message):
            preprocess([str(tmp_path / name)], tok, out, workers=2, progress=False)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(BadInputError, match=r"input directory .*empty_dir holds no input"):
        preprocess([str(tmp_path / "empty_dir")], tok, out, progress=False)
    assert not os.path.exists(tmp_path / "out") or os.listdir(tmp_path / "out") == []


def test_truncated_compressed_files_are_named_not_tracebacks(tok, tmp_path):
    """A truncated .jsonl.gz raised a raw EOFError; a truncated .zst frame would end the
    input quietly (zstandard's stream_reader), losing the rest of the file."""
    raw = open(write_jsonl(tmp_path / "docs.jsonl", DOCS), "rb").read()
    gz, zst = gzip.compress(raw), zstd_frames(raw, 1)
    (tmp_path / "cut.jsonl.gz").write_bytes(gz[:len(gz) // 2])
    (tmp_path / "cut.jsonl.zst").write_bytes(zst[:len(zst) // 2])
    (tmp_path / "fake.jsonl.gz").write_bytes(raw)
    for name, what in (("cut.jsonl.gz", "truncated or not a valid gz file"),
                       ("cut.jsonl.zst", "truncated or not a valid zst file"),
                       ("fake.jsonl.gz", r"not a valid gz file \(Not a gzipped file")):
        with pytest.raises(BadInputError, match=rf"{name}:\d+: .*{what}"):
            preprocess([str(tmp_path / name)], tok, str(tmp_path / "out"), workers=2,
                       progress=False)
    assert sorted(os.listdir(tmp_path)) == ["cut.jsonl.gz", "cut.jsonl.zst", "docs.jsonl",
                                            "fake.jsonl.gz"]


def preprocess_cli(argv, capsys):
    """tools/preprocess_data.py's main in this process -> (exit code, stderr)."""
    spec = importlib.util.spec_from_file_location("preprocess_cli",
                                                  os.path.join(ROOT, "tools/preprocess_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_cli_exit_2_with_one_line_for_bad_input_and_bad_output_places(tok, tmp_path, capsys):
    """Each was a traceback: EOFError (truncated .jsonl.gz) and FileExistsError (an output
    prefix under a regular file)."""
    raw = open(write_jsonl(tmp_path / "docs.jsonl", DOCS), "rb").read()
    gz = gzip.compress(raw)
    (tmp_path / "cut.jsonl.gz").write_bytes(gz[:len(gz) // 2])
    (tmp_path / "a_file").write_text("")
    common = ["--tokenizer-model", tok.spec.model, "--no-progress", "--workers", "2"]
    code, err = preprocess_cli(["--input", str(tmp_path / "cut.jsonl.gz"), "--output-prefix",
                                str(tmp_path / "out")] + common, capsys)
    lines = err.strip().splitlines()
    assert code == ExitCode.CONFIG and lines[0].startswith("tokenizer: HuggingFaceTokenizer")
    assert lines[-1].startswith(f"data error: {tmp_path}/cut.jsonl.gz:") and len(lines) == 2
    assert "the file is truncated or not a valid gz file" in lines[-1]
    for prefix in ("a_file/out", "a_file/sub/out"):  # FileExistsError, NotADirectoryError
        code, err = preprocess_cli(["--input", str(tmp_path / "docs.jsonl"), "--output-prefix",
                                    str(tmp_path / prefix)] + common, capsys)
        assert code == ExitCode.CONFIG and err.strip().splitlines()[-1] == (
            f"config error: output prefix {tmp_path}/{prefix}: {tmp_path}/a_file is a file, "
            "not a directory; choose another --output-prefix")
    assert sorted(os.listdir(tmp_path)) == ["a_file", "cut.jsonl.gz", "docs.jsonl"]


def _preprocess_as_nobody(tok, input_path, output_prefix, pipe_w):
    """In a forked child: drop root (root writes anywhere), then preprocess."""
    os.setgid(65534)
    os.setuid(65534)
    try:
        preprocess([input_path], tok, output_prefix, progress=False)
        os.write(pipe_w, b"no error")
    except ConfigError as err:
        os.write(pipe_w, f"{type(err).__name__}: {err}".encode())
    os._exit(0)


def test_an_output_prefix_in_a_read_only_directory_is_one_line(tok, tmp_path):
    """Was a raw PermissionError."""
    base = tempfile.mkdtemp(prefix="magneto-ro-")  # outside pytest's private (0700) tmp
    try:
        os.chmod(base, 0o755)
        docs = write_jsonl(os.path.join(base, "docs.jsonl"), DOCS[:5])
        locked = os.path.join(base, "locked")
        os.mkdir(locked)
        os.chmod(locked, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP
                 | stat.S_IROTH | stat.S_IXOTH)
        read_fd, write_fd = os.pipe()
        if os.getuid() == 0:
            pid = os.fork()
            if pid == 0:
                _preprocess_as_nobody(tok, docs, os.path.join(locked, "out"), write_fd)
            os.waitpid(pid, 0)
            message = os.read(read_fd, 4096).decode()
        else:
            with pytest.raises(ConfigError) as err:
                preprocess([docs], tok, os.path.join(locked, "out"), progress=False)
            message = f"ConfigError: {err.value}"
        assert message == (f"ConfigError: output prefix {locked}/out: cannot write in {locked} "
                           "(Permission denied); choose a writable --output-prefix")
        assert os.listdir(locked) == []
    finally:
        shutil.rmtree(base)
