"""Preference mix -> judge prompts, with Ray Data.

Pass 1 (Ray Data tasks, all cores): each raw row is parsed by its source's adapter, validated,
hashed to a uid, rendered with the chosen answer as Chatbot A, put through the tokenizer's chat
template and tokenized (one batched fast-tokenizer call per batch). Every input row yields one
outcome row: ok (with its pair and token length), dropped or rejected (with the reason).
Driver (cheap: it looks at uids, sources and lengths): outcomes back in file order, dedup by
uid (the first occurrence wins), drop prompts over max_prompt_length, split train/val by uid
hash, then balanced answer positions within each split.
Pass 2 (Ray Data tasks): render every kept pair at its final position; write parquet shards.

Why lengths are measured in pass 1, not after the positions are chosen: which rows are kept
depends on their length, and positions must be balanced over exactly the kept rows, so the
length filter has to come first; measuring in pass 1 keeps the balance exact with one
tokenization per row. The length is that of the chosen-as-A rendering; the chosen-as-B prompt
is the same text with the two answers swapped between identical newline-delimited markers, which
a pre-tokenizing BPE tokenizer (every HF chat model's) splits at the same places, so both
renderings have the same token count (tests check this on the tiny tokenizer).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rmr1_ray.config.prepare import PrepareConfig, SourceConfig
from rmr1_ray.data.outcomes import (
    DROP,
    DUPLICATE,
    MESSAGES,
    OK,
    OUTCOME_FIELDS,
    Outcomes,
    Triage,
    first_occurrences,
    records,
    total_counts,
    triage,
)
from rmr1_ray.data.pipeline import collect, configure_data_context, map_tables, split_of, write_parquet
from rmr1_ray.data.readers import ReadError, read_table
from rmr1_ray.data.sources import INVALID_PAIR, RowError, filter_reason, pair_uid, parse_record
from rmr1_ray.prompts import InvalidPairError, Message, PreferencePair, balanced_positions, render_pair

logger = logging.getLogger(__name__)

DROPPED_SOURCE = "dropped source"
TOO_LONG = "too long"
SPLITS = ("train", "val")
PERCENTILES = (50, 90, 95, 99)

PAIR_FIELDS = [
    pa.field("uid", pa.string()),
    pa.field("context", MESSAGES),
    pa.field("chosen", pa.string()),
    pa.field("rejected", pa.string()),
    pa.field("prompt_length", pa.int64()),
]
OUTCOME_SCHEMA = pa.schema(OUTCOME_FIELDS + PAIR_FIELDS)
# A prepared row, as the RL job reads it.
OUTPUT_SCHEMA = pa.schema([
    pa.field("uid", pa.string()),
    pa.field("messages", MESSAGES),  # the judge prompt
    pa.field("winner", pa.string()),  # model_a | model_b: where the chosen answer is shown
    pa.field("source", pa.string()),
    pa.field("prompt_length", pa.int64()),  # tokens, chat template with the generation prompt
])


@functools.lru_cache(maxsize=2)
def cached_tokenizer(path: str, trust_remote_code: bool) -> Any:
    """One tokenizer per worker process: Ray reuses task workers, so it loads once, not once per batch."""
    from rmr1_ray.models import load_tokenizer  # imports torch and transformers: only where tokenizing

    return load_tokenizer(path, trust_remote_code=trust_remote_code)


def prompt_lengths(tokenizer: Any, conversations: list[list[Message]]) -> list[int]:
    """Tokens of each conversation as the judge reads it: chat template + generation prompt, one batched encode."""
    if not conversations:
        return []
    texts = tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
    # The template already holds the special tokens, so none are added (as apply_chat_template(tokenize=True) does).
    if tokenizer.is_fast:
        return [len(e) for e in tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def parse_batch(batch: pa.Table, *, source: str, kind: str, drop_sources: list[str], tokenizer: str,
                trust_remote_code: bool, prompt_format: str) -> pa.Table:
    """Pass 1: reader rows of one source -> one outcome row each (OUTCOME_SCHEMA)."""
    out = Outcomes(source, PAIR_FIELDS)
    good: list[tuple[str, int, PreferencePair, list[Message]]] = []
    for file, row, record, raw in records(batch):
        # Like RM-R1, drop the excluded subsets first: their rows, even malformed ones, are not part of the mix.
        if isinstance(record, dict) and isinstance(record.get("source"), str) and record["source"] in drop_sources:
            out.add(file, row, DROP, DROPPED_SOURCE, f"source {record['source']!r}")
            continue
        try:
            if isinstance(record, RowError):
                raise record
            pair = parse_record(kind, record)
            reason = filter_reason(pair)
            if reason is None:
                good.append((file, row, pair, render_pair(pair, "A", prompt_format)[0]))
            else:
                out.add(file, row, DROP, reason)
        except RowError as error:
            out.reject(file, row, error, raw)
        except InvalidPairError as error:
            out.reject(file, row, RowError(INVALID_PAIR, str(error)), raw)
    lengths = prompt_lengths(cached_tokenizer(tokenizer, trust_remote_code), [g[3] for g in good])
    for (file, row, pair, _), length in zip(good, lengths, strict=True):
        out.add(file, row, OK, uid=pair_uid(pair), context=list(pair.context), chosen=pair.chosen,
                rejected=pair.rejected, prompt_length=length)
    return out.table()


def render_batch(batch: pa.Table, *, prompt_format: str) -> pa.Table:
    """Pass 2: kept pairs with their `position` -> prepared rows (OUTPUT_SCHEMA)."""
    messages, winners = [], []
    columns = (batch.column(name).to_pylist() for name in ("context", "chosen", "rejected", "position"))
    for context, chosen, rejected, position in zip(*columns, strict=True):
        shown, winner = render_pair(PreferencePair(tuple(context), chosen, rejected), position, prompt_format)
        messages.append(shown)
        winners.append(winner)
    return pa.table({"uid": batch.column("uid"), "messages": pa.array(messages, MESSAGES),
                     "winner": pa.array(winners, pa.string()), "source": batch.column("source"),
                     "prompt_length": batch.column("prompt_length")}, schema=OUTPUT_SCHEMA)


@dataclass
class PreferencePlan:
    splits: dict[str, pa.Table]  # split -> kept pairs (OUTCOME_SCHEMA + position), in file order
    triage: Triage


def parse_options(source: SourceConfig, config: PrepareConfig) -> dict[str, Any]:
    """parse_batch's keyword arguments for one source."""
    assert config.tokenizer is not None  # PrepareConfig requires it when there are sources
    return {"source": source.name, "kind": source.kind, "drop_sources": sorted(source.dropped_sources),
            "tokenizer": config.tokenizer.tokenizer, "trust_remote_code": config.tokenizer.trust_remote_code,
            "prompt_format": config.prompt_format}


def check_tokenizer(config: PrepareConfig) -> None:
    """Load the tokenizer on the driver first, so that a wrong path or a missing chat template fails
    once, here, with a clear message, instead of in every task."""
    assert config.tokenizer is not None  # PrepareConfig requires it when there are sources
    path = config.tokenizer.tokenizer
    try:
        tokenizer = cached_tokenizer(path, config.tokenizer.trust_remote_code)
    except (OSError, ValueError) as exc:  # a missing directory, an unknown hub name, an unknown tokenizer class
        raise ReadError(f"tokenizer {path!r}: cannot load it: {exc}") from None
    if not tokenizer.chat_template:
        raise ReadError(f"tokenizer {path!r} has no chat template, so the judge's prompt length is undefined")


def plan(config: PrepareConfig, concurrency: int) -> PreferencePlan:
    """Read every source, run pass 1 on Ray Data, and decide what is kept, where, and at which position."""
    configure_data_context()
    check_tokenizer(config)
    datasets, reads = [], {}
    for source in config.sources:
        table = read_table(source.path, source.split, source.sample_size, source.seed)
        reads[source.name] = table.num_rows
        logger.info("%s (%s): %d rows from %s", source.name, source.kind, table.num_rows, source.path)
        datasets.append(map_tables(table, parse_batch, config.batch_size, concurrency, **parse_options(source, config)))
    return decide(collect(datasets, OUTCOME_SCHEMA), reads, config)


def decide(outcomes: pa.Table, reads: dict[str, int], config: PrepareConfig) -> PreferencePlan:
    """The driver's part, on uids and lengths: dedup (first wins), length filter, split, balanced positions."""
    result = triage(outcomes, reads)
    ok, stats = result.ok, result.stats
    first = first_occurrences(ok.column("uid").to_pylist())
    fits = pc.less_equal(ok.column("prompt_length"), config.max_prompt_length).to_pylist()
    for name, is_first, fit in zip(ok.column("source").to_pylist(), first, fits, strict=True):
        if not is_first:
            stats[name].dropped[DUPLICATE] += 1
        elif not fit:
            stats[name].dropped[TOO_LONG] += 1
    kept = ok.filter(pa.array([f and fit for f, fit in zip(first, fits, strict=True)], pa.bool_()))

    sides = pa.array([split_of(uid, config.seed, config.val_fraction) for uid in kept.column("uid").to_pylist()],
                     pa.string())
    splits = {}
    for split in SPLITS:
        part = kept.filter(pc.equal(sides, split))
        positions = balanced_positions(part.column("uid").to_pylist(), config.seed)
        splits[split] = part.append_column("position", pa.array(positions, pa.string()))
        for name in part.column("source").to_pylist():
            stats[name].kept[split] += 1
    return PreferencePlan(splits, result)


def write(prepared: PreferencePlan, out_dir: Path, config: PrepareConfig, concurrency: int) -> None:
    """Pass 2: render and write OUT/train and OUT/val."""
    for split, table in prepared.splits.items():
        rendered = map_tables(table, render_batch, config.batch_size, concurrency, prompt_format=config.prompt_format)
        write_parquet(rendered, out_dir / split, OUTPUT_SCHEMA)


def report(prepared: PreferencePlan) -> dict[str, Any]:
    """stats.json's preference section: counts per source and reason, label balance, token lengths."""
    balance = {}
    for split, table in prepared.splits.items():
        a = pc.sum(pc.equal(table.column("position"), "A")).as_py() or 0
        balance[split] = {"model_a": a, "model_b": table.num_rows - a}
    lengths = np.concatenate([t.column("prompt_length").to_numpy() for t in prepared.splits.values()])
    stats = prepared.triage.stats
    return {
        "rows": {"read": sum(s.read for s in stats.values()), **{s: t.num_rows for s, t in prepared.splits.items()}},
        "sources": {name: s.as_dict() for name, s in stats.items()},
        "rejected": total_counts(s.rejected for s in stats.values()),
        "dropped": total_counts(s.dropped for s in stats.values()),
        "label_balance": balance,
        "prompt_length": _percentiles(lengths),
    }


def _percentiles(lengths: np.ndarray) -> dict[str, float] | None:
    if not len(lengths):
        return None
    values = np.percentile(lengths, PERCENTILES)
    return {"min": int(lengths.min()), **{f"p{p}": float(v) for p, v in zip(PERCENTILES, values, strict=True)},
            "max": int(lengths.max()), "mean": round(float(lengths.mean()), 2)}
