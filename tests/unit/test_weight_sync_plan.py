"""Bucket geometry of the collective weight sync: what sender and receivers both derive from the layout."""

from __future__ import annotations

import pytest

from rmr1_ray.weight_sync import TensorSpec, WeightLayout, partition_pieces, plan_buckets

pytestmark = pytest.mark.unit


def test_a_zero3_parameter_larger_than_a_bucket_travels_as_its_partitions():
    embedding = TensorSpec("embed", "bfloat16", (1000, 10), partition_numel=3334)  # 3 ranks, the last padded
    norm = TensorSpec("norm", "bfloat16", (10,), partition_numel=4)
    whole = TensorSpec("head", "float32", (1000, 10))  # not partitioned (ZeRO-2): sent whole
    layout = WeightLayout((embedding, norm, whole), {})
    buckets = plan_buckets(layout, bucket_bytes=4096)
    assert [b.entries for b in buckets] == [((0, 0),), ((1, 0),), ((2, 0),)]
    # rank r's elements [3334 r, 3334 (r + 1)) of 10000, as bytes; the padding of the last is not sent
    assert buckets[0].pieces == ((0, 6668), (6668, 6668), (13336, 6664)) == partition_pieces(embedding)
    assert sum(size for _, size in buckets[0].pieces) == embedding.nbytes
    assert buckets[1].pieces == ((0, 20),)  # fits a bucket: whole
    assert buckets[2].pieces == ((0, 40000),)  # larger than a bucket but not partitioned: whole


def test_small_tensors_share_a_bucket_and_go_as_one_piece():
    specs = tuple(TensorSpec(f"w{i}", "float32", (100,), partition_numel=50) for i in range(5))
    buckets = plan_buckets(WeightLayout(specs, {}), bucket_bytes=1000)
    assert [len(b.entries) for b in buckets] == [2, 2, 1]
    assert [b.pieces for b in buckets] == [((0, 800),), ((0, 800),), ((0, 400),)]
