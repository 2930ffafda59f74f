"""Judges: chat messages in, generated judgements out, behind one small interface.

    judge.judge(requests) -> iterator of (request key, generated text), in completion order

- EngineJudge: a local model through Ray Data batch inference: `map_batches` with a callable class
  that holds one generation engine (hf or vllm) per actor; `num_workers` actors.
- OpenAIJudge: any OpenAI-compatible chat-completions server, with a concurrency limit and retries
  on 429, 5xx, timeouts and connection errors.
- FunctionJudge: a plain function over a batch of message lists (e.g. the GRPO driver's rollout group).

Results stream out as they complete, so the caller can write each one down at once: a stopped run
keeps everything judged so far.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

from rmr1_ray.engines.base import chat_prompt_ids, response_texts
from rmr1_ray.prompts import Message

if TYPE_CHECKING:
    import httpx

    from rmr1_ray.config.evaluate import EndpointConfig, EvalConfig, SamplingConfig


class JudgeRequest(NamedTuple):
    key: str
    messages: list[Message]


class Judge(Protocol):
    def judge(self, requests: Sequence[JudgeRequest]) -> Iterator[tuple[str, str]]:
        """Yield (key, generated text) once for every request, in any order."""
        ...


class JudgeError(RuntimeError):
    """The judge cannot produce a judgement (e.g. the endpoint keeps failing or rejects the request)."""


class FunctionJudge:
    """`generate(list of message lists) -> list of texts`, called `batch_size` requests at a time."""

    def __init__(self, generate: Callable[[list[list[Message]]], list[str]], batch_size: int = 64) -> None:
        self.generate = generate
        self.batch_size = batch_size

    def judge(self, requests: Sequence[JudgeRequest]) -> Iterator[tuple[str, str]]:
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            texts = self.generate([r.messages for r in batch])
            if len(texts) != len(batch):
                raise JudgeError(f"generate returned {len(texts)} texts for {len(batch)} prompts")
            yield from zip((r.key for r in batch), texts, strict=True)


class _EngineWorker:
    """A Ray Data actor: renders each request with the judge's chat template (engines.base.chat_prompt_ids)
    and generates."""

    def __init__(self, engine: str, model: dict[str, Any], settings: dict[str, Any], device: str,
                 sampling: dict[str, Any]) -> None:
        from rmr1_ray.engines import SamplingParams, make_engine
        from rmr1_ray.models import load_tokenizer

        self.tokenizer = load_tokenizer(model["tokenizer_path"] or model["path"], model["trust_remote_code"])
        self.engine = make_engine(engine, model, settings, device)
        self.params = SamplingParams(**sampling)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompt_ids = [chat_prompt_ids(self.tokenizer, json.loads(messages)) for messages in batch["messages"]]
        texts = [text for text, _ in response_texts(self.tokenizer, self.engine.generate(prompt_ids, self.params))]
        return {"key": batch["key"], "generation": np.array(texts, dtype=object)}


class EngineJudge:
    def __init__(self, config: EvalConfig) -> None:
        if config.model is None:
            raise ValueError("EngineJudge needs `model` (a local judge)")
        self.config = config

    def judge(self, requests: Sequence[JudgeRequest]) -> Iterator[tuple[str, str]]:
        import ray.data

        from rmr1_ray.ray_utils import init_ray

        if not requests:  # e.g. a resumed run with nothing left: do not start Ray at all
            return
        cfg = self.config
        init_ray(cfg.ray_address)  # no-op when the caller has connected already
        s = cfg.sampling
        sampling = {"n": 1, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                    "max_new_tokens": s.max_new_tokens, "seed": cfg.seed}
        device = "cuda" if cfg.num_gpus_per_worker > 0 else "cpu"
        # make_engine reads the backend's settings under RolloutConfig's names.
        settings = {**cfg.vllm.model_dump(), "seed": cfg.seed}
        ray.data.DataContext.get_current().enable_progress_bars = False  # the caller shows one bar for the run
        items = [{"key": r.key, "messages": json.dumps(r.messages)} for r in requests]
        # Similar lengths share a batch: the hf engine pads every prompt of a batch to the longest one.
        items.sort(key=lambda item: len(item["messages"]))
        # One block per engine batch: results stream back batch by batch instead of at the end.
        dataset = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // cfg.batch_size)))
        judged = dataset.map_batches(
            _EngineWorker,
            fn_constructor_kwargs={"engine": cfg.engine, "model": cfg.model.model_dump(), "settings": settings,
                                   "device": device, "sampling": sampling},
            batch_size=cfg.batch_size,
            compute=ray.data.ActorPoolStrategy(size=cfg.num_workers),
            num_cpus=cfg.num_cpus_per_worker,
            num_gpus=cfg.num_gpus_per_worker,
        )
        for batch in judged.iter_batches(batch_size=None, batch_format="numpy"):
            yield from zip(batch["key"].tolist(), batch["generation"].tolist(), strict=True)


RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))  # 408/409: OpenAI's own retry list
MAX_BACKOFF_S = 60.0


class OpenAIJudge:
    """POST {base_url}/chat/completions, `concurrency` requests in flight."""

    def __init__(self, endpoint: EndpointConfig, sampling: SamplingConfig, seed: int) -> None:
        self.endpoint = endpoint
        self.payload: dict[str, Any] = {
            "model": endpoint.model, "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "seed": seed,
        }
        if sampling.top_k > 0:  # not an OpenAI parameter; vLLM and SGLang servers accept it
            self.payload["top_k"] = sampling.top_k

    def judge(self, requests: Sequence[JudgeRequest]) -> Iterator[tuple[str, str]]:
        import httpx

        key = self.endpoint.api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        with (
            httpx.Client(base_url=self.endpoint.base_url.rstrip("/") + "/", headers=headers,
                         timeout=self.endpoint.timeout_s) as client,
            ThreadPoolExecutor(self.endpoint.concurrency, thread_name_prefix="judge") as pool,
        ):
            futures = {pool.submit(self._complete, client, r.messages): r.key for r in requests}
            try:
                for future in as_completed(futures):
                    yield futures[future], future.result()
            finally:  # the caller stopped early or a request failed for good: drop what has not started
                for future in futures:
                    future.cancel()

    def _complete(self, client: httpx.Client, messages: list[Message]) -> str:
        import httpx

        problem = ""
        for attempt in range(self.endpoint.max_retries + 1):
            retry_after = None
            try:
                response = client.post("chat/completions", json={**self.payload, "messages": messages})
            except httpx.TransportError as exc:  # timeouts, refused or dropped connections
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    return _content(response)
                problem = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code not in RETRY_STATUS:
                    raise JudgeError(f"{self.endpoint.base_url}: {problem}")
                retry_after = _seconds(response.headers.get("retry-after"))
            if attempt < self.endpoint.max_retries:
                time.sleep(min(MAX_BACKOFF_S, retry_after if retry_after is not None else self.endpoint.retry_backoff_s * 2**attempt))
        raise JudgeError(f"{self.endpoint.base_url}: gave up after {self.endpoint.max_retries + 1} attempts; last: {problem}")


def _content(response: httpx.Response) -> str:
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise JudgeError(f"unexpected chat-completions response ({exc!r}): {response.text[:300]}") from None
    return content or ""  # a null content (e.g. cut at max_tokens) is an unparseable verdict, not a crash


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP-date Retry-After: fall back to exponential backoff


def make_judge(config: EvalConfig) -> Judge:
    """The configured judge; ValueError (naming the key) if its engine has no backend in this version."""
    from rmr1_ray.engines import AVAILABLE

    if config.endpoint is not None:
        return OpenAIJudge(config.endpoint, config.sampling, config.seed)
    if config.engine not in AVAILABLE:  # fail here, not inside a Ray Data actor after the model loaded
        raise ValueError(f"engine={config.engine!r} is not available in this version (available: {', '.join(AVAILABLE)})")
    return EngineJudge(config)
