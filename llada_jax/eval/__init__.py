"""Evaluation: ELBO likelihood scoring and generation benchmarks (CLI: `python -m llada_jax.evaluate`)."""

from llada_jax.eval.generation import (evaluate_generation, extract_gsm8k_answer, gsm8k_reference_answer,
                                       gsm8k_verify, normalize_number)
from llada_jax.eval.likelihood import bucket_length, guided_logits_fn, score_answers, score_answers_and_draws
from llada_jax.eval.tasks import (TASKS, load_task, run_generation, run_multiple_choice, run_perplexity,
                                  run_scores)

__all__ = [
    "TASKS", "bucket_length", "evaluate_generation", "extract_gsm8k_answer", "gsm8k_reference_answer",
    "gsm8k_verify", "guided_logits_fn", "load_task", "normalize_number", "run_generation",
    "run_multiple_choice", "run_perplexity", "run_scores", "score_answers", "score_answers_and_draws",
]
