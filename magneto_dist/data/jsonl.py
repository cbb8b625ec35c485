"""jsonl inputs: plain, gzip or zstandard lines, parsed with FILE:LINE errors.

Kept free of torch and megatron imports (numpy is cheap) so that workers start fast.
"""
from __future__ import annotations

import gzip
import json
import zlib
from typing import Iterator, List, Sequence, Tuple, Union

from ..errors import DataError

# A document's text under one key: a string, or (as Megatron-LM accepts) a list of sentences.
Texts = List[Union[str, List[str]]]


class BadInputError(DataError):
    """Input that cannot be used; the message names the file and line (or row)."""


def _zstd_blocks(f) -> Iterator[bytes]:
    """Decompressed blocks of a .zst file (any number of frames). zstandard's stream_reader
    ends quietly at a truncated frame, losing the rest of the file without a word; a
    decompressobj says whether its frame ended (`eof`), so truncation is an error here."""
    import zstandard
    dobj, in_frame = zstandard.ZstdDecompressor().decompressobj(), False
    for chunk in iter(lambda: f.read(1 << 20), b""):
        while chunk:
            yield dobj.decompress(chunk)
            in_frame = not dobj.eof
            chunk = dobj.unused_data if dobj.eof else b""
            if dobj.eof:
                dobj = zstandard.ZstdDecompressor().decompressobj()
    if in_frame:
        raise EOFError("the compressed file ended before the end of its last frame")


def _zstd_lines(f) -> Iterator[bytes]:
    pending = b""
    for block in _zstd_blocks(f):
        lines = (pending + block).split(b"\n")
        pending = lines.pop()
        yield from lines
    if pending:
        yield pending


def read_lines(path: str) -> Iterator[Tuple[int, bytes]]:
    """(line number, raw bytes) of every non-blank line of a plain, .gz or .zst file. A
    truncated or corrupt compressed file is a BadInputError naming the file and the line where
    it broke (decoding is per line, to name a bad line)."""
    damaged: tuple = (EOFError, gzip.BadGzipFile, zlib.error)
    if path.endswith(".zst"):
        import zstandard
        damaged += (zstandard.ZstdError,)
    number = 0
    try:
        with open(path, "rb") as raw:
            if path.endswith(".gz"):
                lines = gzip.GzipFile(fileobj=raw)
            elif path.endswith(".zst"):
                lines = _zstd_lines(raw)
            else:
                lines = raw
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    yield number, line
    except damaged as err:
        raise BadInputError(f"{path}:{number + 1}: the file is truncated or not a valid "
                            f"{path.rsplit('.', 1)[-1]} file ({err})") from None


def text_value(where: str, key: str, value) -> Union[str, List[str]]:
    """A document's text under `key`: a string, or a list of strings (sentences)."""
    if isinstance(value, str) or (isinstance(value, list)
                                  and all(isinstance(s, str) for s in value)):
        return value
    held = "null" if value is None else type(value).__name__
    raise BadInputError(f"{where}: key {key!r} holds {held}, not a string")


def parse_line(where: str, raw: bytes, keys: Sequence[str]) -> Texts:
    """The texts under `keys` of one jsonl line, or BadInputError naming file:line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadInputError(f"{where}: invalid UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadInputError(f"{where}: malformed JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(record, dict):
        raise BadInputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    texts = []
    for key in keys:
        if key not in record:
            raise BadInputError(f"{where}: missing key {key!r} (keys: {', '.join(record)}); "
                                "choose keys with --json-keys")
        texts.append(text_value(where, key, record[key]))
    return texts
