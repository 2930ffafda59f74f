"""Published RM-R1 scores, for the report's side-by-side table.

Source: the RM-R1 repository (RM-R1-UIUC/RM-R1, Apache-2.0), `eval/result/<model>/.../*.json` for the
two 32B judges, and Table 1 of the paper ("RM-R1: Reward Modeling as Reasoning", arXiv 2505.02387)
for the 7B/14B headline numbers; copied from shared/reference/benchmark_scoring.json.

Keys are this harness's metric names (see scoring.py); RM-R1's own names differ in places:
RewardBench `avg_Result_each_section` is our `score` and `absoluate_Result` our `absolute`;
RMB `Accuracy Averaged from Four Sections` is our `mean`. Values are fractions in [0, 1].
"""

from __future__ import annotations

PUBLISHED: dict[str, dict[str, dict[str, float]]] = {
    "RM-R1-Qwen2.5-Instruct-32B": {
        "rewardbench": {
            "Chat": 0.952513966480447,
            "Chat Hard": 0.831140350877193,
            "Safety": 0.918918918918919,
            "Reasoning": 0.9521130026736508,
            "score": 0.9136715597375524,
            "absolute": 0.9293132328308208,
        },
        "rm_bench": {
            "chat": 0.764857881136951,
            "math": 0.8055030455786599,
            "code": 0.6608187134502925,
            "safety": 0.9382716049382717,
            "hard_acc": 0.7049334242582853,
            "normal_acc": 0.8050964241257946,
            "easy_acc": 0.8670585854440513,
            "total_avg_acc": 0.7923628112760438,
        },
        "rmb": {
            "Pairwise Helpfulness": 0.8017284195887553,
            "Pairwise Harmlessness": 0.8057757644394111,
            "BoN Helpfulness": 0.6505452821242295,
            "BoN Harmlessness": 0.6624925462134764,
            "mean": 0.7301355030914681,
        },
    },
    "RM-R1-DeepSeek-Distilled-Qwen-32B": {
        "rewardbench": {
            "Chat": 0.952513966480447,
            "Chat Hard": 0.8026315789473685,
            "Safety": 0.9108108108108108,
            "Reasoning": 0.9680832924101054,
            "score": 0.908509912162183,
            "absolute": 0.9246231155778895,
        },
        "rm_bench": {
            "chat": 0.7416020671834626,
            "math": 0.9180844360428481,
            "code": 0.7412280701754387,
            "safety": 0.9543965734441925,
            "hard_acc": 0.7670244297806686,
            "normal_acc": 0.8545194004547523,
            "easy_acc": 0.8949395298990355,
            "total_avg_acc": 0.8388277867114855,
        },
        "rmb": {
            "Pairwise Helpfulness": 0.7854375682924406,
            "Pairwise Harmlessness": 0.7679784824462061,
            "BoN Helpfulness": 0.6197249881460408,
            "BoN Harmlessness": 0.6177698270721527,
            "mean": 0.6977277164892101,
        },
    },
}

# Paper Table 1 headline numbers (percent, as printed): RewardBench `score`, RM-Bench `total_avg_acc`, RMB `mean`.
PAPER_HEADLINES: dict[str, dict[str, float]] = {
    "RM-R1-DeepSeek-Distilled-Qwen-7B": {"rewardbench": 80.1, "rm_bench": 72.4, "rmb": 55.1},
    "RM-R1-Qwen2.5-Instruct-7B": {"rewardbench": 85.2, "rm_bench": 70.2, "rmb": 66.4},
    "RM-R1-Qwen2.5-Instruct-14B": {"rewardbench": 88.2, "rm_bench": 76.1, "rmb": 69.2},
    "RM-R1-DeepSeek-Distilled-Qwen-14B": {"rewardbench": 88.9, "rm_bench": 81.5, "rmb": 68.5},
}

# Which metric of each benchmark summary is its headline (the number papers quote).
HEADLINE_METRIC = {"rewardbench": "score", "rm_bench": "total_avg_acc", "rmb": "mean"}
