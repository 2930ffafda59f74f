"""The step batch: padding layout, concatenation of ragged batches, per-rank splits."""

import pytest
import torch

from rmr1_ray.batch import concat, pad_and_assemble, split_for_ranks, with_data_index

pytestmark = pytest.mark.unit


def small_batch(prompts, responses, uids, **kwargs):
    return pad_and_assemble(prompts, responses, pad_id=9, non_tensors={"uid": uids}, **kwargs)


def test_pad_and_assemble_layout():
    b = small_batch([[1, 2, 3], [4]], [[5, 6], [7, 8, 10]], ["a", "a"], rollout_log_probs=[[-1.0, -2.0], [-3.0] * 3],
                    meta_info={"temperature": 0.7})
    t = b.batch
    assert t["prompts"].tolist() == [[1, 2, 3], [9, 9, 4]]  # left-padded
    assert t["responses"].tolist() == [[5, 6, 9], [7, 8, 10]]  # right-padded
    assert t["input_ids"].tolist() == [[1, 2, 3, 5, 6, 9], [9, 9, 4, 7, 8, 10]]
    assert t["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert t["position_ids"].tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]
    assert t["response_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert t["rollout_log_probs"].tolist() == [[-1.0, -2.0, 0.0], [-3.0] * 3]
    assert b.non_tensor_batch["uid"].dtype == object
    assert b.meta_info == {"pad_token_id": 9, "temperature": 0.7}


def test_concat_repads_ragged_batches():
    a = small_batch([[1, 2]], [[3]], ["a"])
    b = small_batch([[4, 5, 6]], [[7, 8]], ["b"])
    b.batch["old_log_probs"] = torch.tensor([[-1.0, -2.0]])
    a.batch["old_log_probs"] = torch.tensor([[-5.0]])
    c = concat([a, b])
    assert c.batch["input_ids"].tolist() == [[9, 1, 2, 3, 9], [4, 5, 6, 7, 8]]
    assert c.batch["attention_mask"].tolist() == [[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert c.batch["response_mask"].tolist() == [[1, 0], [1, 1]]
    assert c.batch["old_log_probs"].tolist() == [[-5.0, 0.0], [-1.0, -2.0]]
    assert c.non_tensor_batch["uid"].tolist() == ["a", "b"]


def test_split_for_ranks_keeps_groups_and_checks_divisibility():
    b = small_batch([[1]] * 6, [[2]] * 6, ["a", "a", "b", "b", "c", "c"])
    parts = split_for_ranks(b, 3)
    assert [p.non_tensor_batch["uid"].tolist() for p in parts] == [["a", "a"], ["b", "b"], ["c", "c"]]
    with pytest.raises(ValueError, match="cannot be split evenly over 4 ranks"):
        split_for_ranks(b, 4)


def test_with_data_index_carries_the_index():
    b = small_batch([[1]] * 2, [[2]] * 2, ["a", "a"])
    assert "data_index" not in with_data_index({"x": torch.zeros(2, 1)}, like=b).non_tensor_batch
    b.non_tensor_batch["data_index"] = b.non_tensor_batch["uid"].copy()
    b.non_tensor_batch["data_index"][:] = [7, 3]
    assert with_data_index({"x": torch.zeros(2, 1)}, like=b).non_tensor_batch["data_index"].tolist() == [7, 3]
