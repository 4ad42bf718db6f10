"""Benchmark files and the runners that score them.

Each loader validates its JSONL where it enters: a bad line raises a DataError naming the file,
the line and the field. Each runner returns {"metrics": {...}, "records": [...]}. The likelihood runners give every ELBO
with the standard error of its Monte Carlo estimate (`elbo_se`; `elbo_se_method` says how it was
estimated, see `eval.mc_error`).

  mc      {"prompt": str, "choices": [str, ...], "answer": int}   accuracy by highest ELBO
  scores  {"prompt": str, "response": str}                        ELBO per line
  ppl     {"text": str} (or plain text, blank-line separated)     ELBO bound on perplexity
  gsm8k   {"question": str, "answer": str with "#### N"}          exact match after ####
  demo    {"prompt", "response", "answer": int} (data.demo_task)  demo_task.verify
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np

from llada_jax.data import readers
from llada_jax.data.errors import DataError
from llada_jax.data.tokenizer import Tokenizer
from llada_jax.eval import generation as gen
from llada_jax.eval import mc_error
from llada_jax.eval.likelihood import score_answers_and_draws

TASKS = ("mc", "scores", "ppl", "gsm8k", "demo")


# ------------------------------------------------------------------------------------ loaders


def _int_field(obj, key, *, path, line) -> int:
  if key not in obj:
    raise DataError("missing; expected an integer", path=path, line=line, field=key)
  value = obj[key]
  if isinstance(value, bool) or not isinstance(value, int):
    raise DataError(f"expected an integer, got {type(value).__name__} {value!r}", path=path, line=line,
                    field=key)
  return value


def load_multiple_choice(path) -> list[dict[str, Any]]:
  examples = []
  for line, obj in readers.iter_jsonl(path):
    prompt = readers.get_string(obj, "prompt", path=path, line=line)
    choices = obj.get("choices")
    if not isinstance(choices, list) or len(choices) < 2:
      got = "missing" if choices is None else f"got {choices!r}"[:80]
      raise DataError(f"{got}; expected a list of at least two strings", path=path, line=line, field="choices")
    for i, choice in enumerate(choices):
      if not isinstance(choice, str) or not choice:
        raise DataError(f"got {choice!r}"[:80] + "; expected a non-empty string", path=path, line=line,
                        field=f"choices[{i}]")
      readers.check_utf8(choice, path=path, line=line, field=f"choices[{i}]")
    answer = _int_field(obj, "answer", path=path, line=line)
    if not 0 <= answer < len(choices):
      raise DataError(f"{answer} is not an index into the {len(choices)} choices; expected 0..{len(choices) - 1}",
                      path=path, line=line, field="answer")
    examples.append({"line": line, "prompt": prompt, "choices": choices, "answer": answer})
  return examples


def load_scores(path) -> list[dict[str, Any]]:
  return [{"line": line, "prompt": readers.get_string(obj, "prompt", path=path, line=line),
           "response": readers.get_string(obj, "response", path=path, line=line)}
          for line, obj in readers.iter_jsonl(path)]


def load_text(path) -> list[dict[str, Any]]:
  if readers.is_jsonl(path):
    return [{"line": line, "text": readers.get_string(obj, "text", path=path, line=line)}
            for line, obj in readers.iter_jsonl(path)]
  return [{"line": line, "text": text} for line, text in readers.iter_text_documents(path)]


def load_gsm8k(path) -> list[dict[str, Any]]:
  examples = []
  for line, obj in readers.iter_jsonl(path):
    question = readers.get_string(obj, "question", path=path, line=line)
    answer = readers.get_string(obj, "answer", path=path, line=line)
    target = gen.gsm8k_reference_answer(answer)
    if target is None:
      raise DataError(f"no number after '{gen.GSM8K_MARK}' in {answer[-60:]!r}; expected the final answer "
                      f"as '{gen.GSM8K_MARK} N'", path=path, line=line, field="answer")
    examples.append({"line": line, "prompt": question, "answer": answer, "target": target})
  return examples


def load_demo(path) -> list[dict[str, Any]]:
  examples = []
  for line, obj in readers.iter_jsonl(path):
    prompt = readers.get_string(obj, "prompt", path=path, line=line)
    answer = _int_field(obj, "answer", path=path, line=line)
    examples.append({**obj, "line": line, "prompt": prompt, "answer": answer})
  return examples


LOADERS = {"mc": load_multiple_choice, "scores": load_scores, "ppl": load_text, "gsm8k": load_gsm8k,
           "demo": load_demo}


def load_task(task: str, path: str | os.PathLike, limit: int | None = None) -> list[dict[str, Any]]:
  if task not in LOADERS:
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
  readers.check_exists(path, f"{task} task file")
  examples = LOADERS[task](os.fspath(path))
  if not examples:
    raise DataError("no examples; expected at least one line", path=path)
  return examples[:limit] if limit else examples


# ------------------------------------------------------------------------------------ runners


def _scored(params, model_cfg, prompts, answers, key, **score_kwargs) -> tuple[np.ndarray, np.ndarray, str]:
  """ELBO estimates [N], their standard errors [N] and how those were estimated."""
  scores, draws = score_answers_and_draws(params, model_cfg, prompts, answers, key, **score_kwargs)
  return scores, mc_error.standard_error(draws), mc_error.method(draws.shape[1])


def _answer_ids(tokenizer: Tokenizer, text: str, append_eos: bool) -> list[int]:
  return tokenizer.encode(text) + ([tokenizer.eos_id] if append_eos else [])


def run_multiple_choice(params, model_cfg, tokenizer: Tokenizer, examples: Sequence[dict], key, *,
                        chat_template: bool = False, append_eos: bool = False, **score_kwargs) -> dict:
  """Accuracy by the highest ELBO, and by the highest ELBO per answer token.

  The choices of one question share their random draws (the same example id), so noise common
  to them cancels when they are compared.
  """
  prompts, answers, ids, owner = [], [], [], []
  for q, ex in enumerate(examples):
    p = gen.prompt_ids(tokenizer, ex["prompt"], chat_template)
    for choice in ex["choices"]:
      prompts.append(p)
      answers.append(_answer_ids(tokenizer, choice, append_eos))
      ids.append(q)
      owner.append(q)
  scores, se, se_method = _scored(params, model_cfg, prompts, answers, key, example_ids=ids, **score_kwargs)
  lengths = np.array([len(a) for a in answers])
  records, hits, hits_norm, start = [], 0, 0, 0
  for ex in examples:
    k = len(ex["choices"])
    s, n_tok, s_se = scores[start:start + k], lengths[start:start + k], se[start:start + k]
    start += k
    pred, pred_norm = int(np.argmax(s)), int(np.argmax(s / n_tok))
    hits += pred == ex["answer"]
    hits_norm += pred_norm == ex["answer"]
    records.append({"line": ex.get("line"), "prompt": ex["prompt"], "answer": ex["answer"],
                    "elbo": s.tolist(), "n_tokens": n_tok.tolist(), "prediction": pred,
                    "prediction_per_token": pred_norm, "correct": pred == ex["answer"],
                    "correct_per_token": pred_norm == ex["answer"],
                    "elbo_se": [mc_error.as_field(v) for v in s_se]})
  n = len(examples)
  return {"metrics": {"accuracy": hits / n, "accuracy_per_token": hits_norm / n, "n": n,
                      "elbo_se_method": se_method}, "records": records}


def run_scores(params, model_cfg, tokenizer: Tokenizer, examples: Sequence[dict], key, *,
               chat_template: bool = False, append_eos: bool = False, **score_kwargs) -> dict:
  prompts = [gen.prompt_ids(tokenizer, ex["prompt"], chat_template) for ex in examples]
  answers = [_answer_ids(tokenizer, ex["response"], append_eos) for ex in examples]
  scores, se, se_method = _scored(params, model_cfg, prompts, answers, key, **score_kwargs)
  records = [{"line": ex.get("line"), "prompt": ex["prompt"], "response": ex["response"], "elbo": float(s),
              "n_tokens": len(a), "elbo_per_token": float(s) / len(a), "elbo_se": mc_error.as_field(e)}
             for ex, s, a, e in zip(examples, scores, answers, se)]
  total_tokens = sum(len(a) for a in answers)
  # The examples' draws are independent (one example id each): their errors add in quadrature.
  metrics = {"n": len(examples), "mean_elbo": float(np.mean(scores)),
             "elbo_per_token": float(np.sum(scores)) / total_tokens,
             "mean_elbo_se": mc_error.as_field(mc_error.combined(se) / len(examples)),
             "elbo_per_token_se": mc_error.as_field(mc_error.combined(se) / total_tokens),
             "elbo_se_method": se_method}
  return {"metrics": metrics, "records": records}


def run_perplexity(params, model_cfg, tokenizer: Tokenizer, examples: Sequence[dict], key, *,
                   append_eos: bool = False, **score_kwargs) -> dict:
  """exp(-ELBO / tokens): an upper bound on perplexity in expectation (the ELBO bounds log p)."""
  score_kwargs.pop("cfg_scale", None)  # no prompt to guide with
  answers = [_answer_ids(tokenizer, ex["text"], append_eos) for ex in examples]
  scores, se, se_method = _scored(params, model_cfg, [[] for _ in answers], answers, key, **score_kwargs)
  total_tokens = sum(len(a) for a in answers)
  records = [{"line": ex.get("line"), "elbo": float(s), "n_tokens": len(a), "elbo_se": mc_error.as_field(e)}
             for ex, s, a, e in zip(examples, scores, answers, se)]
  nll = -float(np.sum(scores)) / total_tokens
  return {"metrics": {"n": len(examples), "nll_per_token_bound": nll, "perplexity_bound": math.exp(nll),
                      "tokens": total_tokens,
                      "nll_per_token_bound_se": mc_error.as_field(mc_error.combined(se) / total_tokens),
                      "elbo_se_method": se_method}, "records": records}


def run_generation(params, model_cfg, tokenizer: Tokenizer, examples: Sequence[dict], sampler_config, key, *,
                   task: str, batch_size: int = 8, chat_template: bool = False, sample_fn=None,
                   placement=None) -> dict:
  """GSM8K or the demo task: accuracy of sampled completions."""
  if task == "gsm8k":
    verifier = gen.gsm8k_verify
  elif task == "demo":
    from llada_jax.data import demo_task  # noqa: PLC0415
    verifier = demo_task.verify
  else:
    raise ValueError(f"task {task!r} is not a generation task; expected 'gsm8k' or 'demo'")
  result = gen.evaluate_generation(params, model_cfg, tokenizer, examples, sampler_config, key,
                                   batch_size=batch_size, chat_template=chat_template, verifier=verifier,
                                   sample_fn=sample_fn, placement=placement)
  records = []
  for ex, record in zip(examples, result["records"]):
    extracted = (gen.extract_gsm8k_answer(record["completion"]) if task == "gsm8k"
                 else _demo_extract(record["completion"]))
    target = ex.get("target") if task == "gsm8k" else ex.get("answer")
    records.append({"line": ex.get("line"), **record, "target": target, "extracted": extracted})
  metrics = {"accuracy": result["accuracy"], "n": result["n"], "n_correct": result["n_correct"]}
  if task == "gsm8k":
    flexible = sum(gen.extract_gsm8k_answer(r["completion"], flexible=True) == ex["target"]
                   for ex, r in zip(examples, records))
    metrics["accuracy_flexible"] = flexible / max(1, len(records))
  return {"metrics": metrics, "records": records}


def _demo_extract(text):
  from llada_jax.data import demo_task  # noqa: PLC0415
  return demo_task.extract_answer(text)
