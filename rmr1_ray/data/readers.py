"""Read a dataset into an Arrow table where every row knows the file and row number it came from.

Local files: .jsonl, .json (a JSON array, or JSON lines under a .json name) and .parquet, or a
directory of them. Anything else that is not an existing path is a hub dataset name, loaded with
`datasets.load_dataset` (imported only then: nothing downloads at import time).

Rows are numbered from 1 within their file: in a JSON-lines file the row number is the line
number (blank lines are skipped but counted, as an editor counts them); in a JSON array, a parquet
file or a hub split it is the record's position (row N is `records[N - 1]`).

Ray Data's own readers (read_json, read_parquet) are not used for local files: a single line of
invalid JSON fails their whole read, and they cannot tell which line of which file a row came from.
So the driver reads raw bytes here (cheap), and parsing (the real work) runs in Ray tasks, where a
bad line becomes a counted reject with its row number instead of an exception.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rmr1_ray.config.sections import looks_local

FILE = "__file"  # the file (or "hub-name[split]") a row came from
ROW = "__row"  # 1-based row number within that file
RAW = "__raw"  # JSON text of one record (JSON inputs); parsed, and checked, by the pipeline's tasks
SUFFIXES = (".jsonl", ".json", ".parquet")


class ReadError(RuntimeError):
    """An input that cannot be read at all: a source (missing, not a dataset, unreadable) or the tokenizer."""


def read_table(path: str, split: str = "train", sample_size: int | None = None, seed: int = 0) -> pa.Table:
    """All rows of a local file/directory or hub dataset, with FILE and ROW columns, optionally sampled.

    JSON inputs come back as (FILE, ROW, RAW) with RAW unparsed; parquet and hub inputs keep their
    own columns. A sample of `sample_size` rows is the same set that RM-R1's
    `dataset.shuffle(seed=seed).select(range(sample_size))` keeps, in file order.
    """
    local = Path(path).expanduser()
    if local.exists():
        table = _read_local(local)
    elif looks_local(path) or path.endswith(SUFFIXES):
        raise ReadError(f"{path}: no such file or directory")
    else:
        table = _read_hub(path, split)
    if sample_size is not None and sample_size < table.num_rows:
        # numpy's Generator.permutation is what datasets' shuffle(seed=...) draws from.
        picked = np.random.default_rng(seed).permutation(table.num_rows)[:sample_size]
        table = table.take(np.sort(picked))
    return table


def _read_local(path: Path) -> pa.Table:
    if path.is_file():
        return _read_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise ReadError(f"{path}: directory holds no {'/'.join(SUFFIXES)} files")
    if len({f.suffix == ".parquet" for f in files}) > 1:
        raise ReadError(f"{path}: mixes parquet and JSON files; give each format its own source")
    try:
        return pa.concat_tables([_read_file(f) for f in files], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ReadError(f"{path}: its parquet files do not share one schema: {exc}") from None


def _read_file(path: Path) -> pa.Table:
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ReadError(f"{path}: not a readable parquet file: {exc}") from None
        return _with_position(table, str(path), np.arange(1, table.num_rows + 1))
    if path.suffix not in SUFFIXES:
        raise ReadError(f"{path}: unsupported file type (expected {', '.join(SUFFIXES)})")
    data = path.read_bytes()
    if data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        return _read_json_array(path, data)
    return _read_json_lines(path, data)


def _read_json_lines(path: Path, data: bytes) -> pa.Table:
    # Lines stay bytes: decoding and json.loads happen in the tasks, so that one bad line (broken
    # JSON, invalid UTF-8) is one reject there, not a failed job here.
    numbers, lines = [], []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.strip():
            numbers.append(number)
            lines.append(line)
    raw = pa.array(lines, type=pa.binary())
    return pa.table({FILE: pa.array([str(path)] * len(lines), pa.string()), ROW: pa.array(numbers, pa.int64()), RAW: raw})


def _read_json_array(path: Path, data: bytes) -> pa.Table:
    try:
        records = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        # A broken array has no rows to skip to: the whole file is unusable.
        raise ReadError(f"{path}: not valid JSON ({exc}); use JSON lines to let single bad rows be skipped") from None
    if not isinstance(records, list):
        raise ReadError(f"{path}: expected a JSON array of records or JSON lines, got a {type(records).__name__}")
    # Re-encode each record so that all JSON inputs reach the tasks in one shape (bad records included).
    raw = [json.dumps(r, ensure_ascii=False).encode() for r in records]
    return pa.table({
        FILE: pa.array([str(path)] * len(raw), pa.string()),
        ROW: pa.array(np.arange(1, len(raw) + 1), pa.int64()),
        RAW: pa.array(raw, pa.binary()),
    })


def _read_hub(name: str, split: str) -> pa.Table:
    import datasets  # slow import, and only hub sources need it

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # the hub raises many types; all of them mean "cannot read this source"
        raise ReadError(f"{name} (split {split!r}): cannot load from the hub: {type(exc).__name__}: {exc}") from None
    table = dataset.with_format("arrow")[:]
    return _with_position(table, f"{name}[{split}]", np.arange(1, table.num_rows + 1))


def _with_position(table: pa.Table, file: str, rows: np.ndarray) -> pa.Table:
    for column in (FILE, ROW, RAW):
        if column in table.column_names:
            raise ReadError(f"{file}: has a column named {column!r}, which this reader reserves")
    table = table.append_column(FILE, pa.array([file] * table.num_rows, pa.string()))
    return table.append_column(ROW, pa.array(rows, pa.int64()))
