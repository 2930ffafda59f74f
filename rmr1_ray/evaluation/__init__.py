"""Benchmark evaluation: loaders (each benchmark's own format -> comparisons), judges (local engine via
Ray Data, or an OpenAI-compatible endpoint), scorers (as each benchmark defines its scores) and reports.

For evaluation during training, call `run_benchmark_subset(judge, specs, max_examples)`.
"""

from rmr1_ray.evaluation.harness import (
    Sample,
    headline_metrics,
    judge_samples,
    plan_samples,
    run_benchmark_subset,
)
from rmr1_ray.evaluation.judging import (
    EngineJudge,
    FunctionJudge,
    Judge,
    JudgeError,
    JudgeRequest,
    OpenAIJudge,
    make_judge,
)
from rmr1_ray.evaluation.loaders import Comparison, Loaded, Reject, load_benchmark
from rmr1_ray.evaluation.scoring import score_all

__all__ = [
    "Comparison",
    "EngineJudge",
    "FunctionJudge",
    "Judge",
    "JudgeError",
    "JudgeRequest",
    "Loaded",
    "OpenAIJudge",
    "Reject",
    "Sample",
    "headline_metrics",
    "judge_samples",
    "load_benchmark",
    "make_judge",
    "plan_samples",
    "run_benchmark_subset",
    "score_all",
]
