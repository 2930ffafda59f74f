"""One small adapter per preference-data schema: a raw record -> PreferencePair, or a RowError.

An adapter checks structure (fields present, types, roles, one shared question) and raises
RowError(reason, detail): `reason` is one of the constants below (what stats.json counts),
`detail` names the field and the problem (what rejects.jsonl shows). Content filters that are
not malformations (empty or identical answers) are `filter_reason`'s job: they count as drops.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from rmr1_ray.prompts import Message, PreferencePair

# Why a row is malformed (rejects.jsonl `reason`, stats.json `rejected`).
INVALID_JSON = "invalid JSON"
MISSING_FIELD = "missing field"
WRONG_TYPE = "wrong type"
WRONG_ROLES = "wrong roles"
QUESTION_DIFFERS = "question differs"
EMPTY_MESSAGE = "empty message"
INVALID_PAIR = "invalid pair"  # passed the adapter but not prompts.PreferencePair.validate (a bug if it happens)

# Why a well-formed row is left out (stats.json `dropped`).
EMPTY_ANSWER = "empty answer"
IDENTICAL_ANSWERS = "identical answers"


class RowError(ValueError):
    """A malformed row: skipped, counted under `reason`, and written to rejects.jsonl with `detail`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def field(record: dict[str, Any], name: str) -> Any:
    if record.get(name) is None:  # a null is as missing as an absent key (parquet writes nulls)
        raise RowError(MISSING_FIELD, f"missing field '{name}'")
    return record[name]


def text_field(record: dict[str, Any], name: str) -> str:
    value = field(record, name)
    if not isinstance(value, str):
        raise RowError(WRONG_TYPE, f"field '{name}': expected a string, got {type(value).__name__}")
    return value


def messages_field(
    record: dict[str, Any], name: str, roles: tuple[str, ...] = ("user", "assistant"), expected: str = "a list of messages"
) -> list[Message]:
    """A list of {role, content} messages with string contents and roles among `roles`."""
    value = field(record, name)
    if not isinstance(value, list):
        raise RowError(WRONG_TYPE, f"field '{name}': expected {expected}, got {type(value).__name__}")
    if not value:
        raise RowError(WRONG_ROLES, f"field '{name}': no messages")
    messages = []
    for i, message in enumerate(value):
        where = f"field '{name}', message {i}"
        if not isinstance(message, dict):
            raise RowError(WRONG_TYPE, f"{where}: expected an object with role and content, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role is None or content is None:
            raise RowError(MISSING_FIELD, f"{where}: missing {'role' if role is None else 'content'}")
        if not isinstance(content, str):
            raise RowError(WRONG_TYPE, f"{where}: content is a {type(content).__name__}, not a string")
        if role not in roles:
            raise RowError(WRONG_ROLES, f"{where}: role {role!r} is not one of {', '.join(roles)}")
        messages.append({"role": role, "content": content})
    return messages


def check_turns(messages: list[Message], name: str, last: str, start: int = 0) -> None:
    """Roles alternate user/assistant starting with user and ending with `last`; no empty message but the last.

    `start`: index of messages[0] in the field, for error messages (1 after a system message)."""
    for i, message in enumerate(messages, start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise RowError(WRONG_ROLES, f"field '{name}', message {i}: role {message['role']!r}, expected {expected!r} "
                           "(turns alternate user/assistant, starting with user)")
        if i < start + len(messages) - 1 and not message["content"].strip():
            raise RowError(EMPTY_MESSAGE, f"field '{name}', message {i}: empty content")
    if messages[-1]["role"] != last:
        raise RowError(WRONG_ROLES, f"field '{name}': the last message must be from the {last}, "
                       f"got {messages[-1]['role']!r}")


def _question(record: dict[str, Any], name: str, text_only: bool = False) -> tuple[Message, ...]:
    """A prompt given as a string (one user turn) or, unless `text_only`, as messages ending with the user's turn."""
    if text_only or isinstance(record.get(name), str):
        context = [{"role": "user", "content": text_field(record, name)}]
    else:
        context = messages_field(record, name, expected="a string or a list of messages")
        check_turns(context, name, last="user")
    if not context[-1]["content"].strip():
        raise RowError(EMPTY_MESSAGE, f"field '{name}': the question is empty")
    return tuple(context)


def _answer(record: dict[str, Any], name: str, context: tuple[Message, ...]) -> str:
    """An answer given as a string, or as messages: [assistant] or the whole conversation + assistant."""
    if isinstance(record.get(name), str):
        return record[name]
    messages = messages_field(record, name, expected="a string or a list of messages")
    if len(messages) > 1:
        check_turns(messages, name, last="assistant")
        if tuple(messages[:-1]) != context:
            raise RowError(QUESTION_DIFFERS, f"field '{name}': its conversation differs from the prompt's")
    elif messages[0]["role"] != "assistant":
        raise RowError(WRONG_ROLES, f"field '{name}': a one-message answer must be from the assistant")
    return messages[-1]["content"]


def skywork(record: dict[str, Any]) -> PreferencePair:
    """Skywork-Reward-Preference: `chosen` and `rejected` are whole conversations sharing all but the last turn."""
    chosen, rejected = messages_field(record, "chosen"), messages_field(record, "rejected")
    check_turns(chosen, "chosen", last="assistant")
    check_turns(rejected, "rejected", last="assistant")
    if chosen[:-1] != rejected[:-1]:
        raise RowError(QUESTION_DIFFERS, "fields 'chosen' and 'rejected': the conversations before the answers differ")
    return PreferencePair(tuple(chosen[:-1]), chosen[-1]["content"], rejected[-1]["content"])


def code_pref(record: dict[str, Any]) -> PreferencePair:
    """Code-Preference-Pairs: `input`, `accepted`, `rejected` strings."""
    question = _question(record, "input", text_only=True)
    return PreferencePair(question, text_field(record, "accepted"), text_field(record, "rejected"))


def math_step_dpo(record: dict[str, Any]) -> PreferencePair:
    """Math-Step-DPO-10K: each answer is the shared `initial_reason_steps` followed by `full_chosen`/`full_rejected`."""
    question = _question(record, "prompt", text_only=True)
    prefix = text_field(record, "initial_reason_steps")
    return PreferencePair(question, prefix + text_field(record, "full_chosen"), prefix + text_field(record, "full_rejected"))


def pairwise(record: dict[str, Any]) -> PreferencePair:
    """Generic: `prompt` (string or messages), `chosen`/`rejected` (strings, or messages ending with the answer)."""
    context = _question(record, "prompt")
    return PreferencePair(context, _answer(record, "chosen", context), _answer(record, "rejected", context))


ADAPTERS: dict[str, Callable[[dict[str, Any]], PreferencePair]] = {
    "skywork": skywork,
    "code_pref": code_pref,
    "math_step_dpo": math_step_dpo,
    "pairwise": pairwise,
}


def parse_record(kind: str, record: Any) -> PreferencePair:
    """The pair in `record` under schema `kind`; RowError if it is malformed."""
    if not isinstance(record, dict):
        raise RowError(WRONG_TYPE, f"a row must be an object with named fields, got {type(record).__name__}")
    return ADAPTERS[kind](record)


def filter_reason(pair: PreferencePair) -> str | None:
    """Why a well-formed pair teaches nothing (empty or identical answers), or None to keep it."""
    if not pair.chosen.strip() or not pair.rejected.strip():
        return EMPTY_ANSWER
    if pair.chosen == pair.rejected:
        return IDENTICAL_ANSWERS
    return None


def pair_uid(pair: PreferencePair) -> str:
    """A stable id of a pair's content: equal pairs (from any source) share it, any change alters it."""
    content = json.dumps([[[m["role"], m["content"]] for m in pair.context], pair.chosen, pair.rejected], ensure_ascii=False)
    return hashlib.blake2b(content.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
