"""Deterministic prompt batches for GRPO from the prepared parquet directory (`rmr1 prepare` OUT/train).

Epoch e visits the rows in the order of a permutation drawn from (seed, e); a batch is the next
`batch_size` rows of it (or fewer: dynamic sampling's refill rounds). The position (epoch, offset) is all
a checkpoint needs to continue exactly where a run stopped. A batch never spans two epochs: rows left at
the end of an epoch that a batch does not fit into are skipped (every step has the same size).

The table is memory-mapped Arrow, and a batch takes only its rows, so the driver stays small even for
long prompts. Prepared parquet holds at least: uid, messages (the judge's chat messages), winner.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rmr1_ray.batch import DataProto

REQUIRED_COLUMNS = ("uid", "messages", "winner")


@dataclass(frozen=True)
class DataPosition:
    epoch: int = 0
    offset: int = 0  # rows of this epoch's permutation already used


def prompt_files(path: str | Path) -> list[Path]:
    """The parquet shards under `path` (a file or a directory), in file-name order."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"data.train_path: no parquet files in {path} (run `rmr1 prepare` first)")
    return files


def read_shard(file: Path) -> pa.Table:
    """One shard's REQUIRED_COLUMNS; a shard without them is an error naming the file."""
    table = pq.read_table(file, memory_map=True)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{file}: missing columns {missing}; prepared prompt rows need {list(REQUIRED_COLUMNS)}")
    return table.select(list(REQUIRED_COLUMNS))


def read_prompt_table(path: str | Path) -> pa.Table:
    """All shards under `path`, unchecked beyond their columns (rmr1_ray.data.prompt_check checks rows)."""
    return pa.concat_tables([read_shard(f) for f in prompt_files(path)])


def _object_array(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)  # np.array() would turn equal-length lists into a 2-D array
    out[:] = values
    return out


class PromptBatches:
    def __init__(
        self, table: pa.Table, batch_size: int, seed: int, shuffle: bool = True, position: DataPosition = DataPosition()
    ) -> None:
        """table: prompt rows with REQUIRED_COLUMNS (read_prompt_table, or prompt_check's good rows)."""
        self.table = table
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        if self.table.num_rows < batch_size:
            raise ValueError(
                f"data.train_path has {self.table.num_rows} prompts, fewer than algorithm.train_batch_size={batch_size}"
            )
        self.position = position

    @property
    def steps_per_epoch(self) -> int:
        return self.table.num_rows // self.batch_size

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.table.num_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.table.num_rows)

    def next(self, size: int | None = None) -> DataProto:
        """The next batch of `size` prompts (default batch_size; dynamic sampling's refill rounds ask for
        fewer): non-tensor messages, uid, winner and data_index (0..size-1, the prompt's place in its
        batch); meta_info epoch and offset of its first row. A batch never spans two epochs."""
        size = self.batch_size if size is None else size
        if not 0 < size <= self.batch_size:
            raise ValueError(f"a prompt batch holds 1..{self.batch_size} prompts, not {size}")
        epoch, offset = self.position.epoch, self.position.offset
        if offset + size > self.table.num_rows:
            epoch, offset = epoch + 1, 0
        rows = self.table.take(self._order(epoch)[offset : offset + size]).to_pydict()
        self.position = DataPosition(epoch, offset + size)
        return DataProto.from_dict(
            non_tensors={
                "messages": _object_array(rows["messages"]),
                "uid": _object_array(rows["uid"]),
                "winner": _object_array(rows["winner"]),
                "data_index": _object_array(list(range(size))),
            },
            meta_info={"epoch": epoch, "offset": offset},
        )
