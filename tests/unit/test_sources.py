"""Data preparation without Ray: source adapters, readers, outcome counting, splits, chains, the config."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rmr1_ray.config import ConfigError, load_config
from rmr1_ray.config.prepare import PrepareConfig
from rmr1_ray.data import readers, sources
from rmr1_ray.data.outcomes import (
    DROP,
    OK,
    REJECT,
    SourceStats,
    first_occurrences,
    over_threshold,
    records,
    triage,
)
from rmr1_ray.data.pipeline import split_of
from rmr1_ray.data.samples import code_pref_rows, math_step_dpo_rows, pairwise_rows, skywork_rows
from rmr1_ray.data.sft import parse_chain
from rmr1_ray.data.sources import RowError, filter_reason, pair_uid, parse_record
from rmr1_ray.prompts import PreferencePair
from rmr1_ray.synthetic import generate_items, reasoning_chain

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def reason_of(kind, record):
    with pytest.raises(RowError) as info:
        parse_record(kind, record)
    return info.value.reason, info.value.detail


# --- adapters -----------------------------------------------------------------------------------


def test_skywork_single_and_multi_turn():
    single = parse_record("skywork", {"chosen": [user("q"), bot("good")], "rejected": [user("q"), bot("bad")],
                                      "source": "helpsteer2"})
    assert single == PreferencePair((user("q"),), "good", "bad") and not single.is_multi_turn
    turns = [user("q"), bot("a"), user("q2")]
    multi = parse_record("skywork", {"chosen": [*turns, bot("good")], "rejected": [*turns, bot("bad")]})
    assert multi.context == tuple(turns) and multi.is_multi_turn and multi.chosen == "good"


def test_skywork_keeps_only_role_and_content():
    pair = parse_record("skywork", {"chosen": [{**user("q"), "name": "x"}, bot("good")], "rejected": [user("q"), bot("bad")]})
    assert pair.context == (user("q"),)


@pytest.mark.parametrize(("record", "reason", "names"), [
    ({"rejected": [user("q"), bot("b")]}, sources.MISSING_FIELD, "'chosen'"),
    ({"chosen": None, "rejected": [user("q"), bot("b")]}, sources.MISSING_FIELD, "'chosen'"),
    ({"chosen": "text", "rejected": [user("q"), bot("b")]}, sources.WRONG_TYPE, "'chosen'"),
    ({"chosen": [user("q"), "hi"], "rejected": [user("q"), bot("b")]}, sources.WRONG_TYPE, "message 1"),
    ({"chosen": [user("q"), {"role": "assistant"}], "rejected": [user("q"), bot("b")]}, sources.MISSING_FIELD, "content"),
    ({"chosen": [user("q"), {"role": "assistant", "content": 3}], "rejected": [user("q"), bot("b")]},
     sources.WRONG_TYPE, "message 1"),
    ({"chosen": [user("q"), user("a")], "rejected": [user("q"), bot("b")]}, sources.WRONG_ROLES, "message 1"),
    ({"chosen": [bot("a"), bot("a")], "rejected": [user("q"), bot("b")]}, sources.WRONG_ROLES, "message 0"),
    ({"chosen": [user("q")], "rejected": [user("q"), bot("b")]}, sources.WRONG_ROLES, "last message"),
    ({"chosen": [{"role": "system", "content": "s"}, user("q"), bot("a")], "rejected": [user("q"), bot("b")]},
     sources.WRONG_ROLES, "'system'"),
    ({"chosen": [], "rejected": [user("q"), bot("b")]}, sources.WRONG_ROLES, "no messages"),
    ({"chosen": [user("q"), bot("a")], "rejected": [user("other q"), bot("b")]}, sources.QUESTION_DIFFERS, "differ"),
    ({"chosen": [user(" "), bot("a")], "rejected": [user(" "), bot("b")]}, sources.EMPTY_MESSAGE, "message 0"),
])
def test_skywork_rejects_name_the_field(record, reason, names):
    got_reason, detail = reason_of("skywork", record)
    assert got_reason == reason
    assert names in detail


def test_code_pref():
    pair = parse_record("code_pref", {"input": "sort a list", "accepted": "sorted(x)", "rejected": "x.sort"})
    assert pair == PreferencePair((user("sort a list"),), "sorted(x)", "x.sort")
    assert reason_of("code_pref", {"input": "q", "rejected": "b"}) == (sources.MISSING_FIELD, "missing field 'accepted'")
    assert reason_of("code_pref", {"input": ["q"], "accepted": "a", "rejected": "b"})[0] == sources.WRONG_TYPE


def test_math_step_dpo_answers_are_prefix_plus_full():
    record = {"prompt": "1+1?", "initial_reason_steps": "Step 1: add.\n", "full_chosen": "2", "full_rejected": "3"}
    pair = parse_record("math_step_dpo", record)
    assert (pair.chosen, pair.rejected) == ("Step 1: add.\n2", "Step 1: add.\n3")
    assert reason_of("math_step_dpo", {**record, "initial_reason_steps": 5})[0] == sources.WRONG_TYPE


@pytest.mark.parametrize("record", [
    {"prompt": "q", "chosen": "a", "rejected": "b"},
    {"prompt": [user("q")], "chosen": "a", "rejected": "b"},
    {"prompt": "q", "chosen": [bot("a")], "rejected": [bot("b")]},
    {"prompt": [user("q")], "chosen": [user("q"), bot("a")], "rejected": [user("q"), bot("b")]},
])
def test_pairwise_shapes_give_one_pair(record):
    assert parse_record("pairwise", record) == PreferencePair((user("q"),), "a", "b")


def test_pairwise_rejects():
    assert reason_of("pairwise", {"prompt": "q", "chosen": [user("other"), bot("a")], "rejected": "b"})[0] == \
        sources.QUESTION_DIFFERS
    assert reason_of("pairwise", {"prompt": [user("q"), bot("x")], "chosen": "a", "rejected": "b"})[0] == sources.WRONG_ROLES
    assert reason_of("pairwise", {"prompt": "q", "chosen": [user("a")], "rejected": "b"})[0] == sources.WRONG_ROLES
    assert reason_of("pairwise", {"prompt": 7, "chosen": "a", "rejected": "b"}) == (
        sources.WRONG_TYPE, "field 'prompt': expected a string or a list of messages, got int")
    assert reason_of("pairwise", ["q", "a", "b"])[0] == sources.WRONG_TYPE


@pytest.mark.parametrize(("rows", "kind"), [(skywork_rows, "skywork"), (code_pref_rows, "code_pref"),
                                            (math_step_dpo_rows, "math_step_dpo"), (pairwise_rows, "pairwise")])
def test_sample_rows_parse(rows, kind):
    pairs = [parse_record(kind, r) for r in rows(12, seed=3)]
    assert all(filter_reason(p) is None for p in pairs)
    for p in pairs:
        p.validate()


def test_filters_and_uid():
    pair = PreferencePair((user("q"),), "a", "b")
    assert filter_reason(pair) is None
    assert filter_reason(PreferencePair((user("q"),), " ", "b")) == sources.EMPTY_ANSWER
    assert filter_reason(PreferencePair((user("q"),), "a", "a")) == sources.IDENTICAL_ANSWERS
    assert pair_uid(pair) == pair_uid(PreferencePair([user("q")], "a", "b"))
    others = [PreferencePair((user("q"),), "b", "a"), PreferencePair((user("q "),), "a", "b"),
              PreferencePair((user("q"), bot("a"), user("q")), "a", "b")]
    assert len({pair_uid(p) for p in [pair, *others]}) == 4


# --- readers ------------------------------------------------------------------------------------


def test_jsonl_keeps_bad_lines_with_line_numbers(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": 2\n[1, 2]\n\xff\xfe\n{"a": 3}\n')
    table = readers.read_table(str(path))
    assert table.column(readers.ROW).to_pylist() == [1, 3, 4, 5, 6]
    got = [(row, r.reason if isinstance(r, RowError) else r) for _, row, r, _ in records(table)]
    assert got == [(1, {"a": 1}), (3, sources.INVALID_JSON), (4, [1, 2]), (5, sources.INVALID_JSON), (6, {"a": 3})]


def test_json_array_parquet_and_directory(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(5)]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.json").write_text(json.dumps(rows[:2]))
    (tmp_path / "d" / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[2:]))
    table = readers.read_table(str(tmp_path / "d"))
    assert [(Path(f).name, n) for f, n, _, _ in records(table)] == [("a.json", 1), ("a.json", 2), ("b.jsonl", 1),
                                                                      ("b.jsonl", 2), ("b.jsonl", 3)]
    assert [r for _, _, r, _ in records(table)] == rows
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    table = readers.read_table(str(tmp_path / "p.parquet"))
    assert [(n, r) for _, n, r, _ in records(table)] == list(enumerate(rows, start=1))


def test_reader_errors(tmp_path):
    with pytest.raises(readers.ReadError, match="no such file"):
        readers.read_table(str(tmp_path / "missing.jsonl"))
    (tmp_path / "broken.json").write_text('[{"a": 1},')
    with pytest.raises(readers.ReadError, match="broken.json: not valid JSON"):
        readers.read_table(str(tmp_path / "broken.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(readers.ReadError, match="holds no"):
        readers.read_table(str(tmp_path / "empty"))


def test_hub_names_go_to_datasets_with_split(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"input": f"q{i}", "accepted": "a", "rejected": "b"} for i in range(5)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    table = readers.read_table("Vezora/Code-Preference-Pairs", split="train", sample_size=3, seed=42)
    assert calls == [("Vezora/Code-Preference-Pairs", "train")]
    assert set(table.column(readers.FILE).to_pylist()) == {"Vezora/Code-Preference-Pairs[train]"}
    assert [r["input"] for _, _, r, _ in records(table)] == [f"q{n - 1}" for n in table.column(readers.ROW).to_pylist()]


def test_sample_is_datasets_shuffle_select(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"input": f"q{i}", "accepted": "a", "rejected": "b"} for i in range(50)]
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = readers.read_table(str(path), sample_size=8, seed=42)
    expected = datasets.Dataset.from_list(rows).shuffle(seed=42).select(range(8))["input"]
    assert sorted(r["input"] for _, _, r, _ in records(table)) == sorted(expected)
    assert table.column(readers.ROW).to_pylist() == sorted(int(q[1:]) + 1 for q in expected)


# --- outcomes, splits ---------------------------------------------------------------------------


def test_triage_orders_and_counts():
    schema = pa.schema([("source", pa.string()), ("file", pa.string()), ("row", pa.int64()), ("status", pa.string()),
                        ("reason", pa.string()), ("detail", pa.string()), ("raw", pa.string())])
    rows = [("b", "f", 2, OK, None), ("a", "f", 3, REJECT, "wrong type"), ("a", "f", 1, OK, None),
            ("b", "f", 1, DROP, "empty answer"), ("a", "f", 2, REJECT, "wrong type")]
    table = pa.Table.from_pylist([dict(zip(["source", "file", "row", "status", "reason"], r, strict=True)) for r in rows],
                                 schema=schema)
    result = triage(table, {"a": 3, "b": 2})
    assert [(r["source"], r["row"]) for r in result.ok.to_pylist()] == [("a", 1), ("b", 2)]
    assert [(r["source"], r["row"], r["reason"]) for r in result.rejects] == [("a", 2, "wrong type"), ("a", 3, "wrong type")]
    assert result.stats["a"].rejected == {"wrong type": 2} and result.stats["b"].dropped == {"empty answer": 1}
    assert first_occurrences(["x", "y", "x", "z", "y"]) == [True, True, False, True, False]


def test_over_threshold_names_the_worst_source():
    stats = {"good": SourceStats(read=100), "bad": SourceStats(read=10), "worse": SourceStats(read=10)}
    stats["good"].rejected["invalid JSON"] = 1
    stats["bad"].rejected["missing field"] = 2
    stats["worse"].rejected["wrong roles"] = 5
    assert over_threshold(stats, 0.5) is None
    message = over_threshold(stats, 0.1)
    assert message.startswith("source 'worse' rejected 5 of 10 rows") and "wrong roles: 5" in message
    assert "also over: bad" in message and "rejects.jsonl" in message


def test_split_is_a_function_of_uid_and_seed():
    uids = [f"{i:032x}" for i in range(4000)]
    sides = [split_of(u, 0, 0.1) for u in uids]
    assert sides == [split_of(u, 0, 0.1) for u in uids]
    assert 300 < sides.count("val") < 500
    assert sides != [split_of(u, 1, 0.1) for u in uids]
    assert {split_of(u, 0, 0.0) for u in uids} == {"train"}


# --- chains (SFT) -------------------------------------------------------------------------------


def chain_record(**changes):
    item = next(generate_items(1, seed=0))
    record = {"uid": "u1", "messages": [{"role": "system", "content": "judge"}, user(item.question)],
              "winner": "model_a", "chain": reasoning_chain(item, "A"), "source": "skywork", "pass": 1}
    return {**record, **changes}


def test_chain_ok():
    fields = parse_chain(chain_record(), require_valid_format=True)
    assert (fields["uid"], fields["winner"], fields["verdict"], fields["origin"]) == ("u1", "model_a", "A", "skywork")


@pytest.mark.parametrize(("changes", "reason"), [
    ({"winner": "model_b"}, "wrong verdict"),
    ({"chain": "I think A. <answer>[[A]]</answer>"}, "invalid format"),
    ({"winner": "A"}, "bad label"),
    ({"messages": [user("q"), bot("a")]}, sources.WRONG_ROLES),
    ({"messages": [{"role": "system", "content": "judge"}]}, sources.WRONG_ROLES),
    ({"messages": "q"}, sources.WRONG_TYPE),
    ({"uid": None}, sources.MISSING_FIELD),
    ({"source": 3}, sources.WRONG_TYPE),
])
def test_chain_rejects(changes, reason):
    with pytest.raises(RowError) as info:
        parse_chain(chain_record(**changes), require_valid_format=True)
    assert info.value.reason == reason


def test_chain_format_check_can_be_off():
    record = chain_record(chain="I think A. <answer>[[A]]</answer>")
    with pytest.raises(RowError, match=r"invalid format: <type>"):
        parse_chain(record, require_valid_format=True)
    assert parse_chain(record, require_valid_format=False)["verdict"] == "A"


# --- config -------------------------------------------------------------------------------------


def test_prepare_config_rules():
    with pytest.raises(ConfigError, match="nothing to do"):
        load_config(PrepareConfig, None, [])
    with pytest.raises(ConfigError, match="tokenizer.path"):
        load_config(PrepareConfig, None, ["sources=[{name: s, kind: pairwise, path: x.jsonl}]"])
    with pytest.raises(ConfigError, match="unique"):
        load_config(PrepareConfig, None, ["chain_sources=[{name: s, path: a}, {name: s, path: b}]"])
    with pytest.raises(ConfigError, match="sources.0.kind"):
        load_config(PrepareConfig, None, ["tokenizer.path=t", "sources=[{name: s, kind: csv, path: x}]"])
    config = load_config(PrepareConfig, None, ["tokenizer.path=t", "sources=[{name: s, kind: skywork, path: x},"
                                               "{name: c, kind: code_pref, path: y}]"])
    assert config.sources[0].dropped_sources == {"magpie_ultra"} and config.sources[1].dropped_sources == set()


def test_shipped_prepare_configs_load():
    instruct = load_config(PrepareConfig, REPO / "configs/rm-r1/prepare.yaml")
    assert [s.path for s in instruct.sources] == ["Skywork/Skywork-Reward-Preference-80K-v0.2",
                                                  "Vezora/Code-Preference-Pairs", "xinlai/Math-Step-DPO-10K"]
    assert (instruct.sources[1].sample_size, instruct.sources[1].seed) == (8000, 42)
    assert (instruct.prompt_format, instruct.max_prompt_length) == ("instruct", 4096)
    distilled = load_config(PrepareConfig, REPO / "configs/rm-r1/prepare-distilled.yaml")
    assert distilled.prompt_format == "distilled" and distilled.sources == instruct.sources
    tiny = load_config(PrepareConfig, REPO / "configs/tiny-cpu/prepare.yaml")
    assert {s.kind for s in tiny.sources} == {"skywork", "code_pref", "math_step_dpo", "pairwise"}
