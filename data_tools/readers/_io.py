"""Opening user files: gzip or plain, with truncated downloads and empty files reported as such."""
from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from typing import IO, Iterator, Tuple

from data_tools.records import DataError

READ_BLOCK = 4 << 20


def open_binary(path) -> IO[bytes]:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(path, "file not found", fix="check the path", kind="missing_file")
    if os.path.getsize(path) == 0:
        raise DataError(path, "file is empty", fix="the download failed or was interrupted; download it again",
                        kind="empty_file")
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def read_blocks(path, block: int = READ_BLOCK) -> Iterator[bytes]:
    """Yield raw blocks; a gzip stream that ends early becomes a DataError naming how far it got."""
    f = open_binary(path)
    done = 0
    try:
        while True:
            try:
                data = f.read(block)
            except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
                raise DataError(path, f"compressed data ends or is corrupt after {done:,} unpacked bytes ({e})",
                                fix="the download is incomplete or damaged: download it again "
                                    "(`gzip -t FILE` checks it); --skip-bad keeps the records read before the damage",
                                kind="truncated_file") from None
            if not data:
                return
            done += len(data)
            yield data
    finally:
        f.close()


def open_text(path) -> IO[str]:
    """Text stream over read_blocks, so gzip truncation surfaces as DataError mid-iteration."""
    return io.TextIOWrapper(_BlockReader(read_blocks(path)), encoding="utf-8", errors="replace", newline="")


class _BlockReader(io.RawIOBase):
    def __init__(self, blocks: Iterator[bytes]):
        self._blocks, self._buf, self._at = blocks, memoryview(b""), 0

    def readable(self):
        return True

    def readinto(self, b):
        # an offset into the current block, not a slice of its rest: slicing copied the whole 4 MiB block on
        # every 8 KiB read (the text layer's), hundreds of times per block
        while self._at >= len(self._buf):
            block = next(self._blocks, b"")
            if not block:
                return 0
            self._buf, self._at = memoryview(block), 0
        n = min(len(b), len(self._buf) - self._at)
        b[:n] = self._buf[self._at:self._at + n]
        self._at += n
        return n


def iter_json_array(path, key: str | None = None) -> Iterator[Tuple[int, dict]]:
    """Stream the objects of a top-level JSON array (or of `{key: [...]}`) in constant memory.

    Yields (index, object). Whole files of hundreds of MB (UniProt REST JSON, Mol-Instructions) never sit in
    memory at once; a truncated file is reported with the index of the object that was cut off.
    """
    decoder = json.JSONDecoder()
    f = open_text(path)
    buf, pos, eof = "", 0, False

    def more():
        nonlocal buf, pos, eof
        chunk = f.read(1 << 20)
        if not chunk:
            eof = True
        buf, pos = buf[pos:] + chunk, 0

    def skip(chars):
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in chars:
                pos += 1
            if pos < len(buf) or eof:
                return
            more()

    more()
    skip(" \t\r\n\ufeff")
    if key is not None and buf[pos:pos + 1] == "{":
        # Only the array under `key` is wanted; the opening brace and key are short, so look for them near the start.
        while f'"{key}"' not in buf and not eof and len(buf) < (8 << 20):
            more()
        at = buf.find(f'"{key}"', pos)
        if at < 0:
            raise DataError(path, f'no "{key}" array in this JSON object', fix="is this a UniProt REST JSON export?",
                            kind="malformed")
        pos = buf.index(":", at) + 1
        skip(" \t\r\n")
    if buf[pos:pos + 1] != "[":
        raise DataError(path, "expected a JSON array of objects", line=1, kind="malformed",
                        fix="give a file in the documented format, or pick the right --format")
    pos += 1
    index = 0
    while True:
        skip(" \t\r\n,")
        if pos >= len(buf):
            raise DataError(path, f"JSON ends before the closing ']' (after {index} objects)", record=f"#{index}",
                            fix="the file is truncated: download or export it again", kind="truncated_file")
        if buf[pos] == "]":
            return
        while True:
            try:
                obj, end = decoder.raw_decode(buf, pos)
                break
            except json.JSONDecodeError as e:
                if eof:
                    raise DataError(path, f"invalid JSON in object #{index}: {e.msg}", record=f"#{index}",
                                    fix="the file is truncated or corrupt: export it again",
                                    kind="malformed" if buf.rstrip().endswith(("]", "}")) else "truncated_file"
                                    ) from None
                more()
        if not isinstance(obj, dict):
            raise DataError(path, f"element #{index} is {type(obj).__name__}, expected an object",
                            record=f"#{index}", kind="malformed")
        yield index, obj
        index += 1
        pos = end
