"""Benchmark loaders: each benchmark's own file format -> judge comparisons (chosen vs rejected).

Formats (local file/directory, or a hub dataset with the same fields):
- rewardbench:  `prompt`, `chosen`, `rejected` (strings), `subset`, `id`. One comparison per row.
- rm_bench:     `id`, `prompt`, `chosen` and `rejected` (3 strings each: concise, detailed plain,
                detailed markdown), `domain` (or, in the per-domain files, the file name:
                chat_filtered.json -> chat). Nine comparisons per example: every (chosen style i,
                rejected style j) cell of the 3x3 style matrix.
- rmb_pairwise: `pair_uid`, `conversation_input` (user-side turns), `chosen`/`reject` ({answer, ...}),
                `category_path`. One comparison per row.
- rmb_bon:      `bon_uid`, `conversation_input`, `bon_best` ({answer}), `loser_list` ([{answer}, ...]),
                `category_path`. One comparison (best vs loser k) per loser, sharing one `group`.

A malformed row never stops a load and never disappears: it is skipped and returned as a Reject
(file, row, reason). An RM-Bench example or RMB best-of-N group is kept or rejected whole, since its
score needs every one of its comparisons.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from rmr1_ray.config.evaluate import BenchmarkSpec
from rmr1_ray.data.readers import FILE, RAW, ROW, read_table
from rmr1_ray.data.sources import RowError, check_turns, messages_field, text_field
from rmr1_ray.data.sources import field as required
from rmr1_ray.prompts import InvalidPairError, Message, PreferencePair

STYLES = ("concise", "detailed plain", "detailed markdown")  # RM-Bench's response styles, in file order
NUM_STYLES = len(STYLES)
RMB_GOALS = ("Helpfulness", "Harmlessness")
DEFAULT_SPLIT = {"rewardbench": "filtered"}  # reward-bench's scored split; the others ship one split


@dataclass(frozen=True)
class Comparison:
    """One judge comparison: is `chosen` better than `rejected` given `context`?"""

    key: str  # unique and stable across runs: benchmark/subset/example id[/cell]
    benchmark: str  # rewardbench | rm_bench | rmb_pairwise | rmb_bon
    subset: str  # RewardBench subset, RM-Bench domain, or RMB category_path
    example_id: str
    context: tuple[Message, ...]  # user, assistant, ..., user
    chosen: str
    rejected: str
    style: tuple[int, int] | None = None  # RM-Bench: (chosen style i, rejected style j)
    group: str | None = None  # RMB best-of-N: the example whose comparisons must all be won


@dataclass(frozen=True)
class Reject:
    benchmark: str
    file: str
    row: int  # 1-based row (JSON lines: line number) within `file`
    reason: str


@dataclass
class Loaded:
    """What one benchmark source yielded."""

    spec: BenchmarkSpec
    rows: int = 0  # rows read (before capping at max_examples)
    comparisons: list[Comparison] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    examples: Counter[str] = field(default_factory=Counter)  # kept examples per subset

    def counts(self) -> dict[str, dict[str, int]]:
        """Per subset: examples kept and the comparisons they expand to."""
        comparisons = Counter(c.subset for c in self.comparisons)
        return {s: {"examples": n, "comparisons": comparisons[s]} for s, n in sorted(self.examples.items())}

    @property
    def reject_fraction(self) -> float:
        return len(self.rejects) / self.rows if self.rows else 0.0


def load_benchmark(spec: BenchmarkSpec, seen_keys: set[str] | None = None) -> Loaded:
    """Read `spec` and expand it into comparisons. Keys already in `seen_keys` (from another source
    of the same run) are rejected as duplicates; `seen_keys` is updated. A source that cannot be read
    at all (missing path, broken JSON array) raises rmr1_ray.data.readers.ReadError."""
    seen_keys = set() if seen_keys is None else seen_keys
    table = read_table(spec.path, split=spec.split or DEFAULT_SPLIT.get(spec.name, "train"))
    parse = PARSERS[spec.name]
    loaded = Loaded(spec, rows=table.num_rows)
    for file, row, record in _records(table):
        try:
            comparisons = parse(record, file)
        except (RowError, InvalidPairError) as exc:
            loaded.rejects.append(Reject(spec.name, file, row, str(exc)))
            continue
        subset, example_id = comparisons[0].subset, comparisons[0].example_id
        if any(c.key in seen_keys for c in comparisons):
            loaded.rejects.append(Reject(spec.name, file, row, f"duplicate example id {example_id!r} in {subset!r}"))
            continue
        if spec.max_examples is not None and loaded.examples[subset] >= spec.max_examples:
            continue  # capped, not malformed: a quick run keeps the first N examples of each subset
        seen_keys.update(c.key for c in comparisons)
        loaded.comparisons.extend(comparisons)
        loaded.examples[subset] += 1
    return loaded


def _records(table: pa.Table) -> Iterator[tuple[str, int, Any]]:
    """(file, row, record) for every row; JSON text that does not parse becomes an _Unparsable record."""
    files, rows = table[FILE].to_pylist(), table[ROW].to_pylist()
    if RAW in table.column_names:
        records: list[Any] = [_parse_json(raw) for raw in table[RAW].to_pylist()]
    else:  # parquet or hub rows: already structured
        records = table.drop_columns([FILE, ROW]).to_pylist()
    yield from zip(files, rows, records, strict=True)


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return _Unparsable(str(exc))


@dataclass(frozen=True)
class _Unparsable:
    error: str


def _object(record: Any) -> dict[str, Any]:
    if isinstance(record, _Unparsable):
        raise RowError("invalid JSON", f"invalid JSON: {record.error}")
    if not isinstance(record, dict):
        raise RowError("wrong type", f"a row must be an object with named fields, got {type(record).__name__}")
    return record


def _id(record: dict[str, Any], name: str) -> str:
    value = required(record, name)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise RowError("wrong type", f"field '{name}': expected a string or integer id, got {type(value).__name__}")
    return str(value)


def _answer(value: Any, name: str) -> str:
    """RMB answers are objects {answer, llm_name, ...}."""
    if not isinstance(value, dict):
        raise RowError("wrong type", f"field '{name}': expected an object with an 'answer', got {type(value).__name__}")
    try:
        return text_field(value, "answer")
    except RowError as exc:
        raise RowError(exc.reason, f"field '{name}': {exc.detail}") from None


def _comparison(benchmark: str, subset: str, example_id: str, context: tuple[Message, ...], chosen: str,
                rejected: str, suffix: str = "", **extra: Any) -> Comparison:
    PreferencePair(context, chosen, rejected).validate()  # empty or identical answers, bad turns
    key = f"{benchmark}/{subset}/{example_id}" + (f"/{suffix}" if suffix else "")
    return Comparison(key, benchmark, subset, example_id, context, chosen, rejected, **extra)


def parse_rewardbench(record: Any, file: str) -> list[Comparison]:
    record = _object(record)
    context = ({"role": "user", "content": text_field(record, "prompt")},)
    return [_comparison("rewardbench", text_field(record, "subset"), _id(record, "id"), context,
                        text_field(record, "chosen"), text_field(record, "rejected"))]


def rm_bench_domain(record: dict[str, Any], file: str) -> str:
    """The record's `domain`, else the per-domain file's name: '.../safety-response_filtered.json' -> safety-response."""
    if record.get("domain") is not None:
        return text_field(record, "domain")
    return Path(file).stem.removesuffix("_filtered")


def parse_rm_bench(record: Any, file: str) -> list[Comparison]:
    record = _object(record)
    example_id, domain = _id(record, "id"), rm_bench_domain(record, file)
    context = ({"role": "user", "content": text_field(record, "prompt")},)
    styles = {}
    for name in ("chosen", "rejected"):
        value = required(record, name)
        if not isinstance(value, list) or len(value) != NUM_STYLES or not all(isinstance(v, str) for v in value):
            raise RowError("wrong type", f"field '{name}': expected {NUM_STYLES} strings ({', '.join(STYLES)})")
        styles[name] = value
    comparisons = []
    for i in range(NUM_STYLES):
        for j in range(NUM_STYLES):
            try:
                comparisons.append(_comparison("rm_bench", domain, example_id, context, styles["chosen"][i],
                                               styles["rejected"][j], suffix=f"c{i}r{j}", style=(i, j)))
            except InvalidPairError as exc:
                raise InvalidPairError(f"chosen[{i}] vs rejected[{j}]: {exc}") from None
    return comparisons


def _rmb_context_and_path(record: dict[str, Any]) -> tuple[tuple[Message, ...], str]:
    context = messages_field(record, "conversation_input")
    check_turns(context, "conversation_input", last="user")
    path = text_field(record, "category_path")
    parts = path.split("/")
    if len(parts) < 2 or parts[1] not in RMB_GOALS:
        raise RowError("wrong type", f"field 'category_path': {path!r} does not name a goal ({' or '.join(RMB_GOALS)}) "
                       "as its second part, e.g. 'Pairwise_set/Helpfulness/Chat/Discussion'")
    return tuple(context), path


def parse_rmb_pairwise(record: Any, file: str) -> list[Comparison]:
    record = _object(record)
    context, path = _rmb_context_and_path(record)
    return [_comparison("rmb_pairwise", path, _id(record, "pair_uid"), context,
                        _answer(required(record, "chosen"), "chosen"),
                        _answer(required(record, "reject"), "reject"))]


def parse_rmb_bon(record: Any, file: str) -> list[Comparison]:
    record = _object(record)
    context, path = _rmb_context_and_path(record)
    example_id, best = _id(record, "bon_uid"), _answer(required(record, "bon_best"), "bon_best")
    losers = required(record, "loser_list")
    if not isinstance(losers, list) or not losers:
        raise RowError("wrong type", "field 'loser_list': expected a non-empty list of {answer} objects")
    comparisons = []
    for k, loser in enumerate(losers):
        try:
            rejected = _answer(loser, f"loser_list[{k}]")
            comparisons.append(_comparison("rmb_bon", path, example_id, context, best, rejected, suffix=str(k),
                                           group=f"{path}/{example_id}"))
        except InvalidPairError as exc:
            raise InvalidPairError(f"bon_best vs loser_list[{k}]: {exc}") from None
    return comparisons


PARSERS: dict[str, Callable[[Any, str], list[Comparison]]] = {
    "rewardbench": parse_rewardbench,
    "rm_bench": parse_rm_bench,
    "rmb_pairwise": parse_rmb_pairwise,
    "rmb_bon": parse_rmb_bon,
}
