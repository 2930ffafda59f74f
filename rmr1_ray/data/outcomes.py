"""What happened to every input row: kept, dropped (with a reason) or rejected (malformed).

A pipeline's parse stage turns each input row into exactly one outcome row (OUTCOME_FIELDS plus
its payload), so no row can vanish: the driver counts outcomes per source and reason, writes the
rejects to rejects.jsonl, and fails the job when a source's reject share passes the threshold.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from rmr1_ray.data.readers import FILE, RAW, ROW
from rmr1_ray.data.sources import INVALID_JSON, RowError

OK, DROP, REJECT = "ok", "drop", "reject"
DUPLICATE = "duplicate"
RAW_PREVIEW_CHARS = 1000  # enough of a bad row to recognise it in rejects.jsonl

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
OUTCOME_FIELDS = [
    pa.field("source", pa.string()),  # the config's source name
    pa.field("file", pa.string()),
    pa.field("row", pa.int64()),
    pa.field("status", pa.string()),  # ok | drop | reject
    pa.field("reason", pa.string()),
    pa.field("detail", pa.string()),
    pa.field("raw", pa.string()),  # rejects only: the start of the row as read
]


def records(batch: pa.Table) -> Iterator[tuple[str, int, Any, Any]]:
    """(file, row, record or RowError, raw) for each row of a reader table (see readers.read_table)."""
    files, rows = batch.column(FILE).to_pylist(), batch.column(ROW).to_pylist()
    if RAW in batch.column_names:
        for file, row, raw in zip(files, rows, batch.column(RAW).to_pylist(), strict=True):
            try:
                yield file, row, json.loads(raw), raw
            except UnicodeDecodeError as exc:
                yield file, row, RowError(INVALID_JSON, f"invalid JSON: not UTF-8 text ({exc.reason} at byte {exc.start})"), raw
            except json.JSONDecodeError as exc:
                yield file, row, RowError(INVALID_JSON, f"invalid JSON: {exc.msg} at column {exc.colno}"), raw
    else:
        record_rows = batch.drop_columns([FILE, ROW]).to_pylist()
        for file, row, record in zip(files, rows, record_rows, strict=True):
            yield file, row, record, record


def preview(raw: Any) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else json.dumps(raw, ensure_ascii=False, default=str)
    return text[:RAW_PREVIEW_CHARS]


class Outcomes:
    """Column builder for one batch's outcome rows: OUTCOME_FIELDS + `payload` fields (null unless ok)."""

    def __init__(self, source: str, payload: list[pa.Field]) -> None:
        self.source = source
        self.schema = pa.schema(OUTCOME_FIELDS + payload)
        self.columns: dict[str, list[Any]] = {name: [] for name in self.schema.names}

    def add(self, file: str, row: int, status: str, reason: str | None = None, detail: str | None = None,
            raw: str | None = None, **payload: Any) -> None:
        values = {"source": self.source, "file": file, "row": row, "status": status, "reason": reason,
                  "detail": detail, "raw": raw, **payload}
        for name, column in self.columns.items():
            column.append(values.get(name))

    def reject(self, file: str, row: int, error: RowError, raw: Any) -> None:
        self.add(file, row, REJECT, error.reason, error.detail, preview(raw))

    def table(self) -> pa.Table:
        return pa.table(self.columns, schema=self.schema)


@dataclass
class SourceStats:
    read: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    kept: Counter[str] = field(default_factory=Counter)  # split -> rows

    @property
    def reject_share(self) -> float:
        return sum(self.rejected.values()) / self.read if self.read else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"read": self.read, "kept": sum(self.kept.values()), **dict(sorted(self.kept.items())),
                "rejected": dict(self.rejected.most_common()), "dropped": dict(self.dropped.most_common()),
                "reject_share": round(self.reject_share, 6)}


@dataclass
class Triage:
    ok: pa.Table  # ok outcome rows, in (source, file, row) order
    rejects: list[dict[str, Any]]
    stats: dict[str, SourceStats]


def triage(outcomes: pa.Table, reads: dict[str, int]) -> Triage:
    """Put outcomes back in file order (Ray Data does not keep it) and count them per source and reason."""
    order = pc.index_in(outcomes.column("source"), pa.array(list(reads)))
    outcomes = outcomes.append_column("_order", order).sort_by([("_order", "ascending"), ("file", "ascending"),
                                                                ("row", "ascending")]).drop_columns(["_order"])
    stats = {name: SourceStats(read=count) for name, count in reads.items()}
    status = outcomes.column("status")
    for name, state, reason in zip(outcomes.column("source").to_pylist(), status.to_pylist(),
                                   outcomes.column("reason").to_pylist(), strict=True):
        if state == REJECT:
            stats[name].rejected[reason] += 1
        elif state == DROP:
            stats[name].dropped[reason] += 1
    rejected = outcomes.filter(pc.equal(status, REJECT)).select(["source", "file", "row", "reason", "detail", "raw"])
    return Triage(outcomes.filter(pc.equal(status, OK)), rejected.to_pylist(), stats)


def first_occurrences(keys: list[str]) -> list[bool]:
    """Mask keeping the first row of each key (rows are in source, file, row order: the earliest wins)."""
    seen: set[str] = set()
    keep = []
    for key in keys:
        keep.append(key not in seen)
        seen.add(key)
    return keep


def total_counts(counters: Iterable[Counter[str]]) -> dict[str, int]:
    """Counters summed, most common first."""
    return dict(sum(counters, Counter()).most_common())


def write_rejects(path: Path, rejects: list[dict[str, Any]]) -> None:
    with path.open("w") as f:
        for reject in rejects:
            f.write(json.dumps(reject, ensure_ascii=False) + "\n")


def over_threshold(stats: dict[str, SourceStats], max_fraction: float) -> str | None:
    """None if every source's reject share is within `max_fraction`, else a message naming the worst source."""
    failing = {name: s for name, s in stats.items() if s.reject_share > max_fraction}
    if not failing:
        return None
    name, worst = max(failing.items(), key=lambda item: item[1].reject_share)
    reasons = ", ".join(f"{reason}: {n}" for reason, n in worst.rejected.most_common(3))
    others = f" (also over: {', '.join(sorted(set(failing) - {name}))})" if len(failing) > 1 else ""
    return (f"source '{name}' rejected {sum(worst.rejected.values())} of {worst.read} rows "
            f"({worst.reject_share:.1%} > max_reject_fraction {max_fraction:.1%}); top reasons: {reasons}{others}. "
            "See rejects.jsonl for every row, its file, row number and reason.")


def summary_lines(section: dict[str, Any]) -> list[str]:
    """A few aligned lines per source for the console: read, kept per split, rejected, dropped."""
    width = max([len(name) for name in section["sources"]] + [6])
    lines = [f"  {'source':<{width}} {'read':>8} {'train':>8} {'val':>8} {'rejected':>9} {'dropped':>8}"]
    for name, s in section["sources"].items():
        lines.append(f"  {name:<{width}} {s['read']:>8} {s.get('train', 0):>8} {s.get('val', 0):>8} "
                     f"{sum(s['rejected'].values()):>9} {sum(s['dropped'].values()):>8}")
    for kind in ("rejected", "dropped"):
        if section[kind]:
            lines.append(f"  {kind}: " + ", ".join(f"{reason} {n}" for reason, n in section[kind].items()))
    balance = "; ".join(f"{split} A {b['model_a']} / B {b['model_b']}" for split, b in section["label_balance"].items())
    lines.append(f"  label balance: {balance}")
    if section.get("prompt_length"):
        lengths = section["prompt_length"]
        lines.append("  prompt tokens: " + ", ".join(f"{k} {v:g}" for k, v in lengths.items()))
    return lines
