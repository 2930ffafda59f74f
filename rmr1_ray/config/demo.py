"""Config of `rmr1 demo`: the whole pipeline on the tiny model. Defaults fit a 2-core laptop."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rmr1_ray.config.sections import Strict


class DemoConfig(Strict):
    output_dir: str = "runs/demo"
    seed: int = 0
    num_questions: int = Field(2000, ge=20, description="synthetic questions, split into train and test by question")
    test_fraction: float = Field(0.1, gt=0, lt=1)
    # The tiny tokenizer writes an instruct judge prompt (with RM-R1's system prompt) in ~720 tokens
    # and a distilled one in ~150: the distilled format keeps a CPU demo within minutes.
    prompt_format: Literal["instruct", "distilled"] = "distilled"
    # SFT makes the random model a judge: it must learn the chain format and the checks from scratch,
    # which takes a few thousand chains at a learning rate far above RM-R1's 5e-6 for 7B.
    sft_epochs: int = Field(4, ge=1)
    sft_lr: float = Field(2e-3, gt=0)
    # GRPO trains on a pool of train questions, several epochs over it: the tiny judge's errors after SFT
    # are mostly checks it cannot do yet (three-digit arithmetic), and a fresh prompt per step gives a
    # gradient too noisy to move the mean reward within minutes. Measured: see the learning test.
    grpo_prompts: int = Field(64, ge=16, description="train questions in the GRPO prompt pool")
    grpo_steps: int = Field(24, ge=1)
    grpo_prompts_per_step: int = Field(16, ge=4, multiple_of=4, description="x 4 samples each")
    # The tiny-cpu train config's entropy bonus exists to move a *random* model, and would undo the SFT here.
    grpo_lr: float = Field(1e-4, gt=0)
    grpo_entropy_coeff: float = Field(0.0, ge=0)
    grpo_max_new_tokens: int = Field(160, ge=8)  # SFT chains run ~90-130 tokens; a cut chain earns -1
    eval_max_new_tokens: int = Field(160, ge=8)
    eval_every: int = Field(6, ge=1, description="GRPO steps between held-out evaluations during training")
    eval_examples_per_kind: int = Field(25, ge=1, description="held-out questions per task kind in those evaluations")
    serve: bool = Field(True, description="start the Serve judge at the end and send it one request")
