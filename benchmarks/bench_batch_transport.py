"""Bytes each learner rank deserialises per GRPO step, before and after per-rank transport, measured on a
synthetic step batch of the configured shape (no model: only the transport is measured).

- before: every rank fetched the whole rollout output (for old log-probs) and the whole step batch (for
  the update), as verl DataProtos (pickled through torch.save), then kept its 1/ranks slice;
- after: a rank fetches only its share of each, as numpy payloads with compact ids (batch.rank_payloads).

    python benchmarks/bench_batch_transport.py [--prompts 64 --samples 7 --prompt-len 1024 --response-len 2048 --ranks 8]

The defaults are the 7B config's step (configs/rm-r1/qwen2.5-7b-instruct-grpo.yaml) scaled down 16x in
prompts so that it fits on a laptop; bytes scale linearly with prompts. Times are deserialisation in
this process (ray.get of a locally stored object, median of --repeats).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import ray
import torch

from rmr1_ray.batch import LOG_PROB_KEYS, UPDATE_KEYS, pad_and_assemble, rank_payloads, split_for_ranks
from rmr1_ray.ray_utils import init_ray

MIB = 2**20


def step_batch(prompts: int, samples: int, prompt_len: int, response_len: int, seed: int = 0):
    """A rollout output of prompts x samples sequences with full-length prompts and responses, plus the
    keys the rewarder adds (rewards, log-probs, advantages)."""
    gen = torch.Generator().manual_seed(seed)
    size = prompts * samples
    ids = torch.randint(3, 150_000, (size, prompt_len + response_len), generator=gen).tolist()
    batch = pad_and_assemble([row[:prompt_len] for row in ids], [row[prompt_len:] for row in ids], pad_id=0,
                             rollout_log_probs=[[-1.0] * response_len] * size,
                             non_tensors={"uid": [f"p{i // samples}" for i in range(size)], "winner": ["A"] * size,
                                          "data_index": list(range(size)), "response_text": ["x" * 4000] * size})
    for key in ("old_log_probs", "ref_log_probs", "advantages", "returns", "token_level_rewards"):
        batch.batch[key] = torch.randn(size, response_len)
    return batch


def deserialise(obj, repeats: int) -> tuple[int, float]:
    """(serialised bytes, median seconds of ray.get) of one object put in the object store."""
    ref = ray.put(obj)
    nbytes = len(ray._private.worker.global_worker.get_serialization_context().serialize(obj).to_bytes())
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        ray.get(ref)
        seconds.append(time.perf_counter() - start)
    return nbytes, statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=7)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--response-len", type=int, default=2048)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    init_ray("local", num_cpus=1)
    batch = step_batch(args.prompts, args.samples, args.prompt_len, args.response_len)
    print(f"step batch: {len(batch)} sequences of {args.prompt_len} + {args.response_len} tokens, {args.ranks} ranks")

    whole_bytes, whole_s = deserialise(batch, args.repeats)  # before: both stages fetch the whole batch
    before_bytes, before_s = 2 * whole_bytes, 2 * whole_s
    # (the rank then slices: split_for_ranks, kept out of the time)
    assert len(split_for_ranks(batch, args.ranks)[0]) == len(batch) // args.ranks
    log_prob_share = rank_payloads(batch, args.ranks, LOG_PROB_KEYS)[0]
    update_share = rank_payloads(batch, args.ranks, UPDATE_KEYS)[0]
    after = [deserialise(share, args.repeats) for share in (log_prob_share, update_share)]
    after_bytes, after_s = sum(b for b, _ in after), sum(s for _, s in after)
    print(f"{'per rank per step':>20} {'MiB':>10} {'seconds':>9}")
    print(f"{'before':>20} {before_bytes / MIB:10.1f} {before_s:9.4f}")
    print(f"{'after':>20} {after_bytes / MIB:10.1f} {after_s:9.4f}")
    print(f"{'after / before':>20} {after_bytes / before_bytes:10.3f} {after_s / before_s:9.3f}")
    print(f"  full-size 7B step (x{1024 // args.prompts} prompts): before {before_bytes / MIB * 1024 / args.prompts / 1024:.1f} GiB, "
          f"after {after_bytes / MIB * 1024 / args.prompts / 1024:.2f} GiB per rank")
    np.testing.assert_array_equal(log_prob_share["tensors"]["input_ids"], batch.batch["input_ids"][: len(batch) // args.ranks].numpy())
    ray.shutdown()


if __name__ == "__main__":
    main()
