"""The random-access sources the pipelines shuffle, built from validated data files.

File formats and how they are read: `llada_jax.data.readers`. ArrayRecord record numbers in errors
are 0-based, as readers index them.

Sources are eager for text, JSONL and the columnar formats (Parquet, Arrow, `datasets`
directories): every file is read, validated and tokenized once when the pipeline is built, so bad
data fails at start-up and each process knows the exact number of examples to shard. Files are
read a line or a record batch at a time and only the int32 token ids are kept, never the text.
Corpora too large for that are converted once to ArrayRecord and read lazily.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
from typing import Any, Iterator, Sequence

import numpy as np

from llada_jax.data import schemas
from llada_jax.data.errors import DataError
from llada_jax.data.readers import check_exists, get_string, is_record_file, iter_records, iter_text_documents
from llada_jax.data.tokenizer import Tokenizer
from llada_jax.storage import remote

ON_TOO_LONG = ("error", "truncate", "skip")

STATS_KEYS = ("examples", "too_long_skipped", "too_long_truncated", "documents_split", "tokens_dropped")


def source_stats(examples: int, *, too_long_skipped: int = 0, too_long_truncated: int = 0,
                 documents_split: int = 0, tokens_dropped: int = 0) -> dict[str, int]:
  """What a source kept and what it changed or left out, so that nothing is dropped in silence.

  examples: examples the source yields per epoch (pretraining rows, or packed-pretraining pieces).
  too_long_skipped / too_long_truncated: examples longer than seq_len (on_too_long).
  documents_split: packed pretraining documents longer than seq_len, cut into several examples.
  tokens_dropped: the tail of the concatenated pretraining stream too short to fill a row.
  """
  return {"examples": int(examples), "too_long_skipped": int(too_long_skipped),
          "too_long_truncated": int(too_long_truncated), "documents_split": int(documents_split),
          "tokens_dropped": int(tokens_dropped)}


def check_token_ids(ids: np.ndarray, vocab_size: int, mask_id: int, *, path, line=None,
                    record=None, field="tokens") -> None:
  """Raises DataError unless every id is in the vocabulary and none is the mask token.

  A mask id in the data would be indistinguishable from noise the model is asked to undo.
  """
  bad = np.flatnonzero((ids < 0) | (ids >= vocab_size) | (ids == mask_id))
  if bad.size:
    i = int(bad[0])
    value = int(ids[i])
    if value == mask_id:
      reason = f"token id {value} at position {i} is the mask token"
    else:
      reason = f"token id {value} at position {i} is outside the vocabulary"
    raise DataError(f"{reason}; expected ids in [0, {vocab_size}) other than the mask id "
                    f"{mask_id}", path=path, line=line, record=record, field=field)


def _token_list(value, tokenizer: Tokenizer, *, path, line, field) -> np.ndarray:
  if not isinstance(value, list) or not value:
    raise DataError(f"expected a non-empty list of token ids, got {type(value).__name__}"
                    + (" (empty)" if value == [] else ""), path=path, line=line, field=field)
  for i, v in enumerate(value):
    if not isinstance(v, int) or isinstance(v, bool):
      raise DataError(f"element {i} is {type(v).__name__}; expected a list of integer token ids",
                      path=path, line=line, field=field)
  ids = np.asarray(value, dtype=np.int64)
  check_token_ids(ids, tokenizer.vocab_size, tokenizer.mask_id, path=path, line=line,
                  field=field)
  return ids.astype(np.int32)


def iter_pretrain_documents(path: str | os.PathLike, tokenizer: Tokenizer,
                            ) -> Iterator[tuple[int, str | np.ndarray]]:
  """(location, text or token ids) per document: text files, or records (JSONL, Parquet, Arrow,
  `datasets` directories) with a `text` string or a `tokens` list of ids."""
  path = os.fspath(path)
  if not is_record_file(path):
    yield from iter_text_documents(path)
    return
  for line, obj in iter_records(path):
    if "text" not in obj and "tokens" in obj:
      yield line, _token_list(obj["tokens"], tokenizer, path=path, line=line, field="tokens")
    elif "text" not in obj:
      raise DataError("missing; expected a non-empty string (or 'tokens', a list of token ids)",
                      path=path, line=line, field="text")
    else:
      yield line, get_string(obj, "text", path=path, line=line)


def _encode_documents(path: str, tokenizer: Tokenizer, batch: int = 1024
                      ) -> Iterator[np.ndarray]:
  """Token ids + EOS of each document of a pretraining file, encoded in batches."""
  pending: list[str] = []
  eos = np.array([tokenizer.eos_id], np.int32)

  def flush():
    for ids in tokenizer.encode_batch(pending):
      yield np.concatenate([np.asarray(ids, np.int32), eos])
    pending.clear()

  for _, document in iter_pretrain_documents(path, tokenizer):
    if isinstance(document, np.ndarray):
      yield from flush()
      yield np.concatenate([document, eos])
    else:
      pending.append(document)
      if len(pending) >= batch:
        yield from flush()
  yield from flush()


class Ragged:
  """Variable-length int32 rows in one flat buffer (compact and cheap to pickle)."""

  def __init__(self, rows: Sequence[Sequence[int] | np.ndarray]):
    lengths = np.fromiter((len(r) for r in rows), np.int64, count=len(rows))
    self.offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=self.offsets[1:])
    self.flat = (np.concatenate([np.asarray(r, np.int32) for r in rows]) if rows
                 else np.zeros(0, np.int32))

  def __len__(self):
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> np.ndarray:
    return self.flat[self.offsets[i]:self.offsets[i + 1]]


def _pad(ids: np.ndarray, length: int, pad_id: int) -> np.ndarray:
  out = np.full(length, pad_id, np.int32)
  out[:len(ids)] = ids
  return out


class TokenRowSource:
  """Rows of exactly `seq_len` tokens cut from the concatenation of EOS-terminated documents.

  The stream runs across documents and files; the remainder shorter than a row is dropped.
  """

  def __init__(self, files: Sequence[str], tokenizer: Tokenizer, seq_len: int):
    pieces = []
    for path in files:
      pieces.extend(_encode_documents(os.fspath(path), tokenizer))
    self.tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    self.seq_len = seq_len
    self.num_documents = len(pieces)
    self.files = list(files)

  def __len__(self):
    return len(self.tokens) // self.seq_len

  @property
  def stats(self) -> dict[str, int]:
    return source_stats(len(self), tokens_dropped=len(self.tokens) % self.seq_len)

  def __getitem__(self, row: int) -> dict[str, np.ndarray]:
    start = int(row) * self.seq_len
    return {"tokens": self.tokens[start:start + self.seq_len].copy()}


# ---------------------------------------------------------------- ArrayRecord token streams.

_ARRAY_RECORD_OPTIONS = "group_size:1"  # one record per chunk: cheap random access.


def write_array_record(
    input_files: Sequence[str | os.PathLike],
    output_path: str | os.PathLike,
    tokenizer: Tokenizer,
    *,
    chunk_len: int = 4096,
    overwrite: bool = False,
) -> dict[str, int]:
  """Tokenizes pretraining files (text, JSONL, Parquet, Arrow, `datasets` directories) into one
  ArrayRecord token-stream file.

  The EOS-terminated documents are concatenated and stored as records of `chunk_len`
  little-endian int32 ids (the last record may be shorter), so a reader can cut rows of any
  sequence length by position. Written to a temporary name and renamed at the end: a failure
  leaves nothing behind. Returns counts of documents, tokens and records.
  """
  from array_record.python import array_record_module

  output_path = os.fspath(output_path)
  if chunk_len < 1:
    raise ValueError(f"chunk_len must be positive, got {chunk_len}")
  if os.path.exists(output_path) and not overwrite:
    raise FileExistsError(f"{output_path} exists; pass overwrite=True to replace it")
  directory = os.path.dirname(output_path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  tmp_path = output_path + ".tmp"
  writer = array_record_module.ArrayRecordWriter(tmp_path, _ARRAY_RECORD_OPTIONS)
  buffer = np.zeros(0, np.int32)
  documents = tokens = records = 0
  try:
    for path in input_files:
      for ids in _encode_documents(os.fspath(path), tokenizer):
        documents += 1
        tokens += len(ids)
        buffer = np.concatenate([buffer, ids])
        full = len(buffer) // chunk_len
        for k in range(full):
          writer.write(buffer[k * chunk_len:(k + 1) * chunk_len].astype("<i4").tobytes())
        records += full
        buffer = buffer[full * chunk_len:]
    if len(buffer):
      writer.write(buffer.astype("<i4").tobytes())
      records += 1
    writer.close()
    os.replace(tmp_path, output_path)
  except BaseException:
    if writer.is_open():
      writer.close()
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise
  return {"documents": documents, "tokens": tokens, "records": records}


class ArrayRecordRowSource:
  """Rows of `seq_len` tokens read lazily from ArrayRecord token-stream files.

  Each file's stream is cut separately (its remainder dropped). Start-up reads only the first
  and last record of each file; every row is checked against the vocabulary when it is read.
  """

  def __init__(self, files: Sequence[str], tokenizer: Tokenizer, seq_len: int):
    from array_record.python import array_record_module
    import grain

    self.files = [os.fspath(f) for f in files]
    for path in self.files:
      if remote.is_remote(path):
        raise DataError("ArrayRecord files are read by a C++ reader that needs a local path; expected a local "
                        "file (copy it to local disk, or mount the bucket with gcsfuse)", path=path)
    self.seq_len = seq_len
    # Only the ints are kept, so the source stays small when pickled to worker processes.
    self.vocab_size, self.mask_id = tokenizer.vocab_size, tokenizer.mask_id
    chunk_lens, record_counts, row_counts = [], [], []
    self.tokens_dropped = 0  # each file's tail shorter than a row
    for path in self.files:
      check_exists(path)
      try:
        reader = array_record_module.ArrayRecordReader(path)
      except (RuntimeError, OSError) as e:
        raise DataError(f"cannot open as ArrayRecord ({e}); expected a file written by "
                        "write_array_record", path=path) from None
      try:
        n = reader.num_records()
        if n == 0:
          chunk, total = 1, 0
        else:
          first = reader.read([0])[0]
          last = reader.read([n - 1])[0] if n > 1 else first
          chunk = self._record_len(first, path, 0)
          last_len = self._record_len(last, path, n - 1)
          if last_len > chunk:
            raise DataError(f"has {last_len} tokens, more than record 0 ({chunk}); expected "
                            "equal-length records with a shorter last one", path=path,
                            record=n - 1, field="tokens")
          total = (n - 1) * chunk + last_len
          check_token_ids(np.frombuffer(first, "<i4"), self.vocab_size, self.mask_id,
                          path=path, record=0)
      finally:
        reader.close()
      chunk_lens.append(chunk)
      record_counts.append(n)
      row_counts.append(total // seq_len)
      self.tokens_dropped += total % seq_len
    self.chunk_lens = np.asarray(chunk_lens, np.int64)
    self.record_offsets = np.concatenate([[0], np.cumsum(record_counts)]).astype(np.int64)
    self.record_counts = np.asarray(record_counts, np.int64)
    self.row_offsets = np.concatenate([[0], np.cumsum(row_counts)]).astype(np.int64)
    self._source = grain.sources.ArrayRecordDataSource(self.files) if self.files else None

  @staticmethod
  def _record_len(data: bytes, path: str, record: int) -> int:
    if not data or len(data) % 4:
      raise DataError(f"record of {len(data)} bytes; expected a non-empty whole number of int32 "
                      "token ids", path=path, record=record, field="tokens")
    return len(data) // 4

  def __len__(self):
    return int(self.row_offsets[-1])

  @property
  def stats(self) -> dict[str, int]:
    return source_stats(len(self), tokens_dropped=self.tokens_dropped)

  def __getitem__(self, row: int) -> dict[str, np.ndarray]:
    row = int(row)
    f = bisect.bisect_right(self.row_offsets, row) - 1
    path, chunk = self.files[f], int(self.chunk_lens[f])
    start = (row - int(self.row_offsets[f])) * self.seq_len
    end = start + self.seq_len
    first, last = start // chunk, (end - 1) // chunk
    keys = [int(self.record_offsets[f]) + r for r in range(first, last + 1)]
    parts = []
    for r, data in zip(range(first, last + 1), self._source.__getitems__(keys)):
      n = self._record_len(data, path, r)
      is_last = r == self.record_counts[f] - 1
      if n != chunk and not (is_last and n < chunk):
        raise DataError(f"has {n} tokens; expected {chunk} like record 0", path=path, record=r,
                        field="tokens")
      ids = np.frombuffer(data, "<i4")
      check_token_ids(ids, self.vocab_size, self.mask_id, path=path, record=r)
      parts.append(ids)
    stream = np.concatenate(parts)
    offset = start - first * chunk
    return {"tokens": stream[offset:offset + self.seq_len].astype(np.int32)}


class ConcatSource:
  """Several random-access sources end to end."""

  def __init__(self, sources: Sequence[Any]):
    self.sources = list(sources)
    self.offsets = np.concatenate([[0], np.cumsum([len(s) for s in self.sources])]
                                  ).astype(np.int64)

  def __len__(self):
    return int(self.offsets[-1])

  @property
  def stats(self) -> dict[str, int]:
    parts = [s.stats for s in self.sources]
    return {k: sum(p[k] for p in parts) for k in STATS_KEYS}

  def __getitem__(self, i: int):
    k = bisect.bisect_right(self.offsets, int(i)) - 1
    return self.sources[k][int(i) - int(self.offsets[k])]


# ------------------------------------------------------------------- SFT and preferences.

@dataclasses.dataclass
class _Turn:
  """One single-turn example before tokenization."""
  path: str
  line: int  # a line number, or an errors.Record
  messages: list[dict[str, str]] | None  # the conversation before the answer (chat form)
  prompt: str | None  # raw prompt (prompt/response form)
  answers: dict[str, tuple[str, str]]  # name -> (field for errors, text)
  prompt_field: str = "prompt"  # the record field the prompt came from, for errors


def _turn(example: schemas.Example, path, line) -> _Turn:
  return _Turn(path, line, example.messages, example.prompt, example.answers, example.prompt_field)


def _parse_sft(obj: dict, *, path, line) -> list[_Turn]:
  """prompt/response, prompt/completion (plain or conversational) or messages: `schemas`."""
  return [_turn(e, path, line) for e in schemas.sft_examples(obj, path=path, line=line)]


def _parse_preference(obj: dict, *, path, line) -> list[_Turn]:
  """TRL's preference schemas, explicit or implicit prompt, plain or conversational: `schemas`."""
  return [_turn(schemas.preference_example(obj, path=path, line=line), path, line)]


def _prompt_ids(turn: _Turn, tokenizer: Tokenizer, chat_template: bool) -> list[int]:
  if chat_template:
    messages = turn.messages or [{"role": "user", "content": turn.prompt}]
    try:
      return tokenizer.encode_chat(messages)
    except DataError as e:  # a tokenizer's own template refusing this conversation: say which record
      raise DataError(f"{e}", path=turn.path, line=turn.line, field=turn.prompt_field) from None
  if turn.messages is not None:
    if len(turn.messages) != 1 or turn.messages[0]["role"] != "user":
      raise DataError("a dialogue with more than one message before the answer needs "
                      "chat_template=True; expected a single user message",
                      path=turn.path, line=turn.line, field=turn.prompt_field)
    return tokenizer.encode(turn.messages[0]["content"])
  return tokenizer.encode(turn.prompt)


def _fit(turn: _Turn, prompt_len: int, field: str, answer: list[int], seq_len: int,
         on_too_long: str) -> list[int] | None:
  """The answer (with EOS) cut to fit; None to skip the example."""
  if prompt_len + len(answer) <= seq_len:
    return answer
  if on_too_long == "skip":
    return None
  if prompt_len >= seq_len:
    raise DataError(f"prompt is {prompt_len} tokens; expected fewer than seq_len {seq_len} to "
                    "leave room for the answer (or on_too_long='skip')",
                    path=turn.path, line=turn.line, field=turn.prompt_field)
  if on_too_long == "truncate":
    return answer[:seq_len - prompt_len]
  raise DataError(f"prompt ({prompt_len}) + answer with EOS ({len(answer)}) is "
                  f"{prompt_len + len(answer)} tokens; expected at most seq_len {seq_len} "
                  "(or on_too_long='truncate' or 'skip')",
                  path=turn.path, line=turn.line, field=field)


def _load_turns(files: Sequence[str], parse) -> Iterator[_Turn]:
  """The examples of the files in order, parsed as they are read: only the tokens built from them are kept,
  so no file's text is ever held whole."""
  for path in files:
    # The location is a line number (JSONL) or an errors.Record (columnar): either reads right in errors.
    for line, obj in iter_records(os.fspath(path)):
      yield from parse(obj, path=os.fspath(path), line=line)


class SFTSource:
  """SFT examples: `tokens` = prompt + response + EOS, padded with EOS to seq_len.

  `example_id` is the example's index in the sources (files in order, lines in order, one
  example per assistant turn), assigned before skipping, so it never depends on shuffling,
  epochs, processes or the on_too_long policy.
  """

  def __init__(self, files: Sequence[str], tokenizer: Tokenizer, seq_len: int, *,
               chat_template: bool = True, on_too_long: str = "error"):
    if on_too_long not in ON_TOO_LONG:
      raise ValueError(f"on_too_long must be one of {ON_TOO_LONG}, got {on_too_long!r}")
    self.seq_len, self.pad_id = seq_len, tokenizer.eos_id
    rows, prompt_lengths, example_ids = [], [], []
    self.num_truncated = 0
    num_turns = 0
    for example_id, turn in enumerate(_load_turns(files, _parse_sft)):
      num_turns += 1
      prompt = _prompt_ids(turn, tokenizer, chat_template)
      field, response = turn.answers["response"]
      full = tokenizer.encode(response) + [tokenizer.eos_id]
      answer = _fit(turn, len(prompt), field, full, seq_len, on_too_long)
      if answer is None:
        continue
      self.num_truncated += len(answer) < len(full)
      rows.append(prompt + answer)
      prompt_lengths.append(len(prompt))
      example_ids.append(example_id)
    self.num_skipped = num_turns - len(rows)
    self.rows = Ragged(rows)
    self.prompt_lengths = np.asarray(prompt_lengths, np.int32)
    self.example_ids = np.asarray(example_ids, np.int32)

  def __len__(self):
    return len(self.rows)

  @property
  def stats(self) -> dict[str, int]:
    return source_stats(len(self), too_long_skipped=self.num_skipped, too_long_truncated=self.num_truncated)

  def example(self, i: int) -> dict[str, np.ndarray]:
    """Example i without the padding: what a packed row holds for it."""
    i = int(i)
    return {"tokens": self.rows[i], "prompt_lengths": self.prompt_lengths[i],
            "example_id": self.example_ids[i]}

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    i = int(i)
    return {
        "tokens": _pad(self.rows[i], self.seq_len, self.pad_id),
        "prompt_lengths": self.prompt_lengths[i],
        "example_id": self.example_ids[i],
    }


class PreferenceSource:
  """Preference pairs: `chosen`/`rejected` = prompt + response + EOS, padded with EOS.

  `*_lengths` count the valid tokens (prompt + response + one EOS, fewer if truncated).
  """

  def __init__(self, files: Sequence[str], tokenizer: Tokenizer, seq_len: int, *,
               chat_template: bool = True, on_too_long: str = "error"):
    if on_too_long not in ON_TOO_LONG:
      raise ValueError(f"on_too_long must be one of {ON_TOO_LONG}, got {on_too_long!r}")
    self.seq_len, self.pad_id = seq_len, tokenizer.eos_id
    chosen, rejected, prompt_lengths, example_ids = [], [], [], []
    self.num_truncated = 0
    num_turns = 0
    for example_id, turn in enumerate(_load_turns(files, _parse_preference)):
      num_turns += 1
      prompt = _prompt_ids(turn, tokenizer, chat_template)
      fitted, full_lengths = [], []
      for name in ("chosen", "rejected"):
        field, text = turn.answers[name]
        full = tokenizer.encode(text) + [tokenizer.eos_id]
        full_lengths.append(len(full))
        fitted.append(_fit(turn, len(prompt), field, full, seq_len, on_too_long))
      if None in fitted:
        continue
      self.num_truncated += any(len(a) < n for a, n in zip(fitted, full_lengths))
      chosen.append(prompt + fitted[0])
      rejected.append(prompt + fitted[1])
      prompt_lengths.append(len(prompt))
      example_ids.append(example_id)
    self.num_skipped = num_turns - len(chosen)
    self.chosen, self.rejected = Ragged(chosen), Ragged(rejected)
    self.prompt_lengths = np.asarray(prompt_lengths, np.int32)
    self.example_ids = np.asarray(example_ids, np.int32)

  def __len__(self):
    return len(self.chosen)

  @property
  def stats(self) -> dict[str, int]:
    return source_stats(len(self), too_long_skipped=self.num_skipped, too_long_truncated=self.num_truncated)

  def example(self, i: int) -> dict[str, np.ndarray]:
    """Pair i without the padding: what packed rows hold for it (the *_lengths are the lengths)."""
    i = int(i)
    return {"chosen": self.chosen[i], "rejected": self.rejected[i],
            "prompt_lengths": self.prompt_lengths[i], "example_id": self.example_ids[i]}

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    i = int(i)
    chosen, rejected = self.chosen[i], self.rejected[i]
    return {
        "chosen": _pad(chosen, self.seq_len, self.pad_id),
        "rejected": _pad(rejected, self.seq_len, self.pad_id),
        "prompt_lengths": self.prompt_lengths[i],
        "chosen_lengths": np.int32(len(chosen)),
        "rejected_lengths": np.int32(len(rejected)),
        "example_id": self.example_ids[i],
    }
