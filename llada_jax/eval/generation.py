"""Generation benchmarks: sample a completion per prompt, decode it, and verify it.

`evaluate_generation` is task-agnostic (a verifier scores each completion); it also serves to
sample candidate answers with no verifier at all. GSM8K-style scoring compares the number after
`####` in the completion with the one after `####` in the reference answer.
"""

from __future__ import annotations

import decimal
import functools
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from llada_jax.data import token_ids
from llada_jax.data.tokenizer import Tokenizer
from llada_jax.model import ModelConfig

Verifier = Callable[[Mapping[str, Any], str], bool]
# (params, model_cfg, prompt id lists, keys [B], sampler config) -> generated ids [B, gen_length]
SampleFn = Callable[..., Any]

GSM8K_MARK = "####"
# Thousands separated by commas ("1,234"), or plain digits; an optional sign, dollar sign and
# decimal part. Spaces may sit between the mark, the sign/currency and the number.
_NUMBER = r"[-+]?\s*\$?\s*(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\s*\$?\s*\.\d+"
_STRICT_RE = re.compile(re.escape(GSM8K_MARK) + r"\s*(" + _NUMBER + r")")
_ANY_NUMBER_RE = re.compile(_NUMBER)


def normalize_number(text: str) -> str | None:
  """A canonical string for a number written with commas, spaces, `$` or trailing zeros."""
  cleaned = re.sub(r"[\s,$]", "", text).rstrip(".")
  try:
    value = decimal.Decimal(cleaned)
  except decimal.InvalidOperation:
    return None
  if not value.is_finite():
    return None
  if value == value.to_integral_value():
    return str(int(value))
  return format(value.normalize(), "f")


def extract_gsm8k_answer(text: str, *, flexible: bool = False) -> str | None:
  """The normalised number right after the first `####` (None if there is none).

  With `flexible`, falls back to the last number anywhere in the text when no `####` answer is
  found (lm-eval's "flexible-extract").
  """
  m = _STRICT_RE.search(text)
  if m:
    return normalize_number(m.group(1))
  if flexible:
    numbers = _ANY_NUMBER_RE.findall(text)
    for candidate in reversed(numbers):
      value = normalize_number(candidate)
      if value is not None:
        return value
  return None


def gsm8k_reference_answer(answer_text: str) -> str | None:
  """The normalised number after the last `####` of a GSM8K reference solution."""
  if GSM8K_MARK not in answer_text:
    return None
  return normalize_number(answer_text.rsplit(GSM8K_MARK, 1)[1].strip())


def gsm8k_verify(example: Mapping[str, Any], completion_text: str) -> bool:
  """Exact match of the completion's `####` number with the example's `target` (or `answer`)."""
  target = example.get("target")
  if target is None:
    target = gsm8k_reference_answer(str(example["answer"]))
  predicted = extract_gsm8k_answer(completion_text)
  return predicted is not None and target is not None and predicted == target


def prompt_ids(tokenizer: Tokenizer, text: str, chat_template: bool) -> list[int]:
  return tokenizer.chat_prompt(text) if chat_template else tokenizer.encode(text)


def completion_ids(tokenizer: Tokenizer, ids: Sequence[int]) -> list[int]:
  """The generated ids up to (not including) the first EOS or end-of-turn token."""
  return token_ids.completion_ids(ids, (tokenizer.eos_id, tokenizer.eot_id))


def _default_sample_fn(params, model_cfg, prompts, keys, config, *, placement=None):
  from llada_jax import sampling  # noqa: PLC0415 - generation only; keeps likelihood scoring light
  return sampling.sample_from_ids(params, model_cfg, prompts, keys, config, placement=placement).tokens


def evaluate_generation(params, model_cfg: ModelConfig, tokenizer: Tokenizer,
                        examples: Sequence[Mapping[str, Any]], sampler_config, key: jax.Array, *,
                        batch_size: int = 8, chat_template: bool = False, verifier: Verifier | None = None,
                        sample_fn: SampleFn | None = None, prompt_field: str = "prompt",
                        placement=None, on_batch: Callable[[int, int], None] | None = None) -> dict[str, Any]:
  """Samples one completion per example and scores it with `verifier(example, completion_text)`.

  Returns {"accuracy" (None without a verifier), "n", "n_correct", "records"}, each record
  {"prompt", "completion", "correct"}. Example i samples with fold_in(key, i), so its completion
  does not depend on the batch size; a short last batch is filled with copies of its last prompt
  so every call has the same shape. `sample_fn(params, model_cfg, prompt_ids, keys, sampler_config)`
  -> ids [B, gen_length] defaults to `sampling.sample_from_ids`, on `placement`'s mesh when given
  (`llada_jax.placement`; a custom `sample_fn` places its own work). `on_batch(done, total)` is
  called after each batch with the number of examples scored so far.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: expected a positive integer")
  sample_fn = sample_fn or functools.partial(_default_sample_fn, placement=placement)
  records = []
  for start in range(0, len(examples), batch_size):
    batch = list(examples[start:start + batch_size])
    texts = [ex[prompt_field] for ex in batch]
    ids = [prompt_ids(tokenizer, t, chat_template) for t in texts]
    index = list(range(start, start + len(batch)))
    fill = batch_size - len(batch)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, np.array(index + index[-1:] * fill, np.uint32))
    generated = np.asarray(sample_fn(params, model_cfg, ids + ids[-1:] * fill, keys, sampler_config))
    if generated.ndim != 2 or generated.shape[0] != batch_size:
      raise ValueError(f"the sampler returned shape {generated.shape}; expected [{batch_size}, gen_length]")
    for ex, text, row in zip(batch, texts, generated):
      completion = tokenizer.decode(completion_ids(tokenizer, row))
      correct = None if verifier is None else bool(verifier(ex, completion))
      records.append({"prompt": text, "completion": completion, "correct": correct})
    if on_batch is not None:
      on_batch(len(records), len(examples))
  n = len(records)
  n_correct = sum(bool(r["correct"]) for r in records)
  accuracy = None if verifier is None or n == 0 else n_correct / n
  return {"accuracy": accuracy, "n": n, "n_correct": None if verifier is None else n_correct,
          "records": records}
