"""A small synchronous client for the judge service (needs only httpx).

    with JudgeClient("http://127.0.0.1:8000", api_key=os.environ["RMR1_API_KEY"]) as judge:
        result = judge.judge(question="2+2?", response_a="4", response_b="5", both_orders=True)
        result["winner"]                                   # "A" | "B" | "inconsistent" | "none"
        judge.rank(question="2+2?", responses=["4", "5", "four"])["ranking"]

Answers are the JSON bodies of rmr1_ray/serving/schemas.py as dicts. 429, 5xx, timeouts and
connection errors are retried with exponential backoff (or the server's Retry-After); other 4xx
are the caller's mistake and raise JudgeClientError at once with the server's explanation.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

RETRY_STATUS = frozenset({429}) | frozenset(range(500, 600))
MAX_BACKOFF_S = 30.0


class JudgeClientError(RuntimeError):
    """The server refused the request, or kept failing through every retry."""

    def __init__(self, message: str, status: int | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class JudgeClient:
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 600.0,
        retries: int = 3,
        backoff_s: float = 0.5,
    ) -> None:
        """timeout: seconds per attempt; retries: extra attempts after the first; backoff_s: the first
        wait, doubled each retry."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff_s = backoff_s
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def judge(
        self,
        response_a: str,
        response_b: str,
        *,
        question: str | None = None,
        messages: list[dict[str, str]] | None = None,
        both_orders: bool = False,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> dict[str, Any]:
        """POST /v1/judge: which response is better. Give `question` or `messages` (a conversation)."""
        body = _body(question, messages, both_orders, max_tokens, temperature)
        return self._request("POST", "/v1/judge", {**body, "response_a": response_a, "response_b": response_b})

    def rank(
        self,
        responses: list[str],
        *,
        question: str | None = None,
        messages: list[dict[str, str]] | None = None,
        method: str = "round_robin",
        both_orders: bool = False,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> dict[str, Any]:
        """POST /v1/rank: rank N responses (method "round_robin" or "knockout")."""
        body = _body(question, messages, both_orders, max_tokens, temperature)
        return self._request("POST", "/v1/rank", {**body, "responses": responses, "method": method})

    def model_info(self) -> dict[str, Any]:
        return self._request("GET", "/v1/model")

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def _request(self, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
        problem = ""
        for attempt in range(self.retries + 1):
            retry_after = None
            try:
                response = self._http.request(method, path, json=body)
            except httpx.TransportError as exc:  # connect errors, timeouts, dropped connections
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    return response.json()
                detail = _detail(response)
                problem = f"HTTP {response.status_code}: {detail}"
                if response.status_code not in RETRY_STATUS:
                    raise JudgeClientError(f"{method} {path}: {problem}", response.status_code, detail)
                retry_after = _seconds(response.headers.get("retry-after"))
            if attempt < self.retries:
                wait = retry_after if retry_after is not None else self.backoff_s * 2**attempt
                time.sleep(min(MAX_BACKOFF_S, wait))
        raise JudgeClientError(f"{method} {path}: gave up after {self.retries + 1} attempts; last: {problem}")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> JudgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _body(question, messages, both_orders, max_tokens, temperature) -> dict[str, Any]:
    # Unset options are left out, so the server's configured defaults apply.
    fields = {"question": question, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
    return {"both_orders": both_orders, **{k: v for k, v in fields.items() if v is not None}}


def _detail(response: httpx.Response) -> Any:
    try:
        return response.json().get("detail", response.text[:500])
    except (ValueError, AttributeError):
        return response.text[:500]


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP-date Retry-After: fall back to exponential backoff
