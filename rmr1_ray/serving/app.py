"""The judge as a Ray Serve application: `build_app(config)` -> JudgeIngress -> JudgeModel.

    HTTP -> Serve proxy -> JudgeIngress (FastAPI: auth, size limits, validation, fan-out, deadlines)
                               | DeploymentHandle, one call per judge prompt
                               v
                           JudgeModel (one engine per replica; @serve.batch gathers prompts from
                                       all requests into one engine.generate call)

The ingress renders prompts and reads verdicts, the model replicas only generate: a /v1/judge with
both_orders or a /v1/rank sends several prompts at once, and prompts of concurrent requests share
batches. Routes: GET /healthz, GET /readyz, GET /v1/model, POST /v1/judge, POST /v1/rank, /docs, and
the OpenAI-compatible POST /v1/chat/completions and GET /v1/models (the judge as a plain chat model:
`rmr1 chains` can use it as its teacher).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable
from typing import Annotated, NamedTuple, TypeVar

from fastapi import APIRouter, FastAPI, HTTPException, Request, Security
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.serve.handle import DeploymentHandle

from rmr1_ray.config.serve import ServeConfig
from rmr1_ray.engines.base import GenerationEngine, chat_prompt_ids, response_texts
from rmr1_ray.prompts import InvalidPairError, Message, judge_messages
from rmr1_ray.serving import judging
from rmr1_ray.serving.schemas import (
    BatchStats,
    ChatChoice,
    ChatChoiceMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    JudgeRequest,
    JudgeResponse,
    ModelCard,
    ModelInfo,
    ModelList,
    RankRequest,
    RankResponse,
    Usage,
)

T = TypeVar("T")
log = logging.getLogger("ray.serve")  # Serve routes this logger to the replica's log file and the driver
READY_TIMEOUT_S = 5.0  # /readyz: a replica this slow to answer a no-op is not ready for more work


# --- engine replicas ------------------------------------------------------------------------------


class _Prompt(NamedTuple):
    token_ids: list[int]
    max_new_tokens: int
    temperature: float


@serve.deployment
class JudgeModel:
    """One judge engine (hf or vllm). `generate` takes one prompt; serve.batch runs many at once."""

    def __init__(self, config: ServeConfig) -> None:
        from rmr1_ray.models import load_tokenizer  # lazy: torch loads in the replica, not in the driver

        self.config = config
        self.tokenizer = load_tokenizer(config.model.tokenizer, trust_remote_code=config.model.trust_remote_code)
        self.engine = _make_engine(config)
        # serve.batch takes its sizes at decoration time; the configured ones are set here (one replica
        # per process, so setting them on the class-level batch queue is per replica).
        self._generate_batch.set_max_batch_size(config.replicas.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(config.replicas.batch_wait_timeout_s)
        self.batch_sizes: Counter[int] = Counter()
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def generate(self, messages: list[Message], max_new_tokens: int, temperature: float) -> dict:
        """{'text', 'prompt_tokens', 'completion_tokens', 'batch_size'}, or {'error'} for a prompt too long."""
        ids = chat_prompt_ids(self.tokenizer, messages)
        limit = self.config.limits.max_prompt_tokens
        if len(ids) > limit:
            return {"error": f"the judge prompt is {len(ids)} tokens; the limit is {limit} (limits.max_prompt_tokens)"}
        return await self._generate_batch(_Prompt(ids, max_new_tokens, temperature))

    @serve.batch
    async def _generate_batch(self, prompts: list[_Prompt]) -> list[dict]:
        # In a thread: the event loop keeps accepting requests, which queue up for the next batch.
        return await asyncio.to_thread(self._generate, prompts)

    def _generate(self, prompts: list[_Prompt]) -> list[dict]:
        from rmr1_ray.engines import SamplingParams

        s = self.config.sampling
        results: list[dict] = [{}] * len(prompts)
        # One engine call takes one set of sampling parameters: requests that differ go in separate calls.
        groups: dict[tuple[int, float], list[int]] = defaultdict(list)
        for i, prompt in enumerate(prompts):
            groups[(prompt.max_new_tokens, prompt.temperature)].append(i)
        for (max_new_tokens, temperature), rows in groups.items():
            params = SamplingParams(
                temperature=temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=max_new_tokens, seed=s.seed
            )
            start = time.perf_counter()
            out = self.engine.generate([prompts[i].token_ids for i in rows], params)
            self.batch_sizes[len(rows)] += 1
            log.info("judge batch: %d prompts, %.2f s", len(rows), time.perf_counter() - start)
            for i, (text, n) in zip(rows, response_texts(self.tokenizer, out), strict=True):
                results[i] = {
                    "text": text,
                    "prompt_tokens": len(prompts[i].token_ids),
                    "completion_tokens": n,
                    "batch_size": len(rows),
                }
        return results

    def stats(self) -> dict:
        prompts = sum(size * count for size, count in self.batch_sizes.items())
        batches = sum(self.batch_sizes.values())
        return BatchStats(
            replica=self.replica,
            max_batch_size=self.config.replicas.max_batch_size,
            batch_wait_timeout_s=self.config.replicas.batch_wait_timeout_s,
            prompts=prompts,
            batches=batches,
            mean_batch_size=prompts / batches if batches else 0.0,
            largest_batch=max(self.batch_sizes, default=0),
            histogram={str(size): count for size, count in sorted(self.batch_sizes.items())},
        ).model_dump()

    def ready(self) -> bool:
        return True

    def __del__(self) -> None:
        # Serve calls this when it stops a replica: vLLM may hold worker processes and GPU memory.
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()


def _make_engine(config: ServeConfig) -> GenerationEngine:
    from rmr1_ray.engines import make_engine

    # make_engine reads the backend's settings under RolloutConfig's names.
    settings = {**config.vllm.model_dump(), "seed": config.sampling.seed or 0}  # the engine's base seed
    return make_engine(config.engine, config.model.model_dump(), settings, config.device)


# --- HTTP ingress ---------------------------------------------------------------------------------


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over `max_bytes`, by Content-Length before anything is read and
    by counting while reading (a chunked upload declares no length). The body is buffered (it is at
    most max_bytes) and replayed to the app."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and not declared.isdigit():
            await _send_json(send, 400, f"bad Content-Length header {declared[:40]!r}")
            return
        if declared is not None and int(declared) > self.max_bytes:
            await self._too_large(send, int(declared))
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(send, size, "at least ")
                return
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for a disconnect, as ASGI servers do
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, send, size: int, qualifier: str = "") -> None:
        await _send_json(
            send, 413, f"request body is {qualifier}{size} bytes; the limit is {self.max_bytes} (limits.max_request_bytes)"
        )


async def _send_json(send, status: int, detail: str) -> None:
    body = JSONResponse({"detail": detail}).body
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_BEARER = HTTPBearer(auto_error=False, description="the key in the environment variable named by http.api_key_env")


class RequireKey:
    """A dependency: 401 unless the request carries `Authorization: Bearer <key>` (no-op without a key)."""

    def __init__(self, key: str | None) -> None:
        self.key = key.encode() if key else None

    async def __call__(self, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)]) -> None:
        if self.key is None:
            return
        given = credentials.credentials.encode() if credentials else b""
        if not hmac.compare_digest(given, self.key):  # constant time: no guessing the key by timing
            raise HTTPException(401, "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"})


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = jsonable_encoder(exc.errors())
    # FastAPI reports unparseable JSON as a validation error; it is a malformed request (400), not a
    # well-formed one with wrong content (422).
    status = 400 if any(e.get("type") == "json_invalid" for e in errors) else 422
    return JSONResponse({"detail": errors}, status_code=status)


async def _invalid_pair(_: Request, exc: InvalidPairError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=422)


def build_api(config: ServeConfig, judge: DeploymentHandle, api_key: str | None) -> FastAPI:
    """The FastAPI app of one ingress replica; `judge` reaches the JudgeModel replicas."""
    api = FastAPI(
        title="RM-R1 judge",
        summary="A reasoning reward model (chain-of-rubrics judge) as a service.",
        description=__doc__,
        version="1",
    )
    api.add_middleware(BodySizeLimit, max_bytes=config.limits.max_request_bytes)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(InvalidPairError, _invalid_pair)
    limits, sampling = config.limits, config.sampling
    v1 = APIRouter(prefix="/v1", dependencies=[Security(RequireKey(api_key))])

    def options(body: JudgeRequest | RankRequest) -> tuple[int, float, float]:
        max_new_tokens = body.max_tokens or sampling.max_new_tokens
        if max_new_tokens > limits.max_new_tokens:
            raise HTTPException(422, f"max_tokens={max_new_tokens} exceeds the server's limit {limits.max_new_tokens}")
        temperature = sampling.temperature if body.temperature is None else body.temperature
        return max_new_tokens, temperature, min(body.timeout_s or limits.request_timeout_s, limits.request_timeout_s)

    async def generate(messages: list[Message], max_new_tokens: int, temperature: float) -> dict:
        out = await judge.generate.remote(messages, max_new_tokens, temperature)
        if "error" in out:
            raise HTTPException(422, out["error"])
        return out

    async def judge_pair(
        context: list[Message], a: str, b: str, both_orders: bool, max_new_tokens: int, temperature: float
    ) -> JudgeResponse:
        start = time.perf_counter()
        orders = [("AB", a, b), ("BA", b, a)] if both_orders else [("AB", a, b)]
        generations = await asyncio.gather(
            *(generate(judge_messages(context, x, y, config.prompt_format), max_new_tokens, temperature)
              for _, x, y in orders)
        )
        runs = [judging.make_run(order, g) for (order, _, _), g in zip(orders, generations, strict=True)]
        return judging.combine(runs[0], runs[1] if both_orders else None, time.perf_counter() - start, config.model.path)

    async def within(deadline_s: float, work: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(deadline_s):
                return await work
        except TimeoutError:
            raise HTTPException(504, f"the judge did not answer within {deadline_s:g} s") from None

    @api.get("/healthz", summary="liveness: the HTTP front answers")
    async def healthz() -> dict:
        return {"status": "ok"}

    @api.get("/readyz", summary="readiness: a judge engine replica answers")
    async def readyz() -> JSONResponse:
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await judge.ready.remote()
        except Exception as exc:  # any failure means "do not send traffic yet"
            return JSONResponse({"ready": False, "detail": f"{type(exc).__name__}: {exc}"[:300]}, status_code=503)
        return JSONResponse({"ready": True})

    @v1.get("/model", summary="the judge, its defaults and limits, and batching statistics")
    async def model_info() -> ModelInfo:
        return ModelInfo(
            model=config.model.path,
            engine=config.engine,
            prompt_format=config.prompt_format,
            device=config.device,
            sampling=sampling.model_dump(),
            limits=limits.model_dump(),
            auth=api_key is not None,
            batching=BatchStats(**await judge.stats.remote()),
        )

    @v1.post("/judge", summary="which of two responses is better, with the judge's reasoning")
    async def judge_route(body: JudgeRequest) -> JudgeResponse:
        max_new_tokens, temperature, deadline = options(body)
        context = body.context()
        return await within(
            deadline,
            judge_pair(context, body.response_a, body.response_b, body.both_orders, max_new_tokens, temperature),
        )

    @v1.post("/rank", summary="rank N responses by pairwise judgements (round robin or knockout)")
    async def rank_route(body: RankRequest) -> RankResponse:
        max_new_tokens, temperature, deadline = options(body)
        n = len(body.responses)
        if n > limits.max_rank_responses:
            raise HTTPException(422, f"{n} responses; the limit is {limits.max_rank_responses} (limits.max_rank_responses)")
        for i, text in enumerate(body.responses):
            if not text.strip():
                raise InvalidPairError(f"responses[{i}]: empty")
        context = body.context()
        # Checks the conversation now: a bad one is a 422 before the judge spends any time on it.
        judge_messages(context, body.responses[0], body.responses[1], config.prompt_format)

        def play(a: int, b: int):
            return judge_pair(context, body.responses[a], body.responses[b], body.both_orders, max_new_tokens, temperature)

        start = time.perf_counter()
        tournament = judging.round_robin if body.method == "round_robin" else judging.knockout
        matches = await within(deadline, tournament(n, play))
        return RankResponse(
            method=body.method,
            ranking=judging.ranking(body.method, n, matches),
            table=judging.table(n, matches),
            matches=matches,
            latency_s=time.perf_counter() - start,
            model=config.model.path,
        )

    # --- OpenAI-compatible: the judge model answers the messages as given (no judge prompt around them)
    served = config.openai_model_name
    started = int(time.time())

    @v1.get("/models", summary="OpenAI-compatible model list: the one model this app serves")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=served, created=started)])

    @v1.post("/chat/completions", summary="OpenAI-compatible chat completion by the judge model")
    async def chat_completions(body: ChatCompletionRequest) -> ChatCompletionResponse:
        if body.model != served:
            # As vLLM's server: a wrong model name is a 404, which clients treat as a configuration error.
            raise HTTPException(404, f"the model `{body.model}` does not exist; this server serves `{served}`")
        max_new_tokens = body.max_completion_tokens or body.max_tokens or sampling.max_new_tokens
        if max_new_tokens > limits.max_new_tokens:
            raise HTTPException(422, f"max_tokens={max_new_tokens} exceeds the server's limit {limits.max_new_tokens}")
        temperature = sampling.temperature if body.temperature is None else body.temperature
        messages = [m.model_dump() for m in body.messages]
        out = await within(limits.request_timeout_s, generate(messages, max_new_tokens, temperature))
        tokens = out["completion_tokens"]
        return ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=served,
            # The engine stops at EOS or at the budget: a full budget means the text was cut.
            choices=[ChatChoice(message=ChatChoiceMessage(content=out["text"]),
                                finish_reason="length" if tokens >= max_new_tokens else "stop")],
            usage=Usage(prompt_tokens=out["prompt_tokens"], completion_tokens=tokens,
                        total_tokens=out["prompt_tokens"] + tokens),
        )

    api.include_router(v1)
    return api


@serve.deployment
@serve.ingress()
class JudgeIngress:
    def __init__(self, judge: DeploymentHandle, config: ServeConfig) -> None:
        self.judge = judge
        self.config = config
        env = config.http.api_key_env
        self.api_key = os.environ.get(env) if env else None
        if env and not self.api_key:
            # Fail the deployment rather than serve without the key the config asks for.
            raise RuntimeError(f"http.api_key_env={env!r}, but ${env} is not set (or empty) on this replica's node")

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self.config, self.judge, self.api_key)


def build_app(config: ServeConfig):
    """The Serve application (deployment graph) for `config`; start it with serve.run."""
    replicas = config.replicas
    model = JudgeModel.options(
        ray_actor_options={"num_cpus": replicas.num_cpus, "num_gpus": replicas.num_gpus},
        max_ongoing_requests=replicas.max_ongoing_requests,
        autoscaling_config=replicas.autoscaling.model_dump(),
    ).bind(config)
    # The ingress only parses and fans out: it reserves no CPU, so on a laptop the engines get the cores.
    return JudgeIngress.options(
        num_replicas=config.http.ingress_replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=config.http.max_ongoing_requests,
    ).bind(model, config)
