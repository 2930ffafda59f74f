"""Read a judge's output: RM-R1's reward and evaluation parse, and a strict chain-of-rubrics parser.

rm_r1_reward and eval_verdict reproduce RM-R1 exactly (including their quirks) so that our
training rewards and benchmark numbers are comparable with the paper's. parse_judgement is
ours: a strict check of the format the system prompt asks for, used for format rewards,
metrics and debugging.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

from rmr1_ray.prompts import Winner

Verdict = Literal["A", "B", "error"]

_TAG = {"A": "<answer>[[A]]</answer>", "B": "<answer>[[B]]</answer>"}
_WINNER_TO_VERDICT = {"model_a": "A", "model_b": "B"}

# End-of-sequence markers a decoder may leave when special tokens are not skipped
# (Qwen, GPT-style, Llama/Mistral, DeepSeek-R1-Distill, Llama 3).
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>", "</s>", "<｜end▁of▁sentence｜>", "<|eot_id|>")


def rm_r1_reward(text: str, winner: Winner) -> float:
    """RM-R1's RL reward: +1 if the last 80 characters hold the right verdict tag and not the other, else -1.

    The 80-character window is RM-R1's: a verdict anywhere else (or followed by a long tail) earns -1.
    """
    if winner not in _WINNER_TO_VERDICT:
        raise ValueError(f"winner: {winner!r} is not 'model_a' or 'model_b'")
    right = _WINNER_TO_VERDICT[winner]
    wrong = "B" if right == "A" else "A"
    tail = text[-80:]
    return 1.0 if _TAG[right] in tail and _TAG[wrong] not in tail else -1.0


def eval_verdict(text: str) -> Verdict:
    """RM-R1's evaluation parse: '[[A]]' or '[[B]]' anywhere; both or neither is an error."""
    has_a, has_b = "[[A]]" in text, "[[B]]" in text
    if has_a and has_b:
        return "error"
    if has_a:
        return "A"
    if has_b:
        return "B"
    return "error"


def strip_eos(text: str) -> str:
    """Drop trailing whitespace and end-of-sequence tokens (in any mix and number)."""
    while True:
        stripped = text.rstrip()
        for eos in EOS_TOKENS:
            stripped = stripped.removesuffix(eos)
        if stripped == text:
            return text
        text = stripped


@dataclass(frozen=True)
class Judgement:
    task_type: Literal["Reasoning", "Chat"] | None
    rubric: str | None
    justify: str | None
    solution: str | None
    eval_text: str | None
    quotes_a: tuple[str, ...]
    summaries_a: tuple[str, ...]
    quotes_b: tuple[str, ...]
    summaries_b: tuple[str, ...]
    answer: Literal["A", "B"] | None
    format_valid: bool
    missing: tuple[str, ...]  # what is missing or wrong, human-readable; empty iff format_valid


@dataclass
class _Span:
    start: int  # index of '<tag>'
    end: int  # index just past '</tag>'
    content: str  # stripped inner text


def _find(body: str, tag: str, problems: list[str], start: int = 0) -> _Span | None:
    """First <tag>...</tag> at or after `start`; records a problem if absent or unclosed."""
    open_at = body.find(f"<{tag}>", start)
    if open_at < 0:
        problems.append(f"<{tag}>")
        return None
    inner = open_at + len(tag) + 2
    close_at = body.find(f"</{tag}>", inner)
    if close_at < 0:
        problems.append(f"unclosed <{tag}>")
        return None
    span = _Span(open_at, close_at + len(tag) + 3, body[inner:close_at].strip())
    if not span.content:
        problems.append(f"empty <{tag}>")
    return span


def _all(text: str, tag: str, problems: list[str]) -> tuple[str, ...]:
    """Non-empty contents of every <tag>...</tag> in text; records unclosed ones."""
    if text.count(f"<{tag}>") > text.count(f"</{tag}>"):
        problems.append(f"unclosed <{tag}>")
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
    return tuple(s.strip() for s in found if s.strip())


_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _answer(body: str, problems: list[str]) -> tuple[Literal["A", "B"] | None, _Span | None]:
    """The final <answer>, which must be the only one and hold exactly [[A]] or [[B]]."""
    found = list(_ANSWER.finditer(body))
    if body.count("<answer>") > len(found):
        problems.append("unclosed <answer>")
    if not found:
        if "<answer>" not in body:
            problems.append("<answer>")
        return None, None
    contents = {m.group(1) for m in found}
    if contents >= {"[[A]]", "[[B]]"}:
        problems.append("both verdicts present")
        return None, None
    if len(found) > 1:
        problems.append("multiple <answer> tags")
    last = found[-1]
    if last.group(1) not in ("[[A]]", "[[B]]"):
        problems.append(f"<answer> must be [[A]] or [[B]], got {last.group(1)[:40]!r}")
        return None, None
    verdict: Literal["A", "B"] = "A" if last.group(1) == "[[A]]" else "B"
    return verdict, _Span(last.start(), last.end(), last.group(1))


def parse_judgement(text: str) -> Judgement:
    """Parse (and strictly check) a chain-of-rubrics judgement.

    Valid Reasoning: <type>Reasoning</type> <solution>..</solution> <eval>..</eval> <answer>[[X]]</answer>
    Valid Chat:      <type>Chat</type> <rubric>..<justify>..</justify>..</rubric> <eval>..</eval> <answer>..
    Only whitespace may separate sections; <eval> must quote or summarise both chatbots; the
    answer must end the text (trailing whitespace and EOS tokens are ignored). A leading
    <think>...</think> block (DeepSeek-R1-Distill judges) is skipped; so is a bare
    '...</think>' prefix, since those chat templates open the <think> inside the prompt.
    """
    problems: list[str] = []
    body = strip_eos(text)

    think_end = body.find("</think>")
    if body.lstrip().startswith("<think>"):
        if think_end < 0:
            return _invalid(("unclosed <think>",))
        body = body[think_end + len("</think>") :]
    elif think_end >= 0 and (body.find("<type>") < 0 or think_end < body.find("<type>")):
        body = body[think_end + len("</think>") :]

    type_span = _find(body, "type", problems)
    task_type: Literal["Reasoning", "Chat"] | None = None
    if type_span is not None and type_span.content in ("Reasoning", "Chat"):
        task_type = "Reasoning" if type_span.content == "Reasoning" else "Chat"
    elif type_span is not None and type_span.content:
        problems.append(f"<type> must be Reasoning or Chat, got {type_span.content[:40]!r}")

    # Extract every section leniently (so a broken chain is still inspectable), but only
    # report the ones the task type requires as missing.
    wanted = {"Reasoning": ("solution",), "Chat": ("rubric",), None: ()}[task_type]
    spans: dict[str, _Span | None] = {}
    for tag in ("solution", "rubric"):
        tag_problems: list[str] = []
        spans[tag] = _find(body, tag, tag_problems)
        if tag in wanted:
            problems += tag_problems
    justify = None
    if spans["rubric"] is not None:
        justify_problems: list[str] = []
        justify_span = _find(spans["rubric"].content, "justify", justify_problems)
        justify = justify_span.content if justify_span else None
        if task_type == "Chat":
            problems += justify_problems

    eval_span = _find(body, "eval", problems)
    eval_text = eval_span.content if eval_span else None
    quotes_a = summaries_a = quotes_b = summaries_b = ()
    if eval_span is not None:
        quotes_a = _all(eval_text, "quote_A", problems)
        summaries_a = _all(eval_text, "summary_A", problems)
        quotes_b = _all(eval_text, "quote_B", problems)
        summaries_b = _all(eval_text, "summary_B", problems)
        if not quotes_a and not summaries_a:
            problems.append("<quote_A> or <summary_A> in <eval>")
        if not quotes_b and not summaries_b:
            problems.append("<quote_B> or <summary_B> in <eval>")

    answer, answer_span = _answer(body, problems)

    if re.search(r"<[^<>\s]*$", body):  # generation cut inside a tag, e.g. '...</ev'
        problems.append(f"text cut mid-tag: {body[body.rfind('<') :]!r}")

    # Layout: sections in order, separated only by whitespace, nothing after the answer.
    if not problems:  # so every section the task type needs was found
        order = [
            ("type", type_span),
            (wanted[0], spans[wanted[0]]),
            ("eval", eval_span),
            ("answer", answer_span),
        ]
        misplaced = [tag for (_, prev), (tag, span) in pairwise(order) if span.start < prev.end]
        if misplaced:
            problems.append(f"<{misplaced[0]}> out of order")
        else:
            pos = 0
            for tag, span in order:
                if body[pos : span.start].strip():
                    problems.append(f"unexpected text before <{tag}>")
                pos = span.end
            if body[pos:].strip():
                problems.append("text after </answer>")

    return Judgement(
        task_type=task_type,
        rubric=spans["rubric"].content if spans["rubric"] else None,
        justify=justify,
        solution=spans["solution"].content if spans["solution"] else None,
        eval_text=eval_text,
        quotes_a=quotes_a,
        summaries_a=summaries_a,
        quotes_b=quotes_b,
        summaries_b=summaries_b,
        answer=answer,
        format_valid=not problems,
        missing=tuple(dict.fromkeys(problems)),  # de-duplicated, first-seen order
    )


def _invalid(missing: tuple[str, ...]) -> Judgement:
    return Judgement(None, None, None, None, None, (), (), (), (), None, False, missing)


@dataclass(frozen=True)
class RewardSpec:
    correct: float = 1.0
    wrong: float = -1.0
    format_bonus: float = 0.0  # added when the chain is well-formed and the verdict is correct
    format_penalty: float = 0.0  # subtracted when the chain is malformed, right or wrong


_DEFAULT_SPEC = RewardSpec()  # frozen, so sharing one default instance is safe


def verdict_reward(text: str, winner: Winner, spec: RewardSpec = _DEFAULT_SPEC) -> float:
    """RM-R1's correctness (rm_r1_reward) mapped to spec.correct/spec.wrong, plus format shaping.

    With the default spec this equals rm_r1_reward exactly (and skips parsing).
    """
    correct = rm_r1_reward(text, winner) > 0
    reward = spec.correct if correct else spec.wrong
    if spec.format_bonus or spec.format_penalty:
        if parse_judgement(text).format_valid:
            if correct:
                reward += spec.format_bonus
        else:
            reward -= spec.format_penalty
    return reward
