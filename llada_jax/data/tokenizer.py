"""Tokenizers: a small interface, sentencepiece and Hugging Face backends, and training.

The interface carries the LLaDA special tokens (mask, EOS = pad, BOS, chat markers) and builds
the chat template from ids, so header and end-of-turn markers are always single special tokens
and user text can never produce a special id. Backends: sentencepiece models trained here
(`.model`, command line: `python -m llada_jax.tokenizer train`) and Hugging Face `tokenizer.json`
files, such as the one shipped with LLaDA-8B; a Jinja `chat_template` in the `tokenizer_config.json`
beside one replaces the built-in template, with the same guarantee (`llada_jax.data.chat_template`).
"""

from __future__ import annotations

import abc
import os
from typing import Iterable, Iterator, Mapping, Sequence

from llada_jax.data import chat_template as chat_template_lib
from llada_jax.data import readers
from llada_jax.data.errors import DataError

MASK_TOKEN = "<|mdm_mask|>"
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|startoftext|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"
UNK_TOKEN = "<unk>"

# Ids fixed by train_sentencepiece and checked when a model is loaded. unk/bos/eos take
# sentencepiece's own reserved slots; the rest are control symbols, which the encoder never
# emits for input text.
SENTENCEPIECE_SPECIAL_IDS = {
    UNK_TOKEN: 0,
    BOS_TOKEN: 1,
    EOS_TOKEN: 2,
    MASK_TOKEN: 3,
    START_HEADER_TOKEN: 4,
    END_HEADER_TOKEN: 5,
    EOT_TOKEN: 6,
}

CHAT_ROLES = ("system", "user", "assistant")

HF_TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(abc.ABC):
  """What the pipelines, trainer and samplers need from a tokenizer.

  Subclasses provide `encode`, `decode`, `vocab_size` and the special ids; the chat template
  is built here from those, so every backend produces the same structure.
  """

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, with no BOS/EOS added."""

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` over many texts; backends override it with a faster batched call."""
    return [self.encode(t) for t in texts]

  @abc.abstractmethod
  def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
    """Text of `ids`; special ids are dropped, or rendered as their token text if not skipped."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids; every id the tokenizer produces is below it."""

  @property
  @abc.abstractmethod
  def mask_id(self) -> int:
    ...

  @property
  @abc.abstractmethod
  def eos_id(self) -> int:
    ...

  @property
  @abc.abstractmethod
  def bos_id(self) -> int:
    ...

  @property
  @abc.abstractmethod
  def eot_id(self) -> int:
    """End of turn, closing every chat message."""

  @property
  @abc.abstractmethod
  def start_header_id(self) -> int:
    ...

  @property
  @abc.abstractmethod
  def end_header_id(self) -> int:
    ...

  @property
  def pad_id(self) -> int:
    # LLaDA pads with EOS and trains on the padding as answer.
    return self.eos_id

  @property
  def special_ids(self) -> dict[str, int]:
    return {
        "mask": self.mask_id,
        "eos": self.eos_id,
        "bos": self.bos_id,
        "eot": self.eot_id,
        "start_header": self.start_header_id,
        "end_header": self.end_header_id,
    }

  def encode_chat(
      self,
      messages: Sequence[Mapping[str, str]],
      add_generation_prompt: bool = True,
  ) -> list[int]:
    """LLaDA (Llama-3 style) chat template of `messages`, from ids.

    `<BOS>` then, per message, `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`;
    with `add_generation_prompt`, an open assistant header follows so the model writes the answer.
    """
    ids = [self.bos_id]
    for message in messages:
      ids += self._header(message["role"])
      ids += self.encode("\n\n" + message["content"])
      ids.append(self.eot_id)
    if add_generation_prompt:
      ids += self._header("assistant")
      ids += self.encode("\n\n")
    return ids

  def chat_prompt(self, user_text: str) -> list[int]:
    """`<BOS><|start_header_id|>user<|end_header_id|>\\n\\n{user_text}<|eot_id|>` + assistant header."""
    return self.encode_chat([{"role": "user", "content": user_text}])

  def _header(self, role: str) -> list[int]:
    return [self.start_header_id, *self.encode(role), self.end_header_id]


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model trained by `train_sentencepiece` (special ids checked on load)."""

  def __init__(self, model_path: str | os.PathLike):
    import sentencepiece as spm

    self.model_path = os.fspath(model_path)
    if not os.path.exists(self.model_path):
      raise DataError("tokenizer model not found; expected a sentencepiece .model file",
                      path=self.model_path)
    readers.check_exists(self.model_path, "sentencepiece .model file")
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(self.model_path)
    except (OSError, RuntimeError) as e:
      raise DataError(f"not a sentencepiece model ({e})", path=self.model_path) from e
    self._check_special_ids()
    self._special = frozenset(SENTENCEPIECE_SPECIAL_IDS.values())

  def _check_special_ids(self):
    size = self._sp.GetPieceSize()
    for piece, expected in SENTENCEPIECE_SPECIAL_IDS.items():
      found = self._sp.PieceToId(piece)
      actual_piece = self._sp.IdToPiece(expected) if expected < size else None
      if found != expected or actual_piece != piece:
        raise DataError(
            f"special token {piece!r} has id {found} (id {expected} is {actual_piece!r}); "
            f"expected id {expected}, as written by llada_jax.data.tokenizer.train_sentencepiece",
            path=self.model_path)
      if piece != UNK_TOKEN and not self._sp.IsControl(expected):
        raise DataError(
            f"special token {piece!r} (id {expected}) is not a control symbol; expected a model "
            "trained by llada_jax.data.tokenizer.train_sentencepiece",
            path=self.model_path)

  def encode(self, text: str) -> list[int]:
    return self._sp.EncodeAsIds(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
      return []
    return self._sp.EncodeAsIds(list(texts))

  def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
    ids = [int(i) for i in ids]
    size = self.vocab_size
    bad = [i for i in ids if not 0 <= i < size]
    if bad:
      raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {size})")
    if skip_special:
      return self._sp.DecodeIds([i for i in ids if i not in self._special])
    # sentencepiece drops control ids, so render them ourselves between decoded runs.
    parts, run = [], []
    for i in ids:
      if i in self._special:
        parts.append(self._sp.DecodeIds(run))
        parts.append(self._sp.IdToPiece(i))
        run = []
      else:
        run.append(i)
    parts.append(self._sp.DecodeIds(run))
    return "".join(parts)

  @property
  def vocab_size(self) -> int:
    return self._sp.GetPieceSize()

  @property
  def mask_id(self) -> int:
    return SENTENCEPIECE_SPECIAL_IDS[MASK_TOKEN]

  @property
  def eos_id(self) -> int:
    return SENTENCEPIECE_SPECIAL_IDS[EOS_TOKEN]

  @property
  def bos_id(self) -> int:
    return SENTENCEPIECE_SPECIAL_IDS[BOS_TOKEN]

  @property
  def eot_id(self) -> int:
    return SENTENCEPIECE_SPECIAL_IDS[EOT_TOKEN]

  @property
  def start_header_id(self) -> int:
    return SENTENCEPIECE_SPECIAL_IDS[START_HEADER_TOKEN]

  @property
  def end_header_id(self) -> int:
    return SENTENCEPIECE_SPECIAL_IDS[END_HEADER_TOKEN]

  def __repr__(self):
    return f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


class HuggingFaceTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json` (the `tokenizers` library), e.g. the LLaDA-8B tokenizer.

  Special ids are looked up by token text (`<|mdm_mask|>`, `<|endoftext|>`, ...), so a LLaDA
  tokenizer gives mask 126336, EOS 126081 and BOS 126080 and a small test tokenizer whatever ids
  it assigned. Each must be an added token marked special: the encoder is told not to match
  special tokens in text, so user text can never produce one.
  """

  def __init__(self, path: str | os.PathLike):
    from tokenizers import Tokenizer as _Tokenizer  # noqa: PLC0415 - only this backend needs it

    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, HF_TOKENIZER_FILE)
    self.path = path
    if not os.path.exists(path):
      raise DataError(f"tokenizer file not found; expected a Hugging Face {HF_TOKENIZER_FILE}", path=path)
    readers.check_exists(path, f"Hugging Face {HF_TOKENIZER_FILE}")
    try:
      self._tok = _Tokenizer.from_file(path)
    except Exception as e:  # the Rust library raises plain Exceptions for malformed files
      raise DataError(f"not a Hugging Face tokenizer.json ({e})", path=path) from e
    # Special tokens in user text are then split into ordinary pieces instead of matched.
    self._tok.encode_special_tokens = True
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self._vocab_size = max(vocab.values()) + 1 if vocab else 0
    added = self._tok.get_added_tokens_decoder()
    self._special = frozenset(i for i, token in added.items() if token.special)
    self._ids = {}
    for token in (MASK_TOKEN, EOS_TOKEN, BOS_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN):
      token_id = self._tok.token_to_id(token)
      if token_id is None:
        raise DataError(f"special token {token!r} is not in the vocabulary; expected a LLaDA tokenizer "
                        f"with {MASK_TOKEN}, {EOS_TOKEN}, {BOS_TOKEN} and the chat markers "
                        f"{START_HEADER_TOKEN}, {END_HEADER_TOKEN}, {EOT_TOKEN}", path=path)
      if token_id not in self._special:
        raise DataError(f"token {token!r} (id {token_id}) is not an added token marked special; expected "
                        "it in added_tokens with \"special\": true, so that text cannot produce it", path=path)
      self._ids[token] = token_id
    specials = {added[i].content: i for i in self._special}
    self.chat_template = chat_template_lib.load(
        os.path.join(os.path.dirname(path), chat_template_lib.CONFIG_FILE), specials)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_chat(
      self,
      messages: Sequence[Mapping[str, str]],
      add_generation_prompt: bool = True,
  ) -> list[int]:
    """The tokenizer's own Jinja chat template if tokenizer_config.json has one, else LLaDA's.

    Special ids come only from the template's text; message contents are encoded as plain text.
    """
    if self.chat_template is None:
      return super().encode_chat(messages, add_generation_prompt)
    for i, message in enumerate(messages):
      # Roles are written into the template's text, where special tokens are matched.
      if message["role"] not in CHAT_ROLES:
        raise ValueError(f"message {i} has role {message['role']!r}; expected one of {', '.join(CHAT_ROLES)}")
    ids = []
    for piece in self.chat_template.pieces(messages, add_generation_prompt):
      if isinstance(piece, int):
        ids.append(piece)
      else:
        ids += self.encode(piece)
    return ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
      return []
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
    ids = [int(i) for i in ids]
    for i in ids:
      # The library silently drops unknown ids; a gap in the vocabulary is an error here.
      if not 0 <= i < self._vocab_size or self._tok.id_to_token(i) is None:
        raise ValueError(f"token id {i} is not in the vocabulary of {self.path} (size {self._vocab_size})")
    return self._tok.decode(ids, skip_special_tokens=skip_special)

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def mask_id(self) -> int:
    return self._ids[MASK_TOKEN]

  @property
  def eos_id(self) -> int:
    return self._ids[EOS_TOKEN]

  @property
  def bos_id(self) -> int:
    return self._ids[BOS_TOKEN]

  @property
  def eot_id(self) -> int:
    return self._ids[EOT_TOKEN]

  @property
  def start_header_id(self) -> int:
    return self._ids[START_HEADER_TOKEN]

  @property
  def end_header_id(self) -> int:
    return self._ids[END_HEADER_TOKEN]

  def __repr__(self):
    return f"HuggingFaceTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """The tokenizer stored at `path`.

  A sentencepiece `.model` file, a Hugging Face `tokenizer.json`, or a directory holding a
  `tokenizer.json` (a Hugging Face checkpoint, or a run directory made by `llada_jax.convert`).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    if not os.path.lexists(os.path.join(path, HF_TOKENIZER_FILE)):
      raise DataError(f"directory has no {HF_TOKENIZER_FILE}; expected a Hugging Face tokenizer directory, "
                      "a tokenizer.json file or a sentencepiece .model file", path=path)
    return HuggingFaceTokenizer(path)
  if path.endswith(".json"):
    return HuggingFaceTokenizer(path)
  return SentencePieceTokenizer(path)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  """Raises a ValueError if some id of `tokenizer` has no row in the model's embedding."""
  largest_special = max(tokenizer.special_ids.values())
  if tokenizer.vocab_size > model_vocab_size or largest_special >= model_vocab_size:
    raise ValueError(
        f"tokenizer vocabulary size {tokenizer.vocab_size} (largest special id "
        f"{largest_special}) does not fit the model vocabulary size {model_vocab_size}; "
        f"expected a model vocab_size of at least "
        f"{max(tokenizer.vocab_size, largest_special + 1)}")


# Fields whose strings, or whose messages' contents, train a tokenizer when the input is JSONL:
# pretraining, SFT and preference formats (llada_jax.data.schemas).
_JSONL_TEXT_FIELDS = ("text", "prompt", "response", "completion", "chosen", "rejected", "messages")


def iter_training_text(input_files: Sequence[str | os.PathLike]) -> Iterator[str]:
  """Lines of text for tokenizer training, from plain text and JSONL files.

  JSONL lines contribute their text fields (`text`, `prompt`, `response`, `completion`, `chosen`,
  `rejected`), or the `content` of each message where such a field (or `messages`) is a list of
  messages. sentencepiece trains on lines, so texts are split on newlines.
  """
  for path in input_files:
    path = os.fspath(path)
    if readers.is_jsonl(path):
      for line, obj in readers.iter_jsonl(path):
        texts = []
        for key in _JSONL_TEXT_FIELDS:
          value = obj.get(key)
          if isinstance(value, str):
            texts.append((key, value))
          elif isinstance(value, list):
            texts += [(f"{key}[{i}].content", m["content"]) for i, m in enumerate(value)
                      if isinstance(m, dict) and isinstance(m.get("content"), str)]
        for field, text in texts:
          readers.check_utf8(text, path=path, line=line, field=field)
          yield from (t for t in text.split("\n") if t.strip())
    else:
      for _, document in readers.iter_text_documents(path):
        yield from (t for t in document.split("\n") if t.strip())


def train_sentencepiece(
    input_files: Sequence[str | os.PathLike],
    model_prefix: str | os.PathLike,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    max_sentences: int = 2_000_000,
    num_threads: int | None = None,
    verbose: bool = False,
    overwrite: bool = False,
) -> SentencePieceTokenizer:
  """Trains a sentencepiece model on text/JSONL files; writes `{model_prefix}.model` and `.vocab`.

  byte_fallback makes any UTF-8 text encodable; identity normalisation without a dummy prefix
  keeps whitespace and newlines, so `decode(encode(s)) == s` and the chat template's `\\n\\n`
  survive. The special tokens get the ids in SENTENCEPIECE_SPECIAL_IDS.

  Existing outputs are refused unless `overwrite`: a model trained with the old tokenizer would
  decode garbage with a new one. The files are written under temporary names and renamed at the
  end, so a failed training leaves any earlier pair intact.
  """
  import sentencepiece as spm

  model_prefix = os.fspath(model_prefix)
  if model_type not in ("bpe", "unigram"):
    raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
  if not input_files:
    raise ValueError("train_sentencepiece needs at least one input file")
  minimum = len(SENTENCEPIECE_SPECIAL_IDS) + 256 + 1
  if vocab_size < minimum:
    raise ValueError(f"vocab_size {vocab_size} is too small: the special tokens and 256 byte "
                     f"pieces need at least {minimum}")
  for path in input_files:
    readers.check_exists(path, "text or JSONL input file")
  _check_outputs(model_prefix, overwrite)
  directory = os.path.dirname(model_prefix)
  if directory:
    os.makedirs(directory, exist_ok=True)

  # Materialised first so errors in the inputs surface as DataError, not inside the C++ trainer.
  sentences = []
  for sentence in iter_training_text(input_files):
    sentences.append(sentence)
    if len(sentences) >= max_sentences:
      break
  if not sentences:
    raise DataError("no text found in the input files; expected non-empty text",
                    path=", ".join(os.fspath(p) for p in input_files))

  tmp_prefix = os.path.join(directory, f".{os.path.basename(model_prefix)}.tmp{os.getpid()}")
  try:
    _train(spm, sentences, tmp_prefix, vocab_size, model_type, character_coverage, num_threads, verbose)
    SentencePieceTokenizer(tmp_prefix + ".model")  # checked before it replaces anything
    # The .model last: its presence is what marks a finished tokenizer.
    for suffix in (".vocab", ".model"):
      os.replace(tmp_prefix + suffix, model_prefix + suffix)
  finally:
    for suffix in (".vocab", ".model"):
      if os.path.lexists(tmp_prefix + suffix):
        os.remove(tmp_prefix + suffix)
  return SentencePieceTokenizer(model_prefix + ".model")


def _check_outputs(model_prefix: str, overwrite: bool) -> None:
  """Raises ValueError if PREFIX.model or PREFIX.vocab exists (unless `overwrite`) or cannot be a file."""
  if not os.path.basename(model_prefix):
    raise ValueError(f"model prefix {model_prefix!r} ends in a directory separator; expected a file name prefix "
                     "such as out/tok")
  for path in (model_prefix + ".model", model_prefix + ".vocab"):
    if os.path.isdir(path):
      raise ValueError(f"{path} is a directory; expected a file path for the tokenizer")
    if os.path.lexists(path) and not overwrite:
      raise ValueError(f"{path} already exists; expected a new model prefix (--overwrite replaces it)")
  parent = os.path.dirname(os.path.abspath(model_prefix))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f"{parent} is a file; expected a directory for {model_prefix}.model")


def _train(spm, sentences: list[str], model_prefix: str, vocab_size: int, model_type: str,
           character_coverage: float, num_threads: int | None, verbose: bool) -> None:
  """sentencepiece's trainer with the LLaDA special tokens and lossless normalisation."""
  controls = [p for p, i in sorted(SENTENCEPIECE_SPECIAL_IDS.items(), key=lambda kv: kv[1])
              if i > 2]
  spm.SentencePieceTrainer.Train(
      sentence_iterator=iter(sentences),
      model_prefix=model_prefix,
      vocab_size=vocab_size,
      model_type=model_type,
      character_coverage=character_coverage,
      byte_fallback=True,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,
      split_digits=True,
      max_sentence_length=1 << 16,
      # A small corpus may not support the requested size; a smaller vocabulary is fine.
      hard_vocab_limit=False,
      unk_id=SENTENCEPIECE_SPECIAL_IDS[UNK_TOKEN],
      bos_id=SENTENCEPIECE_SPECIAL_IDS[BOS_TOKEN],
      eos_id=SENTENCEPIECE_SPECIAL_IDS[EOS_TOKEN],
      pad_id=-1,
      unk_piece=UNK_TOKEN,
      bos_piece=BOS_TOKEN,
      eos_piece=EOS_TOKEN,
      control_symbols=controls,
      num_threads=num_threads or os.cpu_count() or 1,
      minloglevel=0 if verbose else 2,
  )

