"""GRPO prompt data checked before any actor starts: bad rows salted into a second shard are found
with their file, row and uid, skipped up to data.max_bad_prompt_fraction, and stop the job past it."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from jobs.train_rlvr import main
from rmr1_ray.data.prompt_check import PromptDataError, load_checked_prompts
from rmr1_ray.models import load_tokenizer
from rmr1_ray.tiny import make_tiny

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def good(i: int) -> dict:
    return {"uid": f"u{i}", "messages": [{"role": "user", "content": f"Is {i} even?"}], "winner": "model_a", "source": "s"}


@pytest.fixture
def shards(tmp_path):
    """part-0: 6 good rows; part-1: 2 good rows and 4 bad ones."""
    data = tmp_path / "train"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist([good(i) for i in range(6)]), data / "part-0.parquet")
    bad = [good(6), {**good(7), "winner": "model_c"}, {**good(8), "messages": []},
           {**good(9), "messages": [{"role": "user", "content": "word " * 600}]},
           {**good(10), "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, good(11)]
    pq.write_table(pa.Table.from_pylist(bad), data / "part-1.parquet")
    return data


def test_bad_rows_are_skipped_named_and_written_to_rejects(tiny, shards, tmp_path):
    rejects = tmp_path / "rejects.jsonl"
    table = load_checked_prompts(shards, load_tokenizer(str(tiny)), 512, 0.5, rejects)
    assert table.column("uid").to_pylist() == ["u0", "u1", "u2", "u3", "u4", "u5", "u6", "u11"]
    found = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(r["file"], r["row"], r["uid"], r["reason"]) for r in found] == [
        (str(shards / "part-1.parquet"), 1, "u7", "bad_label"),
        (str(shards / "part-1.parquet"), 2, "u8", "empty_conversation"),
        (str(shards / "part-1.parquet"), 3, "u9", "prompt_too_long"),
        (str(shards / "part-1.parquet"), 4, "u10", "last_turn_not_user"),
    ]
    assert found[0]["detail"] == "winner 'model_c' is not one of ['model_a', 'model_b']"
    assert found[2]["detail"].endswith("tokens > data.max_prompt_length=512")


def test_past_the_threshold_the_error_names_the_share_and_the_first_bad_row(tiny, shards, tmp_path):
    with pytest.raises(PromptDataError, match=r"4 of 12 prompts are bad \(33.3% > data.max_bad_prompt_fraction 10.0%\); "
                                              r"first: .*part-1.parquet row 1 \(uid 'u7'\): winner 'model_c'"):
        load_checked_prompts(shards, load_tokenizer(str(tiny)), 512, 0.1, tmp_path / "rejects.jsonl")


def test_a_shard_without_a_column_is_named(tiny, shards, tmp_path):
    pq.write_table(pa.Table.from_pylist([{"uid": "x", "messages": good(0)["messages"]}]), shards / "part-2.parquet")
    with pytest.raises(ValueError, match=r"part-2.parquet: missing columns \['winner'\]"):
        load_checked_prompts(shards, load_tokenizer(str(tiny)), 512, 1.0, tmp_path / "rejects.jsonl")


def test_the_job_stops_before_starting_ray(tiny, shards, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", "configs/tiny-cpu/train.yaml", f"model.path={tiny}", f"data.train_path={shards}",
              f"trainer.output_dir={tmp_path / 'run'}", "data.max_prompt_length=512"])
    assert exit_info.value.code == 2
    assert "4 of 12 prompts are bad" in capsys.readouterr().err
    assert not ray.is_initialized()
    assert len((tmp_path / "run" / "rejects.jsonl").read_text().splitlines()) == 4
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", "configs/tiny-cpu/train.yaml", f"model.path={tiny}", f"data.train_path={tmp_path / 'none'}",
              f"trainer.output_dir={tmp_path / 'run2'}"])
    assert exit_info.value.code == 2 and "no parquet files in" in capsys.readouterr().err
