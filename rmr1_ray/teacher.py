"""An OpenAI-compatible chat-completions client for long generation jobs (the chain teacher).

Works with any server speaking POST {base_url}/chat/completions: OpenAI, a local vLLM server
(`python -m vllm.entrypoints.openai.api_server --model DIR --host 127.0.0.1 --port P`), Anthropic's
OpenAI-compatible endpoint, or our Ray Serve judge once it serves that route. What a job of many
thousand requests needs:
- a concurrency limit (a semaphore around each request, its retries included, so that a server
  that pushes back with 429 does not get more requests while it is asking for fewer);
- retries with exponential backoff and jitter on 429, 408, 5xx, timeouts and dropped connections,
  honouring the server's Retry-After;
- token accounting from each response's `usage`, and counters a job can report.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from rmr1_ray.config.chains import RetryConfig, TeacherConfig

# 408 Request Timeout and 409 Conflict are transient by definition; 429 is rate limiting.
RETRYABLE_STATUS = frozenset({408, 409, 429})
# No request can succeed when the key or the model/URL is wrong: stop the job instead of
# recording every row as failed.
FATAL_STATUS = frozenset({401, 403, 404})
ERROR_BODY_CHARS = 300


class TeacherError(Exception):
    """A request that failed for good (after its retries, or not retryable); str() is the reason."""


class FatalTeacherError(Exception):
    """No request can succeed (bad key, unknown model, wrong URL): the job must stop."""


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    attempts: int


@dataclass(frozen=True)
class _Transient:
    """A failed attempt worth retrying."""

    reason: str  # counted in RequestStats.retries: "429", "503", "timeout", "connection", ...
    detail: str
    retry_after: float | None = None  # the server's Retry-After, seconds


@dataclass
class RequestStats:
    """Counters over every request the client sent (attempts, not rows)."""

    attempts: int = 0
    succeeded: int = 0
    failed: int = 0  # requests that gave up
    retries: Counter = field(default_factory=Counter)  # why: "429", "500", "timeout", "connection", ...
    retry_wait_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict:
        return {
            "attempts": self.attempts,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "retries": dict(sorted(self.retries.items())),
            "retry_wait_s": round(self.retry_wait_s, 3),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


def backoff_s(retry: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Wait before retry number `retry` (0-based): doubling from `initial`, capped at `maximum`,
    with "equal jitter" (half fixed, half random) so that requests failed together spread out
    but still wait at least half the nominal time."""
    nominal = min(maximum, initial * 2**retry)
    return nominal / 2 + rng.uniform(0, nominal / 2)


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date. None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _error_text(response: httpx.Response) -> str:
    return f"HTTP {response.status_code}: {response.text[:ERROR_BODY_CHARS]}"


def _parse(payload: dict) -> tuple[str, int, int, str | None]:
    """(text, prompt tokens, completion tokens, finish reason) of a chat-completions response body."""
    choice = payload["choices"][0]
    usage = payload.get("usage") or {}
    # content is null for refusals and for some tool-call answers: that is an answer without a chain.
    text = choice["message"].get("content") or ""
    return text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), choice.get("finish_reason")


class TeacherClient:
    """Async client; use as `async with TeacherClient(...) as client: await client.complete(messages)`."""

    def __init__(
        self, teacher: TeacherConfig, retry: RetryConfig, concurrency: int, api_key: str | None = None, seed: int = 0
    ) -> None:
        self.teacher, self.retry = teacher, retry
        self.stats = RequestStats()
        self._rng = random.Random(seed)
        self._fatal: FatalTeacherError | None = None  # once set, no request is sent any more
        self._semaphore = asyncio.Semaphore(concurrency)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=teacher.base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(teacher.timeout_s, connect=min(30.0, teacher.timeout_s)),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )

    async def __aenter__(self) -> TeacherClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self._http.aclose()

    def body(self, messages: list[dict]) -> dict:
        body: dict = {"model": self.teacher.model, "messages": messages}
        if self.teacher.max_tokens is not None:
            body["max_tokens"] = self.teacher.max_tokens
        if self.teacher.temperature is not None:
            body["temperature"] = self.teacher.temperature
        return {**body, **self.teacher.extra_body}

    async def complete(self, messages: list[dict]) -> Completion:
        """One chat completion, retried as configured. Raises TeacherError when it gives up."""
        body = self.body(messages)
        async with self._semaphore:
            for attempt in range(1, self.retry.max_attempts + 1):
                if self._fatal is not None:
                    raise self._fatal
                outcome = await self._attempt(body, attempt)
                if isinstance(outcome, Completion):
                    return outcome
                if attempt == self.retry.max_attempts:
                    break
                self.stats.retries[outcome.reason] += 1
                wait = outcome.retry_after
                if wait is None:
                    wait = backoff_s(attempt - 1, self.retry.initial_backoff_s, self.retry.max_backoff_s, self._rng)
                wait = min(wait, self.retry.max_backoff_s)
                self.stats.retry_wait_s += wait
                await asyncio.sleep(wait)
        self.stats.failed += 1
        raise TeacherError(f"gave up after {self.retry.max_attempts} attempts; last: {outcome.detail}")

    async def _attempt(self, body: dict, attempt: int) -> Completion | _Transient:
        """Send once: a Completion, a _Transient failure worth retrying, or raise for a final one."""
        self.stats.attempts += 1
        try:
            response = await self._http.post("chat/completions", json=body)
        except httpx.TimeoutException:
            return _Transient("timeout", f"no response within {self.teacher.timeout_s} s")
        except httpx.TransportError as exc:  # refused or dropped connection, protocol error
            return _Transient("connection", f"{type(exc).__name__}: {exc}")
        status = response.status_code
        if status in FATAL_STATUS:
            self.stats.failed += 1
            self._fatal = FatalTeacherError(
                f"{_error_text(response)} (check teacher.base_url, teacher.model and the API key)")
            raise self._fatal
        if status in RETRYABLE_STATUS or status >= 500:
            return _Transient(str(status), _error_text(response), retry_after_s(response.headers.get("retry-after")))
        if status != 200:  # 400 (e.g. prompt too long), 413, 422: the same request would fail again
            self.stats.failed += 1
            raise TeacherError(_error_text(response))
        try:
            text, prompt_tokens, completion_tokens, finish = _parse(response.json())
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            # A 200 without a completion in it comes from a broken relay: worth another try.
            return _Transient("bad response", f"unreadable 200 response: {exc!r}")
        self.stats.succeeded += 1
        self.stats.prompt_tokens += prompt_tokens
        self.stats.completion_tokens += completion_tokens
        return Completion(text, prompt_tokens, completion_tokens, finish, attempt)
