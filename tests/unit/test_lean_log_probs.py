"""Chunked response log-probs and entropies: today's (whole-tensor verl) values and gradients, without
an fp32 copy of the [B, R, V] logits in the forward or the backward."""

import weakref
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from verl.utils import torch_functional as verl_F

from rmr1_ray import algorithms as algo
from rmr1_ray.batch import pad_and_assemble

pytestmark = pytest.mark.unit

B, R, V = 2, 37, 64
CHUNK = 5  # positions per chunk: 7 chunks of 5 and a ragged one of 2
CHUNK_BYTES = CHUNK * B * V * 4


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(algo, "LOG_PROB_CHUNK_BYTES", CHUNK_BYTES)


def random_case(seed: int = 0, length: int = R, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, length, V, generator=gen) * scale, torch.randint(0, V, (B, length), generator=gen)


def unchunked(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0):
    """Today's maths: verl's functions on the whole (scaled) fp32 tensor at once."""
    scaled = logits.float() / temperature
    return verl_F.logprobs_from_logits(scaled, labels), verl_F.entropy_from_logits(scaled)


def exact(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


# --- chunking -------------------------------------------------------------------------------------


def test_chunk_positions_from_the_byte_budget():
    assert algo.log_prob_chunk_positions(B, V) == CHUNK
    assert algo.log_prob_chunk_positions(B, V * 100) == 1  # one position over the budget: still one


def test_positions_are_walked_in_chunks_with_a_ragged_last_one(monkeypatch):
    widths = []
    verl_logprobs = verl_F.logprobs_from_logits

    def recording(logits, labels, **kwargs):
        widths.append(logits.shape[1])
        return verl_logprobs(logits, labels, **kwargs)

    monkeypatch.setattr(verl_F, "logprobs_from_logits", recording)
    logits, labels = random_case()
    algo.response_token_stats(logits, labels)
    assert widths == [CHUNK] * 7 + [2]


# --- values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_equal_unchunked_fp32(temperature):
    logits, labels = random_case()
    expected_log_probs, expected_entropy = unchunked(logits, labels, temperature)
    scaled = logits.clone()
    with torch.no_grad():
        log_probs, entropy = algo.response_token_stats(scaled, labels, temperature, "metric")
    exact(log_probs, expected_log_probs)
    exact(entropy, expected_entropy)
    assert log_probs.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(scaled, logits / temperature, atol=0, rtol=0)  # divided in place, as before
    assert algo.response_token_stats(logits.clone(), labels, temperature)[1] is None  # entropy="none"


def test_log_probs_equal_log_softmax_by_hand():
    logits, labels = random_case(seed=1)
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, labels[..., None])[..., 0]
    # another formula than verl's (log_softmax, not x - logsumexp): equal to fp32 rounding
    torch.testing.assert_close(algo.response_token_stats(logits.clone(), labels, 0.7)[0], expected)
    uniform = algo.response_token_stats(torch.zeros(B, R, V), labels, entropy="metric")[1]
    exact(uniform, torch.full((B, R), torch.log(torch.tensor(float(V))).item()))


def test_bf16_logits_give_todays_values_and_stay_close_to_fp32():
    logits, labels = random_case(seed=2, scale=1.0)
    half = logits.bfloat16()
    log_probs, entropy = algo.response_token_stats(half.clone(), labels, 0.7, "metric")
    assert log_probs.dtype == entropy.dtype == torch.float32
    # today's semantics: divided in bf16 (in place), then upcast; the log-softmax itself in fp32
    expected_log_probs, expected_entropy = unchunked(half / 0.7, labels)
    exact(log_probs, expected_log_probs)
    exact(entropy, expected_entropy)
    # and within bf16 input precision of the all-fp32 values
    fp32_log_probs, fp32_entropy = unchunked(half.float(), labels, 0.7)
    torch.testing.assert_close(log_probs, fp32_log_probs, atol=0.05, rtol=0)
    torch.testing.assert_close(entropy, fp32_entropy, atol=0.05, rtol=0)


# --- gradients ------------------------------------------------------------------------------------


def term_gradient(
    logits: torch.Tensor, term: str, weights: torch.Tensor, stats
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the term's values, d sum(weights * term) / d logits) for the term "log_prob" or "entropy"."""
    leaf = logits.clone().requires_grad_()
    log_probs, entropy = stats(leaf * 1)  # a non-leaf, as the model's logits: it may be divided in place
    values = log_probs if term == "log_prob" else entropy
    (grad,) = torch.autograd.grad((values * weights).sum(), leaf)
    return values.detach(), grad


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("term", ["log_prob", "entropy"])
def test_gradients_equal_unchunked_fp32(term, temperature):
    logits, labels = random_case(seed=3)
    weights = torch.randn(B, R, generator=torch.Generator().manual_seed(4))
    values, grad = term_gradient(
        logits, term, weights, lambda x: algo.response_token_stats(x, labels, temperature, "loss")
    )
    expected_values, expected_grad = term_gradient(
        logits, term, weights, lambda x: unchunked(x, labels, temperature)
    )
    exact(values, expected_values)
    exact(grad, expected_grad)
    assert grad.abs().max() > 0.01  # a gradient that says something


def test_bf16_gradient_is_the_fp32_gradient_rounded():
    logits, labels = random_case(seed=5, scale=1.0)
    half = logits.bfloat16()
    weights = torch.randn(B, R, generator=torch.Generator().manual_seed(6))
    _, grad = term_gradient(
        half, "log_prob", weights, lambda x: algo.response_token_stats(x, labels, entropy="loss")
    )
    _, expected = term_gradient(half.float(), "log_prob", weights, lambda x: unchunked(x, labels))
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad, expected.bfloat16(), atol=0, rtol=0)


def test_metric_entropy_has_no_gradient_and_the_same_values():
    logits, labels = random_case(seed=7)
    leaf = logits.clone().requires_grad_()
    log_probs, metric = algo.response_token_stats(leaf * 1, labels, 0.7, "metric")
    assert log_probs.requires_grad and not metric.requires_grad
    _, loss_term = algo.response_token_stats(leaf * 1, labels, 0.7, "loss")
    assert loss_term.requires_grad
    exact(metric, loss_term.detach())


# --- memory ---------------------------------------------------------------------------------------


def saved_fp32_sizes(forward) -> list[int]:
    """Element counts of the fp32 tensors autograd keeps for backward while `forward` runs."""
    sizes = []

    def pack(tensor):
        if tensor.dtype == torch.float32:
            sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sizes


def todays_row_upcast(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The replaced scheme: upcast one row at a time, but autograd keeps every row's fp32 copy."""
    return torch.stack(
        [verl_F.logprobs_from_logits(row.float(), lab) for row, lab in zip(logits, labels, strict=True)]
    )


def test_autograd_keeps_no_fp32_copy_of_bf16_logits():
    logits, labels = random_case(seed=8)
    leaf = logits.bfloat16().requires_grad_()
    # the probe sees fp32 copies: today's scheme keeps all B * R * V elements of them
    assert sum(saved_fp32_sizes(lambda: todays_row_upcast(leaf * 1, labels))) >= B * R * V
    kept = saved_fp32_sizes(lambda: algo.response_token_stats(leaf * 1, labels, 0.7, "loss"))
    assert all(size < B * R * V for size in kept)
    assert 4 * sum(kept) <= CHUNK_BYTES + 2 * B * R * 4  # at most one chunk plus the two [B, R] results


class LiveFp32Bytes(TorchDispatchMode):
    """Peak bytes of fp32 storage alive at once, over every tensor an op makes while active."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.storages: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage) -> None:
        ptr, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or ptr in self.storages:
            return
        self.storages.add(ptr)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, ptr, size)  # storage objects live as long as their memory

    def _free(self, ptr: int, size: int) -> None:
        self.storages.discard(ptr)
        self.live -= size


def peak_fp32_bytes(log_probs_and_entropy, logits: torch.Tensor, weights: torch.Tensor) -> int:
    """Peak fp32 bytes over a forward and backward of sum(weights * (log-prob + entropy))."""
    probe = LiveFp32Bytes()
    with probe:
        log_probs, entropy = log_probs_and_entropy(logits * 1)
        ((log_probs + entropy) * weights).sum().backward()
    return probe.peak


def test_peak_fp32_memory_is_a_few_chunks_in_forward_and_backward():
    length = 120  # 24 chunks: a whole fp32 copy would be 24 chunk sizes
    logits, labels = random_case(seed=9, length=length)
    leaf = logits.bfloat16().requires_grad_()
    weights = torch.randn(B, length, generator=torch.Generator().manual_seed(10))
    whole = B * length * V * 4

    def today(x):
        x.div_(0.7)
        return todays_row_upcast(x, labels), verl_F.entropy_from_logits(x)

    assert peak_fp32_bytes(today, leaf, weights) >= whole  # the probe sees what today's scheme holds
    chunked = peak_fp32_bytes(lambda x: algo.response_token_stats(x, labels, 0.7, "loss"), leaf, weights)
    assert chunked <= 10 * CHUNK_BYTES < whole / 2  # a few chunks' temporaries, whatever the length
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


# --- old and reference log-probs ------------------------------------------------------------------


def test_response_log_probs_of_a_batch():
    """Through response_logits and the micro-batches: a bigram model (next-token logits from a table)."""
    table = torch.randn(12, V, generator=torch.Generator().manual_seed(11))

    def bigram(input_ids, logits_to_keep, **_):
        return SimpleNamespace(logits=table[input_ids][:, -logits_to_keep:])

    prompts = [[1, 2, 3], [4], [5, 6]]
    responses = [[7, 8, 9, 10, 11, 7, 8], [9, 10], [11, 1, 2, 3]]
    batch = pad_and_assemble(prompts, responses, pad_id=0)
    got = algo.response_log_probs(bigram, batch, micro_batch_size=2, temperature=0.7)
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        tokens = torch.tensor(prompt + response)
        expected = torch.log_softmax(table[tokens[:-1]] / 0.7, -1).gather(-1, tokens[1:, None])[
            len(prompt) - 1 :, 0
        ]
        torch.testing.assert_close(got[i, : len(response)], expected)  # log_softmax: to fp32 rounding
        assert (got[i, len(response) :] == 0).all()  # padding
