"""Packing: several examples per row of seq_len tokens, told apart by segment ids.

One example per row wastes most of a row on padding when lengths vary (SFT answers, preference
pairs, short documents). Packing fills each row with whole examples, first fit over a window of
`num_bins` rows (Grain's FirstFitPackIterDataset), and marks them with segment ids 1, 2, ..., k
from position 0 on; what is left after the last example is padding (EOS, segment id 0).

The chosen and rejected answers of a preference pair are packed as two features of one element,
so they land in the same row of the chosen and rejected arrays with the same segment id: slot s
of the per-slot arrays (`prompt_lengths`, `example_id`) is segment id s + 1 in both.

Pretraining packs documents, which needs their boundaries: `DocumentSource` keeps each
EOS-terminated document as an example, and cuts one longer than seq_len into consecutive pieces
of at most seq_len tokens (each its own example, counted as `documents_split`).
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from llada_jax.data import sources
from llada_jax.data.tokenizer import Tokenizer

# Features laid out along the row (packed), and per-example values kept one per slot.
SEQUENCE_FEATURES = {"pretrain": ("tokens",), "sft": ("tokens",), "preference": ("chosen", "rejected")}
SLOT_FEATURES = {"pretrain": ("example_id",), "sft": ("prompt_lengths", "example_id"),
                 "preference": ("prompt_lengths", "example_id")}
# What an empty slot holds: no prompt, and an id no example has.
SLOT_FILL = {"prompt_lengths": 0, "example_id": -1}


def default_bins(per_process_batch_size: int) -> int:
  """Rows packed at a time when `packing_bins=0`.

  More bins leave less padding (an example has more rows to fit into) but hold more rows in
  memory and, with finite epochs, mix more examples of one epoch with the next near the boundary.
  A few batches' worth is most of the gain.
  """
  return max(4 * per_process_batch_size, 16)


class DocumentSource:
  """Pretraining documents (each closed by EOS) as separate examples, for packing.

  A document longer than seq_len becomes consecutive pieces of at most seq_len tokens, each an
  example; nothing is dropped. `example_id` is the piece's index in file order (documents in
  order, pieces of one document in order), so it never depends on shuffling or processes.
  """

  def __init__(self, files: Sequence[str], tokenizer: Tokenizer, seq_len: int):
    pieces = []
    self.num_documents = self.documents_split = 0
    for path in files:
      for ids in sources._encode_documents(os.fspath(path), tokenizer):  # pylint: disable=protected-access
        self.num_documents += 1
        self.documents_split += len(ids) > seq_len
        pieces.extend(ids[start:start + seq_len] for start in range(0, len(ids), seq_len))
    self.pieces = sources.Ragged(pieces)
    self.seq_len = seq_len
    self.files = list(files)

  def __len__(self):
    return len(self.pieces)

  @property
  def stats(self) -> dict[str, int]:
    return sources.source_stats(len(self), documents_split=self.documents_split)

  def example(self, i: int) -> dict[str, np.ndarray]:
    i = int(i)
    return {"tokens": self.pieces[i], "example_id": np.int32(i)}

  __getitem__ = example


class UnpaddedExamples:
  """The examples of a source without padding (its `example(i)`): what packing reads."""

  def __init__(self, source: Any):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return self.source.example(i)


def _slots(values: Sequence[Any], max_segments: int, fill: int) -> np.ndarray:
  out = np.full(max_segments, fill, np.int32)
  out[:len(values)] = np.asarray(values, np.int32)
  return out


def _to_row(packed: Mapping[str, Any], *, kind: str, max_segments: int) -> dict[str, np.ndarray]:
  """Grain's packed element -> the fixed row format (segment ids renamed, slots padded to K)."""
  features = SEQUENCE_FEATURES[kind]
  row = {f: packed[f] for f in features}
  if kind == "preference":
    row.update({f"{f}_segment_ids": packed[f"{f}_segment_ids"] for f in features})
  else:
    row["segment_ids"] = packed["tokens_segment_ids"]
  for f in SLOT_FEATURES[kind]:
    row[f] = _slots(packed[f], max_segments, SLOT_FILL[f])
  return row


def pack(ds: grain.IterDataset, kind: str, *, seq_len: int, pad_id: int, max_segments: int, num_bins: int,
         seed: int, shuffle_bins: bool) -> grain.IterDataset:
  """Rows of packed examples from a stream of unpadded examples of `kind`.

  First fit fills bin 0 first, so within each window the later bins hold the examples that did
  not fit earlier ones (longer ones) and more padding; emitting the bins in order would give
  batches whose makeup follows the step number. `shuffle_bins` emits each window's bins in a
  seeded order instead; the order depends only on the seed and the row count, so it is
  deterministic and restored exactly by the iterator state.
  """
  features = SEQUENCE_FEATURES[kind]
  packed = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={f: seq_len for f in features}, num_packing_bins=num_bins, seed=seed,
      shuffle_bins=shuffle_bins, meta_features=SLOT_FEATURES[kind], padding_struct={f: pad_id for f in features},
      max_sequences_per_bin=max_segments)
  return packed.map(functools.partial(_to_row, kind=kind, max_segments=max_segments))


class _ThreadPrefetchIterator(grain.experimental.ThreadPrefetchDatasetIterator):
  """Grain's thread prefetch, left unclosed when the interpreter exits with it alive.

  By then Grain's module globals are gone, and closing prints an AttributeError traceback; the
  daemon thread ends with the process anyway.
  """

  def __del__(self, _finalizing=sys.is_finalizing):  # bound now: module globals may be gone at exit
    if not _finalizing():
      super().__del__()


class ThreadPrefetch(grain.experimental.ThreadPrefetchIterDataset):
  """Prepares the next batches in a thread. Its state is the one after the batch last handed out,
  so resuming stays exact."""

  def __iter__(self) -> grain.DatasetIterator:
    return _ThreadPrefetchIterator(self._parent.__iter__(), self._prefetch_buffer_size)


# ------------------------------------------------------------------------------ batch stats.

def _unpacked_sft_valid(tokens: np.ndarray, prompt_lengths: np.ndarray, eos_id: int) -> np.ndarray:
  """Valid tokens per unpacked SFT row: up to the first EOS at or after the prompt (the answer's).

  A row with no such EOS (an answer truncated to the row) has no padding.
  """
  length = tokens.shape[1]
  is_end = (tokens == eos_id) & (np.arange(length)[None, :] >= np.asarray(prompt_lengths)[:, None])
  return np.where(is_end.any(axis=1), np.argmax(is_end, axis=1) + 1, length)


def batch_stats(batch: Mapping[str, np.ndarray], kind: str, packed: bool, *, eos_id: int | None = None
                ) -> dict[str, float]:
  """How much of a batch is padding, and how many examples a row holds on average.

  padding_fraction: padding positions / all token positions (for preference, of the chosen and
  rejected rows together). Packed rows: positions with segment id 0. Unpacked rows: positions
  after prompt + answer + EOS (`*_lengths` for preference; for SFT, after the first EOS at or
  after the prompt, which needs `eos_id`); unpacked pretraining rows are full.
  examples_per_row: examples (preference: pairs) per row; 1 for unpacked rows, whose rows are the
  examples.
  """
  from llada_jax.data.pipelines import canonical_kind  # pylint: disable=import-outside-toplevel

  kind = canonical_kind(kind)
  if packed:
    names = ("chosen_segment_ids", "rejected_segment_ids") if kind == "preference" else ("segment_ids",)
    segment_ids = np.stack([np.asarray(batch[n]) for n in names])
    padding = float(np.mean(segment_ids == 0))
    per_row = float(np.mean(np.sum(np.asarray(batch["example_id"]) >= 0, axis=1)))
    return {"padding_fraction": padding, "examples_per_row": per_row}
  if kind == "pretrain":
    return {"padding_fraction": 0.0, "examples_per_row": 1.0}
  if kind == "preference":
    length = np.asarray(batch["chosen"]).shape[1]
    valid = np.asarray(batch["chosen_lengths"]).sum() + np.asarray(batch["rejected_lengths"]).sum()
    total = 2 * length * len(batch["chosen_lengths"])
    return {"padding_fraction": float(1 - valid / total), "examples_per_row": 1.0}
  if eos_id is None:
    raise ValueError("batch_stats of unpacked SFT batches needs eos_id (the padding token) to find where each "
                     "answer ends")
  tokens = np.asarray(batch["tokens"])
  valid = _unpacked_sft_valid(tokens, batch["prompt_lengths"], eos_id)
  return {"padding_fraction": float(1 - valid.sum() / tokens.size), "examples_per_row": 1.0}
