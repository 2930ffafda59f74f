"""Request and response bodies of the judge service (they are also its OpenAPI schema at /docs).

Requests are strict: unknown fields, wrong JSON types (a number where text belongs, "yes" for a
boolean) and out-of-range values are 422s, never silently converted. Size caps here bound what
one request can ask of the server; the server's config tightens some of them (limits.*).

Winner semantics (verdicts are read with RM-R1's own parse, `verdict.eval_verdict`):
- one order: "A" or "B" as the judge said, "none" when its output holds no verdict.
- both_orders: the pair is judged as (A, B) and again swapped; "A"/"B" only when both runs name
  the same response (consistent=true); "inconsistent" when each run names a different one (the
  judge followed the position, not the content); "none" when either run gave no verdict.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_TEXT_CHARS = 200_000
MAX_TURNS = 64
MAX_RANK_RESPONSES = 64  # schema cap; limits.max_rank_responses is the configured one

Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
Winner = Literal["A", "B", "inconsistent", "none"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ChatMessage(_Strict):
    role: Literal["user", "assistant"]
    content: Text


class _Prompt(_Strict):
    """What the responses answer (a question or a conversation ending with a user turn), and options."""

    question: Text | None = Field(None, description="a single user question")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, max_length=MAX_TURNS, description="or a conversation: user, assistant, ..., user"
    )
    both_orders: bool = Field(False, description="judge every pair twice, swapping the positions")
    max_tokens: int | None = Field(None, ge=1, description="judge output budget (default and cap: server config)")
    temperature: float | None = Field(None, ge=0, le=2, description="default: server config (0: greedy)")
    timeout_s: float | None = Field(None, gt=0, description="give up (504) sooner than the server's own limit")

    @model_validator(mode="after")
    def _one_prompt(self) -> _Prompt:
        if (self.question is None) == (self.messages is None):
            raise ValueError("give exactly one of `question` and `messages`")
        return self

    def context(self) -> list[dict[str, str]]:
        if self.question is not None:
            return [{"role": "user", "content": self.question}]
        return [m.model_dump() for m in self.messages or ()]


class JudgeRequest(_Prompt):
    response_a: Text
    response_b: Text


class RankRequest(_Prompt):
    responses: list[Text] = Field(min_length=2, max_length=MAX_RANK_RESPONSES)
    method: Literal["round_robin", "knockout"] = Field(
        "round_robin",
        description="round_robin: every pair, score = wins + half of undecided matches; "
        "knockout: single elimination in input order (0 v 1, 2 v 3, ...; an odd one out gets a bye), "
        "score = rounds survived (a bye counts)",
    )


class JudgeRun(BaseModel):
    """One generation by the judge, with its chain-of-rubrics sections."""

    order: Literal["AB", "BA"] = Field(description="AB: response_a was shown as Chatbot A")
    verdict: Literal["A", "B", "none"] = Field(description="in the request's labels: A is response_a")
    task_type: Literal["Reasoning", "Chat"] | None
    rubric: str | None
    solution: str | None
    eval_text: str | None
    raw_text: str
    format_valid: bool = Field(description="the output follows the chain-of-rubrics format strictly")
    format_problems: list[str]
    prompt_tokens: int
    completion_tokens: int
    batch_size: int = Field(description="prompts that shared this engine call (dynamic batching)")


class JudgeResponse(JudgeRun):
    """The (A, B) run's fields at the top level; with both_orders the swapped run is in `swapped`."""

    winner: Winner
    consistent: bool | None = Field(description="both_orders: whether both runs named the same response")
    swapped: JudgeRun | None
    latency_s: float
    model: str


class Match(BaseModel):
    a: int = Field(description="index of the response shown as Chatbot A")
    b: int
    round: int = Field(description="1 in round_robin; the knockout round otherwise")
    winner: int | None = Field(description="index of the winner; None when undecided")
    advanced: int | None = Field(
        description="knockout: who went on (undecided matches advance the lower index); None in round_robin"
    )
    result: JudgeResponse


class RankEntry(BaseModel):
    index: int
    score: float


class RankResponse(BaseModel):
    method: Literal["round_robin", "knockout"]
    ranking: list[RankEntry] = Field(description="best first; equal scores keep input order")
    table: list[list[float | None]] = Field(
        description="table[i][j]: i's result against j (1 win, 0 loss, 0.5 undecided), None if not played"
    )
    matches: list[Match]
    latency_s: float
    model: str


class BatchStats(BaseModel):
    replica: str
    max_batch_size: int
    batch_wait_timeout_s: float
    prompts: int
    batches: int
    mean_batch_size: float
    largest_batch: int
    histogram: dict[str, int] = Field(description="batch size -> number of engine calls of that size")


class ModelInfo(BaseModel):
    model: str
    engine: Literal["hf", "vllm"]
    prompt_format: Literal["instruct", "distilled"]
    device: str
    sampling: dict[str, float | int | None]
    limits: dict[str, float | int]
    auth: bool = Field(description="whether /v1/* needs a bearer key")
    batching: BatchStats = Field(description="of the replica that answered (one per engine copy)")


# --- OpenAI-compatible chat completions (the judge as a teacher for `rmr1 chains`, or any client) ---


class OpenAIMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat-completions request a judge can honour. Unlike the /v1/judge bodies,
    unknown fields are ignored: OpenAI SDKs and relays send many (user, presence_penalty, ...), and
    rejecting them would make the route unusable from those clients. The fields read here are typed."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[OpenAIMessage] = Field(min_length=1, max_length=2 * MAX_TURNS)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    temperature: float | None = Field(None, ge=0, le=2)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = Field(False, description="streaming is not offered: false only")

    @model_validator(mode="after")
    def _not_streaming(self) -> ChatCompletionRequest:
        if self.stream:
            raise ValueError("stream=true is not supported; send stream=false (or leave it out)")
        return self


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rmr1-ray"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
