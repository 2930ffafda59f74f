"""The served judge as an RL reward, in verl's custom reward function shapes.

verl (any reward manager that takes `compute_score`):

    reward_model.reward_manager: naive            # or `batch`, with name: compute_score_batch
    custom_reward_function:
      path: .../rmr1_ray/serving/reward_fn.py
      name: compute_score
      reward_kwargs: {base_url: "http://judge-host:8000", api_key_env: RMR1_API_KEY}

How one sample maps onto a judgement (POST /v1/judge):
- solution_str: the policy's response, the candidate.
- extra_info["question"] (a string) or extra_info["messages"] (a chat conversation ending with a user
  turn): what the response answers. verl copies a dataset row's `extra_info` column here.
- extra_info["reference"], else ground_truth (verl's reward_model.ground_truth): the response the
  candidate is compared against, e.g. a reference answer or the previous policy's response.

Reward: `win` (+1) when the judge prefers the candidate, `loss` (-1) when it prefers the reference,
`tie` (0) when it cannot decide (the two orders disagree, or no verdict). Both orders are judged by
default, so a judge's position bias cannot earn reward; with both_orders=False the candidate is shown
as Chatbot A. A candidate the server cannot judge (empty, or too long: HTTP 413/422) scores `loss`;
other errors (wrong key, server down after retries) raise, so a misconfigured run stops loudly.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

from rmr1_ray.serving.client import JudgeClient, JudgeClientError

log = logging.getLogger(__name__)

URL_ENV = "RMR1_JUDGE_URL"  # where the judge is when reward_kwargs has no base_url
_UNJUDGEABLE = (413, 422)


@lru_cache(maxsize=8)
def _client(base_url: str, api_key: str | None, timeout: float, retries: int) -> JudgeClient:
    # One client (connection pool) per server, shared by every call: verl calls once per sample.
    return JudgeClient(base_url, api_key=api_key, timeout=timeout, retries=retries)


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str | None,
    extra_info: dict[str, Any] | None = None,
    *,
    base_url: str | None = None,
    api_key_env: str | None = "RMR1_API_KEY",
    both_orders: bool = True,
    win: float = 1.0,
    loss: float = -1.0,
    tie: float = 0.0,
    max_tokens: int | None = None,
    timeout: float = 600.0,
    retries: int = 3,
) -> float:
    """The judge's reward for `solution_str` against the reference (see the module docstring)."""
    extra_info = extra_info or {}
    reference = extra_info.get("reference") or ground_truth
    if not isinstance(reference, str) or not reference.strip():
        raise ValueError(f"{data_source}: no reference response (extra_info['reference'] or ground_truth)")
    prompt = {k: extra_info[k] for k in ("question", "messages") if extra_info.get(k) is not None}
    if len(prompt) != 1:
        raise ValueError(f"{data_source}: extra_info needs exactly one of 'question' and 'messages'")
    if not solution_str.strip():
        return loss
    url = base_url or os.environ.get(URL_ENV)
    if not url:
        raise ValueError(f"no judge URL: pass reward_kwargs.base_url or set ${URL_ENV}")
    key = os.environ.get(api_key_env) if api_key_env else None
    client = _client(url, key, timeout, retries)
    try:
        result = client.judge(solution_str, reference, both_orders=both_orders, max_tokens=max_tokens, **prompt)
    except JudgeClientError as exc:
        if exc.status not in _UNJUDGEABLE:
            raise
        log.warning("%s: the judge refused the sample (%s); reward %s", data_source, exc, loss)
        return loss
    return {"A": win, "B": loss}.get(result["winner"], tie)


def compute_score_batch(
    data_sources: list[str],
    solution_strs: list[str],
    ground_truths: list[str | None],
    extra_infos: list[dict[str, Any] | None],
    *,
    concurrency: int = 32,
    **kwargs: Any,
) -> list[float]:
    """verl's batch reward manager shape: the samples are sent concurrently, so the server batches them."""
    rows = list(zip(data_sources, solution_strs, ground_truths, extra_infos, strict=True))
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(lambda row: compute_score(*row, **kwargs), rows))
