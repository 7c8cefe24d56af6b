"""In-context learning: zero/one/few-shot prompts and log-likelihood scoring, no gradient."""

from fastpt.icl.evaluate import (ICLResult, evaluate_generation, evaluate_multiple_choice, few_shot_table,
                                 generate_answer)
from fastpt.icl.prompts import PromptFormat, build_prompt, requests_for, sample_examples
from fastpt.icl.scoring import Score, loglikelihood, split_request

__all__ = ["ICLResult", "PromptFormat", "Score", "build_prompt", "evaluate_generation",
           "evaluate_multiple_choice", "few_shot_table", "generate_answer", "loglikelihood", "requests_for",
           "sample_examples", "split_request"]
