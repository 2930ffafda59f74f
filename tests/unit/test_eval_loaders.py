"""Benchmark loaders on the real benchmark samples in shared/benchmarks, and on hand-made bad rows.

Expected counts are computed here from the raw JSON, independently of the loaders. Run with `-s` to
see the per-subset counts of every shared file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rmr1_ray.config.evaluate import BenchmarkSpec
from rmr1_ray.data.readers import ReadError
from rmr1_ray.evaluation.loaders import load_benchmark

pytestmark = pytest.mark.unit

BENCHMARKS = Path(__file__).resolve().parents[3] / "shared" / "benchmarks"
SHARED_FILES = sorted(BENCHMARKS.rglob("*.json")) if BENCHMARKS.is_dir() else []


def kind_of(path: Path) -> str:
    parts = path.relative_to(BENCHMARKS).parts
    return {"rm_bench": "rm_bench", "Pairwise_set": "rmb_pairwise", "BoN_set": "rmb_bon"}[parts[0] if parts[0] == "rm_bench" else parts[1]]


def expected(kind: str, records: list[dict]) -> tuple[str, int]:
    """(subset, comparisons) of one shared file, from its raw records."""
    if kind == "rm_bench":
        return None, 9 * len(records)
    if kind == "rmb_pairwise":
        return records[0]["category_path"], len(records)
    return records[0]["category_path"], sum(len(r["loser_list"]) for r in records)


@pytest.mark.skipif(not SHARED_FILES, reason=f"benchmark samples not found at {BENCHMARKS}")
@pytest.mark.parametrize("path", SHARED_FILES, ids=lambda p: str(p.relative_to(BENCHMARKS)))
def test_loads_every_shared_file(path: Path) -> None:
    kind = kind_of(path)
    loaded = load_benchmark(BenchmarkSpec(name=kind, path=str(path)))
    records = json.loads(path.read_text())
    counts = loaded.counts()
    print(f"\n{path.relative_to(BENCHMARKS)} [{kind}]: {loaded.rows} rows, {len(loaded.rejects)} rejected")
    for subset, n in counts.items():
        print(f"    {subset}: {n['examples']} examples -> {n['comparisons']} comparisons")

    assert loaded.rejects == []
    assert loaded.rows == len(records)
    subset, comparisons = expected(kind, records)
    (got_subset, got), = counts.items()
    assert got == {"examples": len(records), "comparisons": comparisons}
    assert got_subset == (subset or path.stem.removesuffix("_filtered"))
    assert len({c.key for c in loaded.comparisons}) == comparisons


@pytest.mark.skipif(not BENCHMARKS.is_dir(), reason=f"benchmark samples not found at {BENCHMARKS}")
def test_rm_bench_expands_the_style_matrix() -> None:
    path = BENCHMARKS / "rm_bench" / "chat_filtered.json"
    record = json.loads(path.read_text())[0]
    loaded = load_benchmark(BenchmarkSpec(name="rm_bench", path=str(path), max_examples=1))
    cells = {c.style: c for c in loaded.comparisons}
    assert sorted(cells) == [(i, j) for i in range(3) for j in range(3)]
    cell = cells[1, 2]  # chosen detailed-plain vs rejected detailed-markdown
    assert cell.chosen == record["chosen"][1] and cell.rejected == record["rejected"][2]
    assert cell.context == ({"role": "user", "content": record["prompt"]},)
    assert (cell.key, cell.subset, cell.example_id) == (f"rm_bench/chat/{record['id']}/c1r2", "chat", str(record["id"]))


@pytest.mark.skipif(not BENCHMARKS.is_dir(), reason=f"benchmark samples not found at {BENCHMARKS}")
def test_rmb_multi_turn_context_and_bon_groups() -> None:
    path = BENCHMARKS / "rmb" / "BoN_set" / "Harmlessness" / "S6.json"
    records = json.loads(path.read_text())
    multi = next(r for r in records if len(r["conversation_input"]) == 5)
    loaded = load_benchmark(BenchmarkSpec(name="rmb_bon", path=str(path)))
    group = [c for c in loaded.comparisons if c.example_id == multi["bon_uid"]]
    assert len(group) == len(multi["loser_list"])
    assert {c.group for c in group} == {f"BoN_set/Harmlessness/S6/{multi['bon_uid']}"}
    assert [c.rejected for c in group] == [loser["answer"] for loser in multi["loser_list"]]
    assert all(c.chosen == multi["bon_best"]["answer"] for c in group)
    # only role and content survive (RMB adds `language`); turns keep their order
    assert group[0].context == tuple({"role": m["role"], "content": m["content"]} for m in multi["conversation_input"])


@pytest.mark.skipif(not BENCHMARKS.is_dir(), reason=f"benchmark samples not found at {BENCHMARKS}")
def test_directory_equals_its_files_and_max_examples_caps_each_subset() -> None:
    folder = BENCHMARKS / "rmb" / "Pairwise_set"
    whole = load_benchmark(BenchmarkSpec(name="rmb_pairwise", path=str(folder)))
    files = [load_benchmark(BenchmarkSpec(name="rmb_pairwise", path=str(p))) for p in sorted(folder.rglob("*.json"))]
    assert sorted(c.key for c in whole.comparisons) == sorted(c.key for f in files for c in f.comparisons)

    capped = load_benchmark(BenchmarkSpec(name="rmb_pairwise", path=str(folder), max_examples=3))
    assert set(capped.counts()) == set(whole.counts())
    assert all(n == {"examples": 3, "comparisons": 3} for n in capped.counts().values())
    first = {c.subset: c.key for c in reversed(whole.comparisons)}  # the first example of each subset is kept
    assert set(first.values()) <= {c.key for c in capped.comparisons}


def test_rewardbench_rows_from_parquet(tmp_path: Path) -> None:
    rows = [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "subset": "math-prm", "id": 7},
        {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No.", "subset": "alpacaeval-easy", "id": 8},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rb.parquet")
    loaded = load_benchmark(BenchmarkSpec(name="rewardbench", path=str(tmp_path / "rb.parquet")))
    assert loaded.rejects == []
    assert [(c.key, c.subset, c.chosen, c.rejected) for c in loaded.comparisons] == [
        ("rewardbench/math-prm/7", "math-prm", "4", "5"),
        ("rewardbench/alpacaeval-easy/8", "alpacaeval-easy", "Hi!", "No."),
    ]


def test_hub_name_uses_the_benchmark_split(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    asked = {}

    def fake_load_dataset(name: str, split: str) -> datasets.Dataset:
        asked.update(name=name, split=split)
        return datasets.Dataset.from_list([{"prompt": "q", "chosen": "a", "rejected": "b", "subset": "hep-go", "id": 1}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loaded = load_benchmark(BenchmarkSpec(name="rewardbench", path="allenai/reward-bench"))
    assert asked == {"name": "allenai/reward-bench", "split": "filtered"}  # reward-bench's scored split
    assert [c.key for c in loaded.comparisons] == ["rewardbench/hep-go/1"]


GOOD_RM = {"id": 1, "prompt": "p", "chosen": ["a1", "a2", "a3"], "rejected": ["b1", "b2", "b3"], "domain": "chat"}
GOOD_PAIR = {"pair_uid": "p1", "conversation_input": [{"role": "user", "content": "q"}],
             "chosen": {"answer": "good"}, "reject": {"answer": "bad"}, "category_path": "Pairwise_set/Helpfulness/Chat/X"}
GOOD_BON = {"bon_uid": "b1", "conversation_input": [{"role": "user", "content": "q"}], "bon_best": {"answer": "best"},
            "loser_list": [{"answer": "l1"}, {"answer": "l2"}], "category_path": "BoN_set/Harmlessness/S1"}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize(
    ("kind", "good", "bad_rows"),
    [
        ("rm_bench", GOOD_RM, [
            ("{not json", "invalid JSON"),
            ({**GOOD_RM, "id": 2, "chosen": ["a1", "a2"]}, "field 'chosen': expected 3 strings"),
            ({**GOOD_RM, "id": 3, "rejected": ["b1", "a2", "b3"]}, "chosen[1] vs rejected[1]: chosen and rejected are identical"),
            ({**GOOD_RM, "id": 4, "prompt": " "}, "context[0].content: empty"),
            ({k: v for k, v in GOOD_RM.items() if k != "prompt"} | {"id": 5}, "missing field 'prompt'"),
            ({**GOOD_RM}, "duplicate example id '1' in 'chat'"),
            ("[1, 2]", "a row must be an object"),
        ]),
        ("rmb_pairwise", GOOD_PAIR, [
            ({**GOOD_PAIR, "pair_uid": "p2", "reject": "bad"}, "field 'reject': expected an object with an 'answer'"),
            ({**GOOD_PAIR, "pair_uid": "p3", "chosen": {"llm_name": "x"}}, "field 'chosen': missing field 'answer'"),
            ({**GOOD_PAIR, "pair_uid": "p4", "category_path": "Pairwise_set/Other"}, "does not name a goal"),
            ({**GOOD_PAIR, "pair_uid": "p5", "conversation_input": [{"role": "assistant", "content": "q"}]}, "role 'assistant'"),
            ({**GOOD_PAIR, "pair_uid": True}, "field 'pair_uid': expected a string or integer id"),
        ]),
        ("rmb_bon", GOOD_BON, [
            ({**GOOD_BON, "bon_uid": "b2", "loser_list": []}, "field 'loser_list': expected a non-empty list"),
            ({**GOOD_BON, "bon_uid": "b3", "loser_list": [{"answer": "l1"}, {"answer": "best"}]},
             "bon_best vs loser_list[1]: chosen and rejected are identical"),
            ({**GOOD_BON, "bon_uid": "b4", "loser_list": [{"answer": 3}]}, "field 'loser_list[0]': field 'answer': expected a string"),
        ]),
    ],
    ids=["rm_bench", "rmb_pairwise", "rmb_bon"],
)  # fmt: skip
def test_bad_rows_are_skipped_counted_and_explained(tmp_path: Path, kind: str, good: dict, bad_rows: list) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [good, *(row for row, _ in bad_rows), good | {"note": "after"}])
    loaded = load_benchmark(BenchmarkSpec(name=kind, path=str(path)))
    assert loaded.rows == len(bad_rows) + 2
    assert sum(loaded.examples.values()) == 1  # the good row; its copy at the end is a duplicate
    assert [r.row for r in loaded.rejects] == list(range(2, len(bad_rows) + 3))  # line numbers, in order
    for reject, (_, reason) in zip(loaded.rejects, [*bad_rows, (None, "duplicate example id")], strict=True):
        assert reject.file == str(path) and reject.benchmark == kind
        assert reason in reject.reason, reject.reason
    assert loaded.reject_fraction == pytest.approx(len(loaded.rejects) / loaded.rows)


def test_keys_shared_across_sources_are_duplicates(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD_PAIR])
    seen: set[str] = set()
    first = load_benchmark(BenchmarkSpec(name="rmb_pairwise", path=str(path)), seen)
    again = load_benchmark(BenchmarkSpec(name="rmb_pairwise", path=str(tmp_path)), seen)
    assert len(first.comparisons) == 1 and again.comparisons == []
    assert "duplicate example id 'p1'" in again.rejects[0].reason


def test_unreadable_source_fails_loudly(tmp_path: Path) -> None:
    with pytest.raises(ReadError, match="no such file"):
        load_benchmark(BenchmarkSpec(name="rm_bench", path=str(tmp_path / "missing.json")))
