"""Teacher chains -> SFT rows, with Ray Data (same reading, outcome and reject rules as the preference mix).

A chain file is JSON lines from the chain generator, one object per line:
  {"uid": str, "messages": [judge prompt messages], "winner": "model_a"|"model_b",
   "chain": str (the teacher's whole judgement), "source": str, "pass": 1|2}
A chain is kept when its messages are a well-formed judge prompt, its verdict (RM-R1's
eval_verdict) matches the winner, and (unless require_valid_format is off) it follows the
chain-of-rubrics format. Rows are split by uid with the preference split rule, so a pair's
chains land on the same side as the pair itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from rmr1_ray.config.prepare import PrepareConfig
from rmr1_ray.data.outcomes import (
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
from rmr1_ray.data.pipeline import (
    collect,
    configure_data_context,
    map_tables,
    split_of,
    to_dataset,
    write_parquet,
)
from rmr1_ray.data.readers import read_table
from rmr1_ray.data.sources import (
    MISSING_FIELD,
    WRONG_ROLES,
    WRONG_TYPE,
    RowError,
    check_turns,
    messages_field,
    text_field,
)
from rmr1_ray.verdict import eval_verdict, parse_judgement

logger = logging.getLogger(__name__)

BAD_LABEL = "bad label"
WRONG_VERDICT = "wrong verdict"
INVALID_FORMAT = "invalid format"
VERDICT_OF = {"model_a": "A", "model_b": "B"}
SPLITS = ("train", "val")

CHAIN_FIELDS = [
    pa.field("uid", pa.string()),
    pa.field("messages", MESSAGES),
    pa.field("response", pa.string()),
    pa.field("winner", pa.string()),
    pa.field("verdict", pa.string()),
    pa.field("origin", pa.string()),  # the row's own `source` (the preference dataset), else the chain source's name
    pa.field("key", pa.string()),  # hash of (uid, messages, chain): equal keys are exact duplicates
]
OUTCOME_SCHEMA = pa.schema(OUTCOME_FIELDS + CHAIN_FIELDS)
OUTPUT_COLUMNS = ["uid", "messages", "response", "winner", "verdict", "source"]
OUTPUT_SCHEMA = pa.schema([
    pa.field("uid", pa.string()),
    pa.field("messages", MESSAGES),  # the judge prompt
    pa.field("response", pa.string()),  # the teacher's chain: the SFT target
    pa.field("winner", pa.string()),
    pa.field("verdict", pa.string()),  # A | B, the chain's verdict (matches winner)
    pa.field("source", pa.string()),
])


def parse_chain(record: Any, require_valid_format: bool) -> dict[str, Any]:
    """A chain record -> the SFT row's fields; RowError when it is malformed or judges wrongly."""
    if not isinstance(record, dict):
        raise RowError(WRONG_TYPE, f"a row must be an object with named fields, got {type(record).__name__}")
    uid = text_field(record, "uid")
    if not uid.strip():
        raise RowError(MISSING_FIELD, "field 'uid' is empty")
    messages = messages_field(record, "messages", roles=("system", "user", "assistant"))
    start = 1 if messages[0]["role"] == "system" else 0
    if start == len(messages):
        raise RowError(WRONG_ROLES, "field 'messages': no user message after the system message")
    check_turns(messages[start:], "messages", last="user", start=start)
    winner = text_field(record, "winner")
    if winner not in VERDICT_OF:
        raise RowError(BAD_LABEL, f"field 'winner': {winner!r} is not 'model_a' or 'model_b'")
    chain = text_field(record, "chain")
    origin = record.get("source")
    if origin is not None and not isinstance(origin, str):
        raise RowError(WRONG_TYPE, f"field 'source': expected a string, got {type(origin).__name__}")
    verdict = eval_verdict(chain)
    if verdict != VERDICT_OF[winner]:
        raise RowError(WRONG_VERDICT, f"wrong verdict: the chain's verdict is {verdict!r}, the winner is {winner}")
    if require_valid_format:
        judgement = parse_judgement(chain)
        if not judgement.format_valid:
            raise RowError(INVALID_FORMAT, f"invalid format: {', '.join(judgement.missing)}")
    key = hashlib.blake2b(json.dumps([uid, messages, chain], ensure_ascii=False).encode("utf-8", "surrogatepass"),
                          digest_size=16).hexdigest()
    return {"uid": uid, "messages": messages, "response": chain, "winner": winner, "verdict": verdict,
            "origin": origin, "key": key}


def parse_chain_batch(batch: pa.Table, *, source: str, require_valid_format: bool) -> pa.Table:
    """Reader rows of one chain file -> one outcome row each (OUTCOME_SCHEMA)."""
    out = Outcomes(source, CHAIN_FIELDS)
    for file, row, record, raw in records(batch):
        try:
            if isinstance(record, RowError):
                raise record
            fields = parse_chain(record, require_valid_format)
        except RowError as error:
            out.reject(file, row, error, raw)
            continue
        out.add(file, row, OK, **{**fields, "origin": fields["origin"] or source})
    return out.table()


@dataclass
class SftPlan:
    splits: dict[str, pa.Table]  # split -> SFT rows (OUTPUT_SCHEMA), in file order
    triage: Triage


def plan(config: PrepareConfig, concurrency: int) -> SftPlan:
    """Read every chain source, validate in parallel, and decide (driver) what is kept and on which side."""
    configure_data_context()
    datasets, reads = [], {}
    for source in config.chain_sources:
        table = read_table(source.path)
        reads[source.name] = table.num_rows
        logger.info("%s (chains): %d rows from %s", source.name, table.num_rows, source.path)
        datasets.append(map_tables(table, parse_chain_batch, config.batch_size, concurrency,
                                   source=source.name, require_valid_format=config.require_valid_format))
    result = triage(collect(datasets, OUTCOME_SCHEMA), reads)

    ok, stats = result.ok, result.stats
    first = first_occurrences(ok.column("key").to_pylist())
    for name, is_first in zip(ok.column("source").to_pylist(), first, strict=True):
        if not is_first:
            stats[name].dropped[DUPLICATE] += 1
    kept = ok.filter(pa.array(first, pa.bool_()))
    sides = pa.array([split_of(uid, config.seed, config.val_fraction) for uid in kept.column("uid").to_pylist()],
                     pa.string())
    splits = {}
    for split in SPLITS:
        part = kept.filter(pc.equal(sides, split))
        for name in part.column("source").to_pylist():
            stats[name].kept[split] += 1
        rows = part.drop_columns(["source"]).rename_columns({"origin": "source"})
        splits[split] = rows.select(OUTPUT_COLUMNS).cast(OUTPUT_SCHEMA)
    return SftPlan(splits, result)


def write(prepared: SftPlan, out_dir: Path, concurrency: int) -> None:
    """Write OUT/sft/train and OUT/sft/val."""
    for split, table in prepared.splits.items():
        write_parquet(to_dataset(table, concurrency), out_dir / split, OUTPUT_SCHEMA)


def report(prepared: SftPlan) -> dict[str, Any]:
    """stats.json's sft section: counts per chain source and reason, verdict balance."""
    stats = prepared.triage.stats
    return {
        "rows": {"read": sum(s.read for s in stats.values()), **{s: t.num_rows for s, t in prepared.splits.items()}},
        "sources": {name: s.as_dict() for name, s in stats.items()},
        "rejected": total_counts(s.rejected for s in stats.values()),
        "dropped": total_counts(s.dropped for s in stats.values()),
        "label_balance": {split: _balance(t) for split, t in prepared.splits.items()},
    }


def _balance(table: pa.Table) -> dict[str, int]:
    a = pc.sum(pc.equal(table.column("winner"), "model_a")).as_py() or 0
    return {"model_a": a, "model_b": table.num_rows - a}
