"""Corpora in any common form, read as a stream of documents.

`--input` takes files, globs and directories of .jsonl / .json (plain, .gz or .zst), .parquet
and Hugging Face `datasets` directories written by save_to_disk. Every form yields the same
records, in a fixed order (inputs as given; a directory's and a glob's in the order of their
paths), so the same documents give the same bytes whatever their container:
    (path, number, payload)
where payload is a jsonl line's raw bytes (parsed in the tokenizing workers; number is the line)
or a table row's texts, one per key (number is the 0-based row, as `table[N]` / `dataset[N]`).
Parquet is read a row group at a time and a datasets directory through its memory map, so
memory stays bounded for multi-GB shards.
"""
from __future__ import annotations

import glob
import os
from typing import Iterator, List, Sequence, Tuple, Union

from .jsonl import BadInputError, Texts, parse_line, read_lines, text_value

LINE_SUFFIXES = (".jsonl", ".json")
COMPRESSIONS = ("", ".gz", ".zst")
PARQUET = ".parquet"
FORMS = "a .jsonl/.json file (plain, .gz or .zst), a .parquet file or a datasets directory"
Record = Tuple[str, int, Union[bytes, Texts]]


def is_datasets_dir(path: str) -> bool:
    """A directory written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in (
        "state.json", "dataset_dict.json"))


def _known(path: str) -> bool:
    return path.endswith(PARQUET) or any(path.endswith(s + c) for s in LINE_SUFFIXES
                                         for c in COMPRESSIONS)


def _directory_inputs(root: str) -> List[str]:
    """Every input under root (datasets directories whole), in the order of their paths."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for d in list(dirnames):
            if is_datasets_dir(os.path.join(dirpath, d)):
                found.append(os.path.join(dirpath, d))
                dirnames.remove(d)
        found += [os.path.join(dirpath, n) for n in filenames if _known(n)]
    return sorted(found)


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """The input files and datasets directories named by files, globs and directories, in
    order; a name that matches nothing is a BadInputError."""
    inputs: List[str] = []
    for pattern in patterns:
        if is_datasets_dir(pattern):
            found = [pattern]
        elif os.path.isdir(pattern):
            found = _directory_inputs(pattern)
            if not found:
                raise BadInputError(f"input directory {pattern} holds no input ({FORMS})")
        elif os.path.isfile(pattern):
            found = [pattern]  # a file named explicitly is read as jsonl unless it is parquet
        elif glob.has_magic(pattern):
            found = [p for p in sorted(glob.glob(pattern, recursive=True))
                     if os.path.isfile(p) or is_datasets_dir(p)]
            if not found:
                raise BadInputError(f"input {pattern} matches no file")
        else:
            raise BadInputError(f"input file {pattern} does not exist")
        inputs += found
    return inputs


def _table_rows(path: str, columns: dict, keys: Sequence[str], first_row: int
                ) -> Iterator[Record]:
    """Records of one block of a table: columns is key -> list of values."""
    for offset, values in enumerate(zip(*(columns[k] for k in keys))):
        row = first_row + offset
        yield path, row, [text_value(f"{path}:row {row}", k, v) for k, v in zip(keys, values)]


def _check_columns(path: str, present: Sequence[str], keys: Sequence[str]) -> None:
    missing = [k for k in keys if k not in present]
    if missing:
        raise BadInputError(f"{path}: no column {', '.join(map(repr, missing))} (columns: "
                            f"{', '.join(present)}); choose columns with --json-keys")


def read_parquet(path: str, keys: Sequence[str]) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        parquet = pq.ParquetFile(path)
    except pa.ArrowException as err:
        raise BadInputError(f"{path}: not a readable parquet file ({err})") from None
    _check_columns(path, parquet.schema_arrow.names, keys)
    row = 0
    for group in range(parquet.num_row_groups):
        try:
            table = parquet.read_row_group(group, columns=list(keys))
        except pa.ArrowException as err:
            raise BadInputError(f"{path}:row {row}: row group {group} cannot be read ({err})"
                                ) from None
        yield from _table_rows(path, {k: table.column(k).to_pylist() for k in keys}, keys, row)
        row += table.num_rows


def read_datasets_dir(path: str, keys: Sequence[str], batch_rows: int = 1024
                      ) -> Iterator[Record]:
    import datasets
    data = datasets.load_from_disk(path)
    if isinstance(data, datasets.DatasetDict):
        raise BadInputError(f"{path} is a DatasetDict with splits {', '.join(data)}; name one "
                            f"split directory, e.g. --input {os.path.join(path, next(iter(data)))}")
    _check_columns(path, data.column_names, keys)
    for start, batch in zip(range(0, len(data), batch_rows),
                            data.select_columns(list(keys)).iter(batch_size=batch_rows)):
        yield from _table_rows(path, batch, keys, start)


def read_records(inputs: Sequence[str], keys: Sequence[str]) -> Iterator[Record]:
    """Every document of every (expanded) input, in order."""
    for path in inputs:
        if is_datasets_dir(path):
            yield from read_datasets_dir(path, keys)
        elif path.endswith(PARQUET):
            yield from read_parquet(path, keys)
        else:
            for number, raw in read_lines(path):
                yield path, number, raw


def record_where(record: Record) -> str:
    """FILE:LINE of a jsonl line, FILE:row N of a table row."""
    path, number, payload = record
    return f"{path}:{number}" if isinstance(payload, bytes) else f"{path}:row {number}"


def record_texts(record: Record, keys: Sequence[str]) -> Texts:
    """The texts of a record, one per key (a jsonl line is parsed here)."""
    payload = record[2]
    return parse_line(record_where(record), payload, keys) if isinstance(payload, bytes) \
        else payload


def write_training_text(inputs: Sequence[str], keys: Sequence[str], out,
                        max_lines: int = None, log=None) -> int:
    """Tokenizer-training text: every non-empty line of every input document (the texts under
    `keys`; a file that is neither jsonl nor parquet: its lines), one per output line.
    -> lines written."""
    written = 0
    for path in expand_inputs(inputs):
        if _known(path) or is_datasets_dir(path):
            texts = (t for record in read_records([path], keys)
                     for value in record_texts(record, keys)
                     for t in ([value] if isinstance(value, str) else value))
        else:
            texts = (raw.decode("utf-8", errors="replace") for _, raw in read_lines(path))
        for text in texts:
            for line in text.splitlines():
                if line.strip():
                    out.write(line + "\n")
                    written += 1
            if max_lines is not None and written >= max_lines:
                return written
        if log is not None:
            log(f"read {path}: {written:,} lines so far")
    return written
