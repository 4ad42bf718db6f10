"""Grain input pipelines for pretraining, SFT and preference (VRPO) data.

Every pipeline is a random-access source -> global shuffle (seeded, a new permutation each epoch)
-> epochs concatenated -> rows p, p+P, p+2P, ... for process p of P -> (packed: several examples
per row) -> batches of `per_process_batch_size`. Consequences:
- the same seed gives the same batches on every run and machine;
- the processes' rows are disjoint and together cover each epoch; all processes yield the same
  number of batches (the global tail that cannot fill one batch on every process is dropped);
- batches run across epoch boundaries, so nothing but that final tail is dropped;
- the iterator state is one index (packed: and the row within the packing window), so
  `get_state()`/`set_state()` resume exactly.

Batch formats (numpy, per process, B = per_process_batch_size, L = seq_len):
- pretrain:   {'tokens': int32 [B, L]}
- sft:        {'tokens': int32 [B, L], 'prompt_lengths': int32 [B], 'example_id': int32 [B]}
- preference: {'chosen': int32 [B, L], 'rejected': int32 [B, L], 'prompt_lengths': int32 [B],
               'chosen_lengths': int32 [B], 'rejected_lengths': int32 [B],
               'example_id': int32 [B]}
Sequences are padded with EOS. `example_id` is the example's index in the source files.

Packed batches (`packing=True`, K = max_segments): each row holds up to K whole examples (see
`llada_jax.data.packing`), contiguous from position 0 with segment ids 1..k in order; the rest is
padding (EOS, segment id 0). Slot s of a [B, K] array is the example with segment id s + 1; empty
slots hold example_id -1 and prompt_lengths 0.
- pretrain:   {'tokens': [B, L], 'segment_ids': [B, L], 'example_id': [B, K]}
- sft:        {'tokens': [B, L], 'segment_ids': [B, L], 'prompt_lengths': [B, K],
               'example_id': [B, K]}
- preference: {'chosen': [B, L], 'rejected': [B, L], 'chosen_segment_ids': [B, L],
               'rejected_segment_ids': [B, L], 'prompt_lengths': [B, K], 'example_id': [B, K]}
All int32. A segment is exactly the unpacked example without its padding (SFT: prompt + response
+ EOS; preference: prompt + answer + EOS, so a segment's length is its unpacked *_lengths; an
answer truncated by on_too_long='truncate' has no EOS and fills its row alone).
Slot s of a chosen row and of the rejected row beside it is the same pair. Pretraining examples are
the EOS-terminated documents (text or JSONL files; ArrayRecord streams keep no boundaries), a
document longer than seq_len cut into pieces of at most seq_len, each its own example_id.
Each process packs its own examples after the shuffle, with a seeded first fit over
`packing_bins` rows at a time, so the number of rows per process is not known in advance:
packed multi-process runs repeat forever (num_epochs=None) and stop after a number of steps. With
finite epochs (one process) the last rows that cannot fill a batch are dropped, like the unpacked
tail. `Pipeline.stats` counts what the sources skipped, truncated or split; `batch_stats` measures
the padding of a batch.

Data conventions:
- pretraining: plain text files hold documents separated by blank lines; JSONL lines hold a
  `text` string (or `tokens`, a list of ids); ArrayRecord files come from `write_array_record`.
  Every document gets an EOS; the documents are concatenated and cut into rows of seq_len.
- SFT: JSONL `{"prompt", "response"}` or `{"messages": [{"role", "content"}, ...]}` (roles
  system, user, assistant). A dialogue gives one example per assistant turn whose prompt is the
  chat template of every message before it (earlier answers included, each closed by
  <|eot_id|>). tokens = prompt + response + EOS + EOS padding; prompt_lengths = len(prompt).
  With chat_template=False the prompt is the raw prompt text's tokens.
- preference: JSONL `{"prompt", "chosen", "rejected"}`; *_lengths = prompt + response + 1 EOS.
- records: whatever is said of JSONL lines holds for the rows of Parquet and Arrow files and of
  directories saved by Hugging Face `datasets` (`DIR`, `DIR:SPLIT`), with the same fields as
  columns; errors name their 0-based record index (`llada_jax.data.columnar`).
- on_too_long ('error' | 'truncate' | 'skip'): what to do when prompt + response + EOS exceeds
  seq_len. 'truncate' keeps the prompt and cuts the answer (its EOS is lost); a prompt leaving
  no room for an answer is an error unless skipped. example_id is assigned before skipping.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from typing import Any, Sequence

import grain
import numpy as np
from etils import epath

from llada_jax.storage import remote

from llada_jax.data import packing as packing_lib
from llada_jax.data import readers, sources
from llada_jax.data.errors import DataError
from llada_jax.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

KINDS = {
    "pretrain": "pretrain",
    "pretraining": "pretrain",
    "sft": "sft",
    "preference": "preference",
    "preferences": "preference",
    "vrpo": "preference",
    "dpo": "preference",
}

BATCH_SPECS = {
    "pretrain": {"tokens": "BL"},
    "sft": {"tokens": "BL", "prompt_lengths": "B", "example_id": "B"},
    "preference": {"chosen": "BL", "rejected": "BL", "prompt_lengths": "B",
                   "chosen_lengths": "B", "rejected_lengths": "B", "example_id": "B"},
}

# K: max_segments, the examples a packed row can hold.
PACKED_BATCH_SPECS = {
    "pretrain": {"tokens": "BL", "segment_ids": "BL", "example_id": "BK"},
    "sft": {"tokens": "BL", "segment_ids": "BL", "prompt_lengths": "BK", "example_id": "BK"},
    "preference": {"chosen": "BL", "rejected": "BL", "chosen_segment_ids": "BL", "rejected_segment_ids": "BL",
                   "prompt_lengths": "BK", "example_id": "BK"},
}


def batch_spec(kind: str, per_process_batch_size: int, seq_len: int, *, packed: bool = False,
               max_segments: int = 16) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Shape and dtype of every array in a batch of `kind`, packed or not (all int32)."""
  sizes = {"B": per_process_batch_size, "L": seq_len, "K": max_segments}
  specs = PACKED_BATCH_SPECS if packed else BATCH_SPECS
  return {k: (tuple(sizes[c] for c in axes), np.dtype(np.int32))
          for k, axes in specs[canonical_kind(kind)].items()}


def canonical_kind(kind: str) -> str:
  if kind not in KINDS:
    raise ValueError(f"unknown pipeline kind {kind!r}; expected one of {sorted(KINDS)}")
  return KINDS[kind]


def _glob(pattern: str) -> list[str]:
  """Sorted matches of a local or remote (gs://...) pattern; remote ones through etils.epath."""
  if not remote.is_remote(pattern):
    return sorted(glob.glob(pattern))
  parts = pattern.split("/")
  first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
  root = epath.Path("/".join(parts[:first]))
  return sorted(os.fspath(p) for p in root.glob("/".join(parts[first:])))


def expand_files(files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
  """A file, a list of files, or glob patterns -> sorted existing paths (patterns expanded).

  Paths may be local or remote (`gs://bucket/train-*.jsonl`). Every path, a pattern's matches
  included, must be a regular file or a directory saved by `datasets` (`DIR`, or `DIR:SPLIT` of
  a DatasetDict; `readers.check_exists`).
  """
  if isinstance(files, (str, os.PathLike)):
    files = [files]
  paths = []
  for f in files:
    f = os.fspath(f)
    if glob.has_magic(f):
      matches = _glob(f)
      if not matches:
        raise DataError("no file matches this pattern; expected at least one", path=f)
      for match in matches:
        readers.check_exists(match)
      paths.extend(matches)
    else:
      readers.check_exists(f)
      paths.append(f)
  if not paths:
    raise ValueError("no data files given")
  return paths


def make_source(kind: str, files, tokenizer: Tokenizer, *, seq_len: int,
                chat_template: bool = True, on_too_long: str = "error", packing: bool = False):
  """The random-access (unshuffled, unsharded) source of examples of `kind`.

  Pretraining takes text, records with `text` or pre-tokenized `tokens` (JSONL, Parquet, Arrow,
  `datasets` directories) and ArrayRecord files, in any mix; packed pretraining (`packing=True`:
  one example per document) takes all but ArrayRecord. SFT and preference data are records (JSONL,
  Parquet, Arrow, `datasets` directories). Logs the source's `stats` once.
  """
  kind = canonical_kind(kind)
  paths = expand_files(files)
  if seq_len < 2:
    raise ValueError(f"seq_len must be at least 2, got {seq_len}")
  if kind == "pretrain":
    source = _pretrain_source(paths, tokenizer, seq_len, packing)
  else:
    not_records = [p for p in paths if not readers.is_record_file(p)]
    if not_records:
      raise DataError(f"{kind} data must be JSONL, Parquet, Arrow or a datasets directory; expected a .jsonl, "
                      ".parquet or .arrow file or a directory saved by datasets", path=not_records[0])
    cls = sources.SFTSource if kind == "sft" else sources.PreferenceSource
    source = cls(paths, tokenizer, seq_len, chat_template=chat_template, on_too_long=on_too_long)
  _log_stats(kind, source.stats, seq_len, packing)
  return source


def _pretrain_source(paths: list[str], tokenizer: Tokenizer, seq_len: int, packing: bool):
  array_records = [p for p in paths if readers.is_array_record(p)]
  texts = [p for p in paths if not readers.is_array_record(p)]
  if packing:
    if array_records:
      raise DataError("packed pretraining needs document boundaries, which an ArrayRecord token stream does not "
                      "keep; expected text or JSONL files, or Parquet, Arrow or datasets tables (or packing=False)", path=array_records[0])
    return packing_lib.DocumentSource(texts, tokenizer, seq_len)
  parts = []
  if texts:
    parts.append(sources.TokenRowSource(texts, tokenizer, seq_len))
  if array_records:
    parts.append(sources.ArrayRecordRowSource(array_records, tokenizer, seq_len))
  return parts[0] if len(parts) == 1 else sources.ConcatSource(parts)


def _log_stats(kind: str, stats: dict[str, int], seq_len: int, packing: bool) -> None:
  """One line on what the source kept, a warning when examples were skipped or cut."""
  lossy = stats["too_long_skipped"] or stats["too_long_truncated"]
  log.log(logging.WARNING if lossy else logging.INFO,
          "%s data (seq_len %d, %s): %d examples; longer than seq_len: %d skipped, %d truncated; "
          "%d documents split into pieces; %d tail tokens dropped", kind, seq_len,
          "packed" if packing else "one example per row", stats["examples"], stats["too_long_skipped"],
          stats["too_long_truncated"], stats["documents_split"], stats["tokens_dropped"])


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """A built pipeline: the Grain dataset and what the trainer needs to know about it."""

  dataset: grain.IterDataset
  source: Any
  kind: str
  seq_len: int
  per_process_batch_size: int
  process_index: int
  process_count: int
  num_epochs: int | None
  packed: bool = False
  max_segments: int = 16
  packing_bins: int = 0  # as used: the automatic choice resolved
  pad_id: int | None = None

  @property
  def num_examples(self) -> int:
    """Examples in one epoch, over all processes (unpacked pretraining: rows of seq_len tokens;
    packed pretraining: documents, long ones counted once per piece)."""
    return len(self.source)

  @property
  def stats(self) -> dict[str, int]:
    """What the source kept, skipped or cut: `examples`, `too_long_skipped`, `too_long_truncated`,
    `documents_split`, `tokens_dropped` (see `sources.source_stats`)."""
    return dict(self.source.stats)

  @property
  def global_batch_size(self) -> int:
    return self.per_process_batch_size * self.process_count

  @property
  def steps_per_epoch(self) -> float | None:
    """Batches per epoch on each process (fractional: batches run across epochs); None when
    packed, as the number of packed rows is only known once packed."""
    if self.packed:
      return None
    return self.num_examples / self.global_batch_size

  @property
  def num_batches(self) -> int | None:
    """Batches each process yields in all, None if it repeats forever or is packed (unknown)."""
    if self.num_epochs is None or self.packed:
      return None
    return self.num_examples * self.num_epochs // self.global_batch_size

  def batch_stats(self, batch) -> dict[str, float]:
    """`padding_fraction` and `examples_per_row` of one of this pipeline's batches."""
    return packing_lib.batch_stats(batch, self.kind, self.packed, eos_id=self.pad_id)

  def __iter__(self) -> grain.DatasetIterator:
    return iter(self.dataset)


def _check_args(*, process_index, process_count, per_process_batch_size, num_epochs, packing,
                max_segments, packing_bins) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  if per_process_batch_size < 1:
    raise ValueError(f"per_process_batch_size must be positive, got {per_process_batch_size}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be positive or None (forever), got {num_epochs}")
  if max_segments < 1:
    raise ValueError(f"max_segments must be at least 1 (examples per packed row), got {max_segments}")
  if packing_bins < 0:
    raise ValueError(f"packing_bins must be 0 (automatic) or positive, got {packing_bins}")
  if packing and num_epochs is not None and process_count > 1:
    raise ValueError(f"num_epochs={num_epochs} with packing and {process_count} processes: each process packs "
                     "its own examples, so the processes would disagree on the number of steps; expected "
                     "num_epochs=None (packed data repeats forever; the run length is set by the steps)")


def _packed_batches(examples: grain.MapDataset, kind: str, *, seq_len, pad_id, per_process_batch_size,
                    max_segments, packing_bins, seed, shuffle, read_threads, prefetch_batches) -> grain.IterDataset:
  """This process's shuffled examples -> batches of packed rows."""
  # Packing reads a stream; prefetching examples keeps the readers ahead of it.
  stream = examples.to_iter_dataset(grain.ReadOptions(
      num_threads=read_threads, prefetch_buffer_size=prefetch_batches * per_process_batch_size))
  rows = packing_lib.pack(stream, kind, seq_len=seq_len, pad_id=pad_id, max_segments=max_segments,
                          num_bins=packing_bins, seed=seed, shuffle_bins=shuffle)
  batches = rows.batch(per_process_batch_size, drop_remainder=True)
  # Packing runs in Python: a thread keeps it off the training loop's.
  return packing_lib.ThreadPrefetch(batches, prefetch_buffer_size=prefetch_batches)


def make_dataset(
    kind: str,
    files,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    per_process_batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    chat_template: bool = True,
    on_too_long: str = "error",
    read_threads: int = 2,
    prefetch_batches: int = 4,
    packing: bool = False,
    max_segments: int = 16,
    packing_bins: int = 0,
) -> Pipeline:
  """Builds (and validates) the pipeline; see the module docstring for its semantics.

  packing: several examples per row (the packed formats). max_segments: the most examples a
  packed row holds (K). packing_bins: rows packed at a time, 0 for `packing.default_bins` (more
  bins: less padding, more memory, more mixing of one epoch with the next).
  """
  kind = canonical_kind(kind)
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  _check_args(process_index=process_index, process_count=process_count,
              per_process_batch_size=per_process_batch_size, num_epochs=num_epochs, packing=packing,
              max_segments=max_segments, packing_bins=packing_bins)

  source = make_source(kind, files, tokenizer, seq_len=seq_len, chat_template=chat_template,
                       on_too_long=on_too_long, packing=packing)
  global_batch = per_process_batch_size * process_count
  n = len(source)
  if n == 0:
    raise DataError(f"no {kind} examples (seq_len {seq_len}); expected at least one",
                    path=", ".join(expand_files(files)))
  if num_epochs is not None and n * num_epochs < global_batch:
    raise DataError(f"{n} examples x {num_epochs} epochs cannot fill one global batch of "
                    f"{global_batch}; expected more data, more epochs or a smaller batch",
                    path=", ".join(expand_files(files)))

  ds = grain.MapDataset.source(packing_lib.UnpaddedExamples(source) if packing else source)
  if shuffle:
    # A MapDataset shuffle is a seeded index permutation that changes with the epoch once
    # repeated, so no buffer is needed and any position can be resumed.
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  if packing:
    packing_bins = packing_bins or packing_lib.default_bins(per_process_batch_size)
    iter_ds = _packed_batches(ds[process_index::process_count], kind, seq_len=seq_len, pad_id=tokenizer.eos_id,
                              per_process_batch_size=per_process_batch_size, max_segments=max_segments,
                              packing_bins=packing_bins, seed=seed, shuffle=shuffle, read_threads=read_threads,
                              prefetch_batches=prefetch_batches)
  else:
    # Same length on every process, else the processes would disagree on the number of steps.
    ds = ds[:len(ds) - len(ds) % global_batch]
    ds = ds[process_index::process_count]
    ds = ds.batch(per_process_batch_size, drop_remainder=True)
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                   prefetch_buffer_size=prefetch_batches))
  return Pipeline(iter_ds, source, kind, seq_len, per_process_batch_size, process_index,
                  process_count, num_epochs, packed=packing, max_segments=max_segments,
                  packing_bins=packing_bins if packing else 0, pad_id=tokenizer.eos_id)


def make_pipeline(
    kind: str,
    files,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    per_process_batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    **kwargs,
) -> grain.DatasetIterator:
  """The iterator the trainer reads: `next(it)` is a batch; `get_state()`/`set_state()` resume.

  kind: 'pretrain', 'sft' or 'preference' (aliases in KINDS). files: paths or glob patterns.
  num_epochs: None repeats forever. process_index/process_count default to jax's.
  Other keywords (chat_template, on_too_long, read_threads, prefetch_batches, packing,
  max_segments, packing_bins) go to `make_dataset`.
  """
  return iter(make_dataset(
      kind, files, tokenizer, seq_len=seq_len, per_process_batch_size=per_process_batch_size,
      seed=seed, shuffle=shuffle, num_epochs=num_epochs, process_index=process_index,
      process_count=process_count, **kwargs))
