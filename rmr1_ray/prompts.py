"""RM-R1 judge prompts: turn a preference pair into the chat messages a judge model sees.

The strings below are the released RM-R1 prompt formats, byte for byte: the published
checkpoints and the RM-R1 training data were made with them, so any change (even whitespace)
silently shifts the judge off-distribution. tests/unit/test_prompts.py checks them against
the reference copy in shared/reference/rm_r1_prompt_format.json.

Two formats:
- "instruct": checkpoints trained from Qwen2.5-Instruct; SYSTEM_PROMPT as the system message
  (it asks for the chain-of-rubrics output) and USER_TEMPLATE_* as the user message.
- "distilled": checkpoints trained from DeepSeek-R1-Distill; no system message (those models
  are trained without one) and DISTILLED_TEMPLATE_* as the only user message.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

PromptFormat = Literal["instruct", "distilled"]
Position = Literal["A", "B"]
Winner = Literal["model_a", "model_b"]
Message = dict[str, str]  # {"role": ..., "content": ...}

SYSTEM_PROMPT = """\
Please act as an impartial judge and evaluate the quality of the responses provided by two AI Chatbots to the Client's question displayed below.

First, classify the task into one of two categories: <type>Reasoning</type> or <type>Chat</type>.
- Use <type>Reasoning</type> for tasks that involve math, coding, or require domain knowledge, multi-step inference, logical deduction, or combining information to reach a conclusion.
- Use <type>Chat</type> for tasks that involve open-ended or factual conversation, stylistic rewrites, safety questions, or general helpfulness requests without deep reasoning.

If the task is Reasoning:
1. Solve the Client's question yourself and present your final answer within <solution>...</solution> tags.
2. Evaluate the two Chatbot responses based on correctness, completeness, and reasoning quality, referencing your own solution.
3. Include your evaluation inside <eval>...</eval> tags, quoting or summarizing the Chatbots using the following tags:
   - <quote_A>...</quote_A> for direct quotes from Chatbot A
   - <summary_A>...</summary_A> for paraphrases of Chatbot A
   - <quote_B>...</quote_B> for direct quotes from Chatbot B
   - <summary_B>...</summary_B> for paraphrases of Chatbot B
4. End with your final judgment in the format: <answer>[[A]]</answer> or <answer>[[B]]</answer>

If the task is Chat:
1. Generate evaluation criteria (rubric) tailored to the Client's question and context, enclosed in <rubric>...</rubric> tags.
2. Assign weights to each rubric item based on their relative importance.
3. Inside <rubric>, include a <justify>...</justify> section explaining why you chose those rubric criteria and weights.
4. Compare both Chatbot responses according to the rubric.
5. Provide your evaluation inside <eval>...</eval> tags, using <quote_A>, <summary_A>, <quote_B>, and <summary_B> as described above.
6. End with your final judgment in the format: <answer>[[A]]</answer> or <answer>[[B]]</answer>

Important Notes:
- Be objective and base your evaluation only on the content of the responses.
- Do not let response order, length, or Chatbot names affect your judgment.
- Follow the response format strictly depending on the task type.

Your output must follow one of the two formats below:

For Reasoning:
<type>Reasoning</type>

<solution> your own solution for the problem </solution>

<eval>
  include direct comparisons supported by <quote_A>...</quote_A> or <summary_A>...</summary_A>, and <quote_B>...</quote_B>, or <summary_B>...</summary_B>
</eval>

<answer>[[A/B]]</answer>

For Chat:
<type>Chat</type>

<rubric>
  detailed rubric items
  <justify> justification for the rubric </justify>
</rubric>

<eval>
  include direct comparisons supported by <quote_A>...</quote_A> or <summary_A>...</summary_A>, and <quote_B>...</quote_B>, or <summary_B>...</summary_B> tags
</eval>

<answer>[[A/B]]</answer>"""

USER_TEMPLATE_SINGLE_TURN = (
    "[Client Question]\n{question}\n\n"
    "[The Start of Chatbot A's Response]\n{answer_a}\n[The End of Chatbot A's Response]\n\n"
    "[The Start of Chatbot B's Response]\n{answer_b}\n[The End of Chatbot B's Response]"
)

USER_TEMPLATE_MULTI_TURN = (
    "[The Start of the Conversation between Chatbot A and the Client]\n{conversation_1}\n"
    "[The End of the Conversation between Chatbot A and the Client]\n\n"
    "[The Start of the Conversation between Chatbot B and the Client]\n{conversation_2}\n"
    "[The End of the Conversation between Chatbot B and the Client]"
)

# The distilled templates are the instruct user templates wrapped in a short instruction
# (note the released text's space before "\n\n" and "Client question", lower-case q).
_DISTILLED_PREFIX = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two "
    "AI Chatbots to the Client question displayed below. \n\n"
)
_DISTILLED_SUFFIX = (
    "\n\nOutput your final verdict at last by strictly following this format: "
    "'<answer>[[A]]</answer>' if Chatbot A is better, or '<answer>[[B]]</answer>' if Chatbot B is better."
)
DISTILLED_TEMPLATE_SINGLE_TURN = _DISTILLED_PREFIX + USER_TEMPLATE_SINGLE_TURN + _DISTILLED_SUFFIX
DISTILLED_TEMPLATE_MULTI_TURN = _DISTILLED_PREFIX + USER_TEMPLATE_MULTI_TURN + _DISTILLED_SUFFIX

_TEMPLATES: dict[str, tuple[str, str]] = {  # fmt -> (single turn, multi turn)
    "instruct": (USER_TEMPLATE_SINGLE_TURN, USER_TEMPLATE_MULTI_TURN),
    "distilled": (DISTILLED_TEMPLATE_SINGLE_TURN, DISTILLED_TEMPLATE_MULTI_TURN),
}


class InvalidPairError(ValueError):
    """A preference pair that cannot be rendered; the message names the field and the problem."""


def _check_context(context: Sequence[Message]) -> None:
    """The judge prompt needs a user question last and user/assistant turns in between."""
    if isinstance(context, str | bytes) or not isinstance(context, Sequence):
        raise InvalidPairError(f"context: expected a sequence of messages, got {type(context).__name__}")
    if not context:
        raise InvalidPairError("context: empty (need at least one user message)")
    for i, msg in enumerate(context):
        if not isinstance(msg, dict):
            raise InvalidPairError(f"context[{i}]: expected a dict message, got {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        expected = "user" if i % 2 == 0 else "assistant"
        if role not in ("user", "assistant"):
            raise InvalidPairError(f"context[{i}].role: {role!r} is not 'user' or 'assistant'")
        if role != expected:
            raise InvalidPairError(
                f"context[{i}].role: roles must alternate starting with 'user'; expected {expected!r}, got {role!r}"
            )
        if not isinstance(content, str):
            raise InvalidPairError(f"context[{i}].content: expected str, got {type(content).__name__}")
        if not content.strip():
            raise InvalidPairError(f"context[{i}].content: empty")
    if context[-1]["role"] != "user":
        raise InvalidPairError("context: must end with a user message (the answers reply to it)")


def _check_answer(name: str, answer: object) -> None:
    if not isinstance(answer, str):
        raise InvalidPairError(f"{name}: expected str, got {type(answer).__name__}")
    if not answer.strip():
        raise InvalidPairError(f"{name}: empty")


@dataclass(frozen=True)
class PreferencePair:
    context: tuple[Message, ...]  # conversation before the answers: user, assistant, ..., user
    chosen: str  # preferred final assistant answer
    rejected: str

    def __post_init__(self) -> None:
        # Accept a list for convenience (data loaders produce lists); store a tuple.
        if isinstance(self.context, list):
            object.__setattr__(self, "context", tuple(self.context))

    def validate(self) -> None:
        _check_context(self.context)
        _check_answer("chosen", self.chosen)
        _check_answer("rejected", self.rejected)
        # Identical answers carry no preference: any verdict would be rewarded as right or wrong by chance.
        if self.chosen == self.rejected:
            raise InvalidPairError("chosen and rejected are identical")

    @property
    def is_multi_turn(self) -> bool:
        return len(self.context) > 1


def _conversation(context: Sequence[Message], answer: str, chatbot: str) -> str:
    turns = [*context, {"role": "assistant", "content": answer}]
    return "\n".join(f"{'User' if m['role'] == 'user' else chatbot}: {m['content']}" for m in turns)


def judge_messages(
    context: Sequence[Message], answer_a: str, answer_b: str, fmt: PromptFormat
) -> list[Message]:
    """Chat messages asking the judge to compare answer_a (Chatbot A) and answer_b (Chatbot B)."""
    if fmt not in _TEMPLATES:
        raise ValueError(f"fmt: {fmt!r} is not one of {sorted(_TEMPLATES)}")
    _check_context(context)
    _check_answer("answer_a", answer_a)
    _check_answer("answer_b", answer_b)
    single, multi = _TEMPLATES[fmt]
    if len(context) == 1:
        user = single.format(question=context[0]["content"], answer_a=answer_a, answer_b=answer_b)
    else:
        user = multi.format(
            conversation_1=_conversation(context, answer_a, "Chatbot A"),
            conversation_2=_conversation(context, answer_b, "Chatbot B"),
        )
    if fmt == "instruct":
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
    return [{"role": "user", "content": user}]


def render_pair(pair: PreferencePair, preferred: Position, fmt: PromptFormat) -> tuple[list[Message], Winner]:
    """Messages with pair.chosen shown at `preferred`, and the matching winner label."""
    if preferred not in ("A", "B"):
        raise ValueError(f"preferred: {preferred!r} is not 'A' or 'B'")
    pair.validate()
    if preferred == "A":
        return judge_messages(pair.context, pair.chosen, pair.rejected, fmt), "model_a"
    return judge_messages(pair.context, pair.rejected, pair.chosen, fmt), "model_b"


def _stable_hash(key: str, seed: int) -> int:
    # blake2b, not hash(): Python salts str hashes per process, and positions must agree
    # across Ray workers and reruns. An int's repr has no ':', so (seed, key) -> bytes is injective.
    data = f"{seed}:{key}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def position_for(key: str, seed: int) -> Position:
    """Where to show the preferred answer for example `key`: reproducible, A or B with p=0.5."""
    return "A" if _stable_hash(key, seed) & 1 == 0 else "B"


def balanced_positions(keys: Sequence[str], seed: int) -> list[Position]:
    """Positions for `keys` with A and B counts differing by at most one.

    Keys are ranked by their seeded hash and alternate A/B in that order, so each key's
    position depends only on the set of keys and the seed, not on their order. A random
    per-example choice (position_for) lets small sets come out lopsided, which a judge with
    a position bias would exploit.
    """
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            raise ValueError(f"keys: duplicate key {key!r} (positions must be a function of the key)")
        seen.add(key)
    ranked = sorted(range(len(keys)), key=lambda i: (_stable_hash(keys[i], seed), keys[i]))
    positions: list[Position] = ["A"] * len(keys)
    for rank, i in enumerate(ranked):
        positions[i] = "A" if rank % 2 == 0 else "B"
    return positions
