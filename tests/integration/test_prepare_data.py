"""`rmr1 prepare` end to end on a local Ray cluster: every source schema, bad rows, the reject threshold, SFT chains."""

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from jobs.prepare_data import main
from rmr1_ray.data.pipeline import split_of
from rmr1_ray.data.samples import (
    code_pref_rows,
    math_step_dpo_rows,
    pairwise_rows,
    skywork_rows,
    write_json,
    write_jsonl,
    write_parquet,
)
from rmr1_ray.data.sources import pair_uid, parse_record
from rmr1_ray.models import load_tokenizer
from rmr1_ray.prompts import render_pair
from rmr1_ray.ray_utils import init_ray
from rmr1_ray.synthetic import generate_items, reasoning_chain
from rmr1_ray.tiny import make_tiny

pytestmark = pytest.mark.integration

MAX_PROMPT = 1024


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    started_here = not ray.is_initialized()
    init_ray("local", num_cpus=2)
    yield
    if started_here:
        ray.shutdown()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return str(make_tiny(tmp_path_factory.mktemp("tiny"), seed=0))


def run(tmp_path: Path, name: str, **config) -> tuple[int, Path]:
    out = tmp_path / name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(out), "batch_size": 16, **config}))
    return main(["--config", str(path)]), out


def read_split(directory: Path) -> list[dict]:
    return pq.read_table(directory).to_pylist()


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


# --- the four schemas ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    """Files in each schema; returns (sources config, expected pairs by uid, expected counts)."""
    root = tmp_path_factory.mktemp("mix")
    sky = skywork_rows(30, seed=1)  # rows 4, 9, ... are magpie_ultra (dropped); every 4th is multi-turn
    long_answer = " ".join(["word"] * 3000)
    sky_extra = [
        sky[0],  # exact duplicate
        {"chosen": [user("same?"), bot("x")], "rejected": [user("same?"), bot("x")], "source": "helpsteer2"},
        {"chosen": [user("empty?"), bot("  ")], "rejected": [user("empty?"), bot("x")], "source": "helpsteer2"},
        {"chosen": [user("long?"), bot(long_answer)], "rejected": [user("long?"), bot("short")], "source": "helpsteer2"},
    ]
    code = code_pref_rows(40, seed=2)
    math = math_step_dpo_rows(20, seed=3)
    pair = pairwise_rows(21, seed=4)
    pair.append({"prompt": sky[1]["chosen"][0]["content"], "chosen": sky[1]["chosen"][1]["content"],
                 "rejected": sky[1]["rejected"][1]["content"]})  # the same pair as skywork row 2: a cross-source duplicate
    sources = [
        {"name": "sky", "kind": "skywork", "path": str(write_jsonl(root / "sky.jsonl", sky + sky_extra))},
        {"name": "code", "kind": "code_pref", "path": str(write_jsonl(root / "code.jsonl", code)),
         "sample_size": 25, "seed": 42},
        {"name": "math", "kind": "math_step_dpo", "path": str(write_parquet(root / "math.parquet", math))},
        {"name": "pair", "kind": "pairwise", "path": str(write_json(root / "pair.json", pair))},
    ]
    # datasets' shuffle(seed=42).select(range(25)), as RM-R1 samples (test_sources checks the equivalence)
    sampled_code = [code[i] for i in np.random.default_rng(42).permutation(len(code))[:25]]
    kept = [r for r in sky if r["source"] != "magpie_ultra"]
    pairs = {}
    for kind, records in (("skywork", kept), ("code_pref", sampled_code), ("math_step_dpo", math), ("pairwise", pair)):
        for record in records:
            p = parse_record(kind, record)
            pairs.setdefault(pair_uid(p), p)
    counts = {
        "sky": {"read": 34, "kept": 24, "dropped": {"dropped source": 6, "duplicate": 1, "identical answers": 1,
                                                    "empty answer": 1, "too long": 1}},
        "code": {"read": 25, "kept": 25, "dropped": {}},
        "math": {"read": 20, "kept": 20, "dropped": {}},
        "pair": {"read": 22, "kept": 21, "dropped": {"duplicate": 1}},
    }
    return sources, pairs, counts


def test_all_schemas_rows_labels_balance_splits_stats(tmp_path, tokenizer_dir, mix, capsys):
    sources, pairs, counts = mix
    config = {"tokenizer": {"path": tokenizer_dir}, "sources": sources, "max_prompt_length": MAX_PROMPT,
              "val_fraction": 0.2, "seed": 3}
    rc, out = run(tmp_path, "instruct", **config)
    assert rc == 0
    train, val = read_split(out / "train"), read_split(out / "val")
    rows = train + val
    uids = [r["uid"] for r in rows]
    assert len(rows) == len(set(uids)) == len(pairs) == 90
    assert set(uids) == set(pairs)
    assert {r["uid"] for r in train}.isdisjoint(r["uid"] for r in val)
    assert all(split_of(r["uid"], 3, 0.2) == "train" for r in train) and all(split_of(r["uid"], 3, 0.2) == "val" for r in val)

    tokenizer = load_tokenizer(tokenizer_dir)
    for r in rows:
        # the label says where the chosen answer is shown, and the prompt is exactly the instruct rendering
        position = "A" if r["winner"] == "model_a" else "B"
        messages, winner = render_pair(pairs[r["uid"]], position, "instruct")
        assert (r["messages"], r["winner"]) == (messages, winner)
        # the length measured (with the chosen answer as A) is the length of the prompt as written
        assert r["prompt_length"] == len(tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
        assert r["prompt_length"] <= MAX_PROMPT
    assert any(r["messages"][1]["content"].startswith("[The Start of the Conversation") for r in rows)  # multi-turn
    assert Counter(r["source"] for r in rows) == {name: c["kept"] for name, c in counts.items()}

    stats = json.loads((out / "stats.json").read_text())["preference"]
    for split, split_rows in (("train", train), ("val", val)):
        balance = Counter(r["winner"] for r in split_rows)
        assert abs(balance["model_a"] - balance["model_b"]) <= 1
        assert stats["label_balance"][split] == {"model_a": balance["model_a"], "model_b": balance["model_b"]}
    for name, expected in counts.items():
        got = stats["sources"][name]
        assert (got["read"], got["kept"], got["dropped"], got["rejected"]) == (
            expected["read"], expected["kept"], expected["dropped"], {})
    assert stats["rows"] == {"read": 101, "train": len(train), "val": len(val)}
    lengths = sorted(r["prompt_length"] for r in rows)
    assert (stats["prompt_length"]["min"], stats["prompt_length"]["max"]) == (lengths[0], lengths[-1])
    assert (out / "rejects.jsonl").read_text() == ""
    assert (out / "config.resolved.yaml").exists()
    printed = capsys.readouterr().out
    assert "prepared 101 rows" in printed and "label balance" in printed

    # Same seed, other format: the same rows, labels and splits; only the messages change.
    rc, distilled_out = run(tmp_path, "distilled", **config, prompt_format="distilled")
    assert rc == 0
    distilled = {r["uid"]: r for r in read_split(distilled_out / "train") + read_split(distilled_out / "val")}
    assert {u: (r["winner"], split_of(u, 3, 0.2)) for u, r in distilled.items()} == \
        {r["uid"]: (r["winner"], split_of(r["uid"], 3, 0.2)) for r in rows}
    sample = next(iter(distilled.values()))
    assert [m["role"] for m in sample["messages"]] == ["user"]
    assert sample["messages"][0]["content"].startswith("Please act as an impartial judge")


# --- bad rows -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def salted(tmp_path_factory):
    """A Skywork-style JSONL file: 100 good rows and 11 bad ones (~10%) at known lines, plus a blank line."""
    good = skywork_rows(100, seed=7)
    q = [user("q")]
    bad = [
        ('{"chosen": [{"role": "user", "content": "q"}', "invalid JSON"),
        ({"chosen": q + [bot("a")]}, "missing field"),
        ({"chosen": q + [bot("a")], "rejected": None}, "missing field"),
        ({"chosen": "q a", "rejected": q + [bot("b")]}, "wrong type"),
        ([1, 2, 3], "wrong type"),
        ({"chosen": q + [{"role": "assistant", "content": 7}], "rejected": q + [bot("b")]}, "wrong type"),
        ({"chosen": [bot("a"), user("q")], "rejected": q + [bot("b")]}, "wrong roles"),
        ({"chosen": [{"role": "system", "content": "s"}, *q, bot("a")], "rejected": q + [bot("b")]}, "wrong roles"),
        ({"chosen": q + [bot("a")], "rejected": [user("another q"), bot("b")]}, "question differs"),
        ({"chosen": [user(""), bot("a")], "rejected": [user(""), bot("b")]}, "empty message"),
        (b'{"chosen": "\xff"}', "invalid JSON"),
    ]
    lines: list[bytes] = []
    expected = []
    for i, row in enumerate(good):
        lines.append(json.dumps(row).encode())
        if i % 9 == 4 and bad:
            record, reason = bad.pop(0)
            if isinstance(record, bytes):
                lines.append(record)
            else:
                lines.append((record if isinstance(record, str) else json.dumps(record)).encode())
            expected.append((len(lines), reason))
        if i == 50:
            lines.append(b"   ")  # blank lines are skipped, but still counted in row numbers
    assert not bad
    path = tmp_path_factory.mktemp("salted") / "salted.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    good_uids = {pair_uid(parse_record("skywork", r)) for r in good}
    return path, expected, good_uids


def test_bad_rows_are_rejected_with_reason_and_row_and_good_rows_kept(tmp_path, tokenizer_dir, salted):
    path, expected, good_uids = salted
    source = {"name": "salted", "kind": "skywork", "path": str(path), "drop_sources": []}
    rc, out = run(tmp_path, "salted", tokenizer={"path": tokenizer_dir}, sources=[source], max_reject_fraction=0.15)
    assert rc == 0
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["source"], r["file"], r["row"], r["reason"]) for r in rejects] == [
        ("salted", str(path), row, reason) for row, reason in expected]
    assert all(r["detail"] and r["raw"] for r in rejects)
    lines = path.read_bytes().split(b"\n")
    assert all(r["raw"] == lines[r["row"] - 1].decode("utf-8", "replace") for r in rejects)
    kept = {r["uid"] for r in read_split(out / "train") + read_split(out / "val")}
    assert kept == good_uids
    stats = json.loads((out / "stats.json").read_text())["preference"]["sources"]["salted"]
    assert stats["rejected"] == dict(Counter(reason for _, reason in expected))
    assert stats["read"] == 111 and stats["kept"] == 100


def test_reject_share_over_threshold_fails_naming_the_source(tmp_path, tokenizer_dir, salted, capsys):
    path, expected, _ = salted
    clean = write_jsonl(tmp_path / "clean.jsonl", pairwise_rows(10))
    sources = [{"name": "clean", "kind": "pairwise", "path": str(clean)},
               {"name": "salted", "kind": "skywork", "path": str(path), "drop_sources": []}]
    rc, out = run(tmp_path, "failing", tokenizer={"path": tokenizer_dir}, sources=sources, max_reject_fraction=0.05)
    assert rc == 1
    assert f"source 'salted' rejected {len(expected)} of 111 rows" in capsys.readouterr().err
    assert len((out / "rejects.jsonl").read_text().splitlines()) == len(expected)
    assert json.loads((out / "stats.json").read_text())["failed"].startswith("source 'salted'")
    assert not (out / "train").exists()


def test_tokenizer_without_chat_template_fails_before_any_work(tmp_path, tokenizer_dir, capsys):
    plain = tmp_path / "plain-tokenizer"
    shutil.copytree(tokenizer_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pairwise_rows(4))
    rc, _ = run(tmp_path, "plain", tokenizer={"path": str(plain)},
                sources=[{"name": "pairs", "kind": "pairwise", "path": str(pairs)}])
    assert rc == 1
    assert "has no chat template" in capsys.readouterr().err


# --- SFT chains ---------------------------------------------------------------------------------


def test_chains_become_sft_rows(tmp_path, tokenizer_dir):
    items = list(generate_items(30, seed=5))
    good = []
    for i, item in enumerate(items):
        position = "AB"[i % 2]
        good.append({"uid": f"uid-{i}", "messages": [{"role": "system", "content": "judge"}, user(item.question)],
                     "winner": f"model_{position.lower()}", "chain": reasoning_chain(item, position),
                     "source": "synthetic", "pass": 1 + i % 2})
    wrong = {**good[0], "uid": "w", "winner": "model_b"}
    unformatted = {**good[1], "uid": "f", "chain": "B is right. <answer>[[B]]</answer>"}
    lines = [json.dumps(r) for r in good] + [json.dumps(wrong), json.dumps(good[3]), "{not json", json.dumps(unformatted)]
    chains = tmp_path / "chains.jsonl"
    chains.write_text("\n".join(lines) + "\n")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pairwise_rows(6))
    rc, out = run(tmp_path, "sft", tokenizer={"path": tokenizer_dir},
                  sources=[{"name": "pairs", "kind": "pairwise", "path": str(pairs)}],
                  chain_sources=[{"name": "chains", "path": str(chains)}], val_fraction=0.3, max_reject_fraction=0.2)
    assert rc == 0
    train, val = read_split(out / "sft" / "train"), read_split(out / "sft" / "val")
    assert sorted(r["uid"] for r in train + val) == sorted(r["uid"] for r in good)
    assert all(split_of(r["uid"], 0, 0.3) == "train" for r in train) and all(split_of(r["uid"], 0, 0.3) == "val" for r in val)
    by_uid = {r["uid"]: r for r in good}
    for r in train + val:
        assert list(r) == ["uid", "messages", "response", "winner", "verdict", "source"]
        source = by_uid[r["uid"]]
        assert (r["messages"], r["response"], r["winner"], r["source"]) == (
            source["messages"], source["chain"], source["winner"], "synthetic")
        assert r["verdict"] == r["winner"][-1].upper()
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["source"], r["row"], r["reason"]) for r in rejects] == [
        ("chains", 31, "wrong verdict"), ("chains", 33, "invalid JSON"), ("chains", 34, "invalid format")]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["sft"]["sources"]["chains"]["dropped"] == {"duplicate": 1}
    assert stats["sft"]["rows"] == {"read": 34, "train": len(train), "val": len(val)}
    assert stats["preference"]["rows"]["read"] == 6
    assert len(read_split(out / "train")) + len(read_split(out / "val")) == 6
