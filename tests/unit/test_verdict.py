"""RM-R1 reward and evaluation parsing (exact), and the strict chain-of-rubrics parser."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmr1_ray.verdict import (
    EOS_TOKENS,
    RewardSpec,
    eval_verdict,
    parse_judgement,
    rm_r1_reward,
    strip_eos,
    verdict_reward,
)

pytestmark = pytest.mark.unit

TAG = {"A": "<answer>[[A]]</answer>", "B": "<answer>[[B]]</answer>"}
WINNER = {"A": "model_a", "B": "model_b"}
OTHER = {"A": "B", "B": "A"}

REASONING = """<type>Reasoning</type>

<solution>
17 * 3 = 51, so the answer is 51.
</solution>

<eval>
Chatbot A computes <quote_A>17 * 3 = 51</quote_A>, which matches my solution.
<summary_B>Chatbot B multiplies 17 by 3 and reports 54.</summary_B>
Chatbot B is wrong: <quote_B>The answer is 54.</quote_B>
</eval>

<answer>[[A]]</answer>"""

CHAT = """<type>Chat</type>

<rubric>
1. Warmth (40%): the reply acknowledges the user's feelings.
2. Practical help (60%): concrete next steps.
<justify>The user is upset and asks what to do, so practical help weighs most.</justify>
</rubric>

<eval>
<summary_A>Chatbot A only says "that's tough".</summary_A>
<quote_B>Here are three things you can try tonight: ...</quote_B>
Chatbot B is warmer and gives actionable steps.
</eval>

<answer>[[B]]</answer>"""

no_brackets = st.text(max_size=300).filter(lambda s: "[[" not in s)
# Whitespace / EOS after the verdict, short enough to keep it inside RM-R1's 80-character window.
eos_tail = (
    st.lists(st.sampled_from([" ", "\n", "\t", *EOS_TOKENS]), max_size=5)
    .map("".join)
    .filter(lambda s: len(s) <= 80 - len(TAG["A"]))
)
side = st.sampled_from(["A", "B"])


# ---------------------------------------------------------------- rm_r1_reward / eval_verdict


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=400), winner=st.sampled_from(["model_a", "model_b"]))
def test_reward_is_always_plus_or_minus_one(text, winner):
    assert rm_r1_reward(text, winner) in (1.0, -1.0)


@settings(max_examples=300, deadline=None)
@given(prefix=no_brackets, x=side, tail=eos_tail)
def test_appended_verdict_rewards_the_right_winner_only(prefix, x, tail):
    text = prefix + TAG[x] + tail
    assert rm_r1_reward(text, WINNER[x]) == 1.0
    assert rm_r1_reward(text, WINNER[OTHER[x]]) == -1.0
    assert eval_verdict(text) == x
    assert verdict_reward(text, WINNER[x]) == 1.0


@settings(max_examples=200, deadline=None)
@given(a=st.text(max_size=100), b=st.text(max_size=100), c=st.text(max_size=100))
def test_eval_verdict_with_both_is_error(a, b, c):
    assert eval_verdict(a + "[[A]]" + b + "[[B]]" + c) == "error"
    assert eval_verdict(a + "[[B]]" + b + "[[A]]" + c) == "error"


@settings(max_examples=200, deadline=None)
@given(prefix=no_brackets, x=side, filler=st.text(min_size=80, max_size=200).filter(lambda s: "[[" not in s))
def test_verdict_outside_last_80_chars_gets_no_reward_but_is_evaluated(prefix, x, filler):
    text = prefix + TAG[x] + filler
    assert rm_r1_reward(text, WINNER[x]) == -1.0
    assert rm_r1_reward(text, WINNER[OTHER[x]]) == -1.0
    assert eval_verdict(text) == x


@pytest.mark.parametrize(
    ("text", "reward_a", "reward_b", "evaluated"),
    [
        ("", -1.0, -1.0, "error"),
        ("I think A is better.", -1.0, -1.0, "error"),  # no tags at all
        ("<answer>A</answer>", -1.0, -1.0, "error"),
        ("[[A]]", -1.0, -1.0, "A"),  # eval reads a bare verdict; the reward wants the tag
        ("<answer>[[A]]</answer>", 1.0, -1.0, "A"),
        ("<answer>[[B]]</answer>", -1.0, 1.0, "B"),
        ("<answer>[[A]]</answer><answer>[[B]]</answer>", -1.0, -1.0, "error"),  # both verdicts
        ("<answer>[[A]]</answer>\n\n<|im_end|>", 1.0, -1.0, "A"),  # trailing whitespace + EOS
        ("<answer>[[B]]</answer><｜end▁of▁sentence｜>   \n", -1.0, 1.0, "B"),
        ("x" * 500 + "<answer>[[A]]</answer>" + "y" * 58, 1.0, -1.0, "A"),  # last char of window
        ("x" * 500 + "<answer>[[A]]</answer>" + "y" * 59, -1.0, -1.0, "A"),  # one char outside
        ("<answer>[[A]]</answer>" + "z" * 100, -1.0, -1.0, "A"),
        ("analysis ... <answer>[[B", -1.0, -1.0, "error"),  # cut mid-tag
        ("A long chain mentioning [[A]] then <answer>[[B]]</answer>", -1.0, 1.0, "error"),
    ],
)
def test_reward_and_eval_cases(text, reward_a, reward_b, evaluated):
    assert rm_r1_reward(text, "model_a") == reward_a
    assert rm_r1_reward(text, "model_b") == reward_b
    assert eval_verdict(text) == evaluated


def test_reward_rejects_bad_winner():
    with pytest.raises(ValueError, match="winner"):
        rm_r1_reward("<answer>[[A]]</answer>", "A")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="winner"):
        verdict_reward("<answer>[[A]]</answer>", "tie")  # type: ignore[arg-type]


def test_strip_eos():
    assert strip_eos("done</answer> <|im_end|>\n<|endoftext|>\n ") == "done</answer>"
    assert strip_eos("keep </s> inside") == "keep </s> inside"
    assert strip_eos("") == ""


# ---------------------------------------------------------------- parse_judgement


def test_parse_valid_reasoning_chain():
    j = parse_judgement(REASONING)
    assert j.format_valid, j.missing
    assert j.missing == ()
    assert j.task_type == "Reasoning"
    assert j.solution == "17 * 3 = 51, so the answer is 51."
    assert j.rubric is None and j.justify is None
    assert j.quotes_a == ("17 * 3 = 51",)
    assert j.summaries_a == ()
    assert j.quotes_b == ("The answer is 54.",)
    assert j.summaries_b == ("Chatbot B multiplies 17 by 3 and reports 54.",)
    assert j.eval_text.startswith("Chatbot A computes")
    assert j.answer == "A"


def test_parse_valid_chat_chain():
    j = parse_judgement(CHAT)
    assert j.format_valid, j.missing
    assert j.task_type == "Chat"
    assert j.rubric.startswith("1. Warmth (40%)") and "<justify>" in j.rubric
    assert j.justify == "The user is upset and asks what to do, so practical help weighs most."
    assert j.solution is None
    assert j.summaries_a == ('Chatbot A only says "that\'s tough".',)
    assert j.quotes_b == ("Here are three things you can try tonight: ...",)
    assert j.answer == "B"


@pytest.mark.parametrize(
    "variant",
    [
        REASONING + "<|im_end|>",
        REASONING + "\n\n<|endoftext|>\n",
        REASONING + "</s>",
        REASONING + "<｜end▁of▁sentence｜>",
        "\n  " + REASONING.replace("\n\n", "\n"),  # tighter / looser whitespace between sections
        REASONING.replace("\n\n", "  \n\n\n"),
        "<think>\nLet me compare the two answers carefully.\n</think>\n\n" + REASONING,
        "Okay, the user wants a judgement. 17*3=51.\n</think>\n\n" + REASONING,  # template opened <think>
    ],
)
def test_parse_tolerates_whitespace_eos_and_think(variant):
    j = parse_judgement(variant)
    assert j.format_valid, j.missing
    assert j.answer == "A"
    assert j.task_type == "Reasoning"


@pytest.mark.parametrize(
    ("text", "missing"),
    [
        ("", ("<type>", "<eval>", "<answer>")),
        (
            REASONING.replace("<solution>\n17 * 3 = 51, so the answer is 51.\n</solution>", ""),
            ("<solution>",),
        ),
        (REASONING[: REASONING.index("</eval>")], ("unclosed <eval>", "<answer>")),
        (REASONING.removesuffix("]]</answer>"), ("unclosed <answer>",)),
        (
            REASONING[: REASONING.index("</eval>") + 3],
            ("unclosed <eval>", "<answer>", "text cut mid-tag: '</e'"),
        ),
        (REASONING.replace("<answer>[[A]]</answer>", ""), ("<answer>",)),
        (REASONING + "\n<answer>[[B]]</answer>", ("both verdicts present",)),
        (REASONING + "\n<answer>[[A]]</answer>", ("multiple <answer> tags",)),
        (REASONING.replace("[[A]]</answer>", "A</answer>"), ("<answer> must be [[A]] or [[B]], got 'A'",)),
        (REASONING + "\nHope this helps!", ("text after </answer>",)),
        ("Sure, here is my judgement.\n" + REASONING, ("unexpected text before <type>",)),
        (
            REASONING.replace("Reasoning</type>", "Math</type>"),
            ("<type> must be Reasoning or Chat, got 'Math'",),
        ),
        (
            REASONING.replace("<solution>\n17 * 3 = 51, so the answer is 51.\n", "<solution>"),
            ("empty <solution>",),
        ),
        (
            REASONING.replace("<quote_A>17 * 3 = 51</quote_A>", "17 * 3 = 51"),
            ("<quote_A> or <summary_A> in <eval>",),
        ),
        (REASONING.replace("</quote_A>", ""), ("unclosed <quote_A>", "<quote_A> or <summary_A> in <eval>")),
        (CHAT.replace("<type>Chat</type>", "<type>Reasoning</type>"), ("<solution>",)),
        (CHAT.replace("</justify>", ""), ("unclosed <justify>",)),
        (CHAT.replace("</rubric>", ""), ("unclosed <rubric>",)),
        (
            CHAT.replace("<quote_B>Here are three things you can try tonight: ...</quote_B>", ""),
            ("<quote_B> or <summary_B> in <eval>",),
        ),
        # sections present but out of order
        (
            "<type>Chat</type>\n<eval><summary_A>a</summary_A><summary_B>b</summary_B></eval>\n"
            "<rubric>r<justify>j</justify></rubric>\n<answer>[[A]]</answer>",
            ("<eval> out of order",),
        ),
        ("<think>\nI keep thinking and never stop", ("unclosed <think>",)),
    ],
)
def test_parse_broken_chains_report_what_is_missing(text, missing):
    j = parse_judgement(text)
    assert not j.format_valid
    assert j.missing == missing


def test_parse_broken_chain_still_exposes_what_it_found():
    j = parse_judgement(REASONING[: REASONING.index("<answer>")])
    assert j.missing == ("<answer>",)
    assert j.answer is None
    assert j.task_type == "Reasoning"
    assert j.solution == "17 * 3 = 51, so the answer is 51."
    assert j.quotes_a == ("17 * 3 = 51",)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300))
def test_parse_never_raises_and_missing_iff_invalid(text):
    j = parse_judgement(text)
    assert j.format_valid == (j.missing == ())
    assert j.answer in (None, "A", "B")


# ---------------------------------------------------------------- verdict_reward


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300), x=side, tail=eos_tail)
def test_default_spec_equals_rm_r1_reward(text, x, tail):
    for candidate in (text, text + TAG[x] + tail):
        for winner in ("model_a", "model_b"):
            assert verdict_reward(candidate, winner) == rm_r1_reward(candidate, winner)


SPEC = RewardSpec(correct=2.0, wrong=-3.0, format_bonus=0.5, format_penalty=0.25)
MALFORMED_A = "A is right because 51.\n<answer>[[A]]</answer>"


@pytest.mark.parametrize(
    ("text", "winner", "expected"),
    [
        (REASONING, "model_a", 2.5),  # correct and well-formed: correct + bonus
        (REASONING, "model_b", -3.0),  # wrong but well-formed: no bonus, no penalty
        (MALFORMED_A, "model_a", 1.75),  # correct, malformed: correct - penalty
        (MALFORMED_A, "model_b", -3.25),  # wrong, malformed: wrong - penalty
        (CHAT + "<|im_end|>", "model_b", 2.5),
        ("", "model_a", -3.25),
    ],
)
def test_verdict_reward_with_format_shaping(text, winner, expected):
    assert verdict_reward(text, winner, SPEC) == pytest.approx(expected)


def test_verdict_reward_bonus_only_and_penalty_only():
    assert verdict_reward(REASONING, "model_a", RewardSpec(format_bonus=0.2)) == pytest.approx(1.2)
    assert verdict_reward(MALFORMED_A, "model_a", RewardSpec(format_bonus=0.2)) == 1.0
    assert verdict_reward(MALFORMED_A, "model_a", RewardSpec(format_penalty=0.5)) == pytest.approx(0.5)
    assert verdict_reward(REASONING, "model_b", RewardSpec(format_penalty=0.5)) == -1.0
