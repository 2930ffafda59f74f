"""Prompt rendering against the released RM-R1 prompt strings, labels, and position assignment."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmr1_ray import prompts
from rmr1_ray.prompts import (
    InvalidPairError,
    PreferencePair,
    balanced_positions,
    judge_messages,
    position_for,
    render_pair,
)

pytestmark = pytest.mark.unit

REFERENCE_PATH = Path(__file__).resolve().parents[3] / "shared" / "reference" / "rm_r1_prompt_format.json"


@pytest.fixture(scope="module")
def ref() -> dict:
    if not REFERENCE_PATH.exists():
        pytest.skip(f"RM-R1 reference prompt file not found at {REFERENCE_PATH}")
    return json.loads(REFERENCE_PATH.read_text(encoding="utf-8"))


SINGLE_CONTEXT = ({"role": "user", "content": "What is 2 + 2? Answer with {braces} kept."},)
MULTI_CONTEXT = (
    {"role": "user", "content": "Hi, can you help me plan a trip?"},
    {"role": "assistant", "content": "Sure! Where to?"},
    {"role": "user", "content": "Lisbon,\nfor three days."},
)


@pytest.mark.parametrize(
    ("const", "key"),
    [
        ("SYSTEM_PROMPT", "system_prompt"),
        ("USER_TEMPLATE_SINGLE_TURN", "user_template_single_turn"),
        ("USER_TEMPLATE_MULTI_TURN", "user_template_multi_turn"),
        ("DISTILLED_TEMPLATE_SINGLE_TURN", "reasoning_model_user_template_single_turn"),
        ("DISTILLED_TEMPLATE_MULTI_TURN", "reasoning_model_user_template_multi_turn"),
    ],
)
def test_strings_are_byte_identical_to_reference(ref, const, key):
    assert getattr(prompts, const).encode("utf-8") == ref[key].encode("utf-8")


@pytest.mark.parametrize(
    ("fmt", "key"),
    [("instruct", "user_template_single_turn"), ("distilled", "reasoning_model_user_template_single_turn")],
)
def test_single_turn_matches_reference(ref, fmt, key):
    context = SINGLE_CONTEXT
    msgs = judge_messages(context, "It is 4.", "It is 5.", fmt)
    user = ref[key].format(question=context[0]["content"], answer_a="It is 4.", answer_b="It is 5.")
    if fmt == "instruct":
        assert msgs == [
            {"role": "system", "content": ref["system_prompt"]},
            {"role": "user", "content": user},
        ]
    else:
        assert msgs == [{"role": "user", "content": user}]
    # Braces in the user's content are data, not template fields.
    assert "{braces}" in msgs[-1]["content"]


@pytest.mark.parametrize(
    ("fmt", "key"),
    [("instruct", "user_template_multi_turn"), ("distilled", "reasoning_model_user_template_multi_turn")],
)
def test_multi_turn_matches_reference(ref, fmt, key):
    msgs = judge_messages(MULTI_CONTEXT, "Day 1: Alfama.", "Go to Porto instead.", fmt)
    conversation_1 = (
        "User: Hi, can you help me plan a trip?\n"
        "Chatbot A: Sure! Where to?\n"
        "User: Lisbon,\nfor three days.\n"
        "Chatbot A: Day 1: Alfama."
    )
    conversation_2 = (
        "User: Hi, can you help me plan a trip?\n"
        "Chatbot B: Sure! Where to?\n"
        "User: Lisbon,\nfor three days.\n"
        "Chatbot B: Go to Porto instead."
    )
    user = ref[key].format(conversation_1=conversation_1, conversation_2=conversation_2)
    assert msgs[-1] == {"role": "user", "content": user}
    assert len(msgs) == (2 if fmt == "instruct" else 1)
    assert "Chabot" not in user  # the original mixer's misspelling is not reproduced


@pytest.mark.parametrize("fmt", ["instruct", "distilled"])
@pytest.mark.parametrize("multi", [False, True])
def test_render_pair_places_chosen_and_labels(fmt, multi):
    context = MULTI_CONTEXT if multi else SINGLE_CONTEXT
    pair = PreferencePair(context=context, chosen="GOOD ANSWER", rejected="BAD ANSWER")
    assert pair.is_multi_turn is multi

    msgs_a, winner_a = render_pair(pair, "A", fmt)
    msgs_b, winner_b = render_pair(pair, "B", fmt)
    assert (winner_a, winner_b) == ("model_a", "model_b")
    assert msgs_a == judge_messages(context, "GOOD ANSWER", "BAD ANSWER", fmt)
    assert msgs_b == judge_messages(context, "BAD ANSWER", "GOOD ANSWER", fmt)
    user_a, user_b = msgs_a[-1]["content"], msgs_b[-1]["content"]
    assert user_a.index("GOOD ANSWER") < user_a.index("BAD ANSWER")
    assert user_b.index("BAD ANSWER") < user_b.index("GOOD ANSWER")
    if multi:
        assert "Chatbot A: GOOD ANSWER" in user_a and "Chatbot B: BAD ANSWER" in user_a
        assert "Chatbot A: BAD ANSWER" in user_b and "Chatbot B: GOOD ANSWER" in user_b


def test_context_list_is_stored_as_tuple():
    pair = PreferencePair(context=[{"role": "user", "content": "q"}], chosen="a", rejected="b")
    assert pair.context == ({"role": "user", "content": "q"},)


U = {"role": "user", "content": "question"}
A = {"role": "assistant", "content": "reply"}


@pytest.mark.parametrize(
    ("context", "chosen", "rejected", "problem"),
    [
        ((), "a", "b", "context: empty"),
        ("just a string", "a", "b", "context: expected a sequence"),
        ((A,), "a", "b", "context[0].role"),
        ((U, U), "a", "b", "context[1].role: roles must alternate"),
        ((U, A), "a", "b", "must end with a user message"),
        ((U, {"role": "system", "content": "x"}, U), "a", "b", "context[1].role: 'system'"),
        (({"role": "user", "content": 3},), "a", "b", "context[0].content: expected str"),
        (({"role": "user", "content": "  "},), "a", "b", "context[0].content: empty"),
        (("hello",), "a", "b", "context[0]: expected a dict"),
        ((U,), "", "b", "chosen: empty"),
        ((U,), "a", "\n", "rejected: empty"),
        ((U,), None, "b", "chosen: expected str"),
        ((U,), "same", "same", "chosen and rejected are identical"),
    ],
)
def test_invalid_pairs_name_the_problem(context, chosen, rejected, problem):
    pair = PreferencePair(context=context, chosen=chosen, rejected=rejected)
    with pytest.raises(InvalidPairError, match=re.escape(problem)):
        pair.validate()
    with pytest.raises(InvalidPairError):
        render_pair(pair, "A", "instruct")


def test_bad_format_and_position_are_rejected():
    pair = PreferencePair(context=(U,), chosen="a", rejected="b")
    with pytest.raises(ValueError, match="fmt"):
        render_pair(pair, "A", "chatml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="preferred"):
        render_pair(pair, "C", "instruct")  # type: ignore[arg-type]


def test_position_for_is_deterministic_and_roughly_balanced():
    keys = [f"example-{i}" for i in range(2000)]
    first = [position_for(k, seed=7) for k in keys]
    assert first == [position_for(k, seed=7) for k in keys]
    assert set(first) == {"A", "B"}
    assert 0.45 <= first.count("A") / len(keys) <= 0.55
    # The seed matters: another seed gives a different (but also balanced) assignment.
    other = [position_for(k, seed=8) for k in keys]
    assert other != first
    assert 0.45 <= other.count("A") / len(keys) <= 0.55


def test_position_for_known_values_are_stable():
    # Pinned so that a change in hashing (which would reshuffle every prepared dataset) is noticed.
    assert "".join(position_for(f"k{i}", seed=0) for i in range(16)) == "ABABBBBABABAABAA"


@settings(max_examples=200, deadline=None)
@given(
    keys=st.lists(st.text(max_size=12), unique=True, max_size=60),
    seed=st.integers(-(2**40), 2**40),
    data=st.data(),
)
def test_balanced_positions_exact_and_order_independent(keys, seed, data):
    positions = balanced_positions(keys, seed)
    assert len(positions) == len(keys)
    counts = Counter(positions)
    assert abs(counts["A"] - counts["B"]) <= 1
    assert positions == balanced_positions(keys, seed)

    shuffled = data.draw(st.permutations(keys))
    by_key = dict(zip(keys, positions, strict=True))
    assert balanced_positions(shuffled, seed) == [by_key[k] for k in shuffled]


def test_balanced_positions_rejects_duplicates():
    with pytest.raises(ValueError, match="duplicate key 'x'"):
        balanced_positions(["x", "y", "x"], seed=0)
