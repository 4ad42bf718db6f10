"""Token-id records: JSONL lines whose `prompt_ids` hold a prompt already tokenized.

Checked in two passes so that a bad file fails before a model is loaded: the shape of every record
as it is read (`read_prompt_ids`), then the ids against the model's vocabulary once its config is
known (`check_in_vocab`, which needs only the run config, not the weights).
"""

from __future__ import annotations

import os
from typing import Sequence

from llada_jax.data import readers
from llada_jax.data.errors import DataError

FIELD = "prompt_ids"


def get_id_list(obj: dict, key: str, *, path, line) -> list[int]:
  """obj[key], checked to be a non-empty list of non-negative integers."""
  expected = "expected a non-empty list of token ids (non-negative integers)"
  if key not in obj:
    raise DataError(f"missing; {expected}", path=path, line=line, field=key)
  value = obj[key]
  if not isinstance(value, list):
    raise DataError(f"got {type(value).__name__}; {expected}", path=path, line=line, field=key)
  if not value:
    raise DataError(f"empty; {expected}", path=path, line=line, field=key)
  for i, item in enumerate(value):
    # JSON true/false load as bool, a subclass of int: refused, as floats are (1.0 is no token id).
    if isinstance(item, bool) or not isinstance(item, int) or item < 0:
      raise DataError(f"item {i} is {item!r}; {expected}", path=path, line=line, field=key)
  return value


def read_prompt_ids(path: str | os.PathLike) -> list[tuple[int, list[int]]]:
  """(line number, ids) for every line of a JSONL file, each line's `prompt_ids` checked."""
  return [(line, get_id_list(obj, FIELD, path=path, line=line)) for line, obj in readers.iter_jsonl(path)]


def check_in_vocab(records: Sequence[tuple[int, list[int]]], vocab_size: int, mask_id: int, *, path) -> None:
  """Raises DataError at the first id outside [0, vocab_size) or equal to the mask id, which the
  sampler would take for a position to fill rather than a prompt token."""
  for line, ids in records:
    for i, token in enumerate(ids):
      if token >= vocab_size or token == mask_id:
        raise DataError(f"item {i} is {token}; expected token ids below the model's vocab_size={vocab_size}, "
                        f"and not its mask id {mask_id}", path=path, line=line, field=FIELD)


def completion_ids(ids: Sequence[int], stops: Sequence[int]) -> list[int]:
  """The generated ids up to (not including) the first of `stops` (EOS, end of turn)."""
  out = []
  for token in ids:
    if int(token) in stops:
      break
    out.append(int(token))
  return out
