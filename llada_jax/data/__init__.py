"""Tokenizers, data-file readers and Grain input pipelines.

Names are imported lazily: the tools import `llada_jax.data.errors` for their error reporting, and
that should not load sentencepiece or Grain.
"""

import importlib

_EXPORTS = {
    "DataError": "errors",
    "BATCH_SPECS": "pipelines",
    "PACKED_BATCH_SPECS": "pipelines",
    "KINDS": "pipelines",
    "Pipeline": "pipelines",
    "batch_spec": "pipelines",
    "batch_stats": "packing",
    "make_dataset": "pipelines",
    "make_pipeline": "pipelines",
    "make_source": "pipelines",
    "DocumentSource": "packing",
    "ArrayRecordRowSource": "sources",
    "PreferenceSource": "sources",
    "SFTSource": "sources",
    "TokenRowSource": "sources",
    "write_array_record": "sources",
    "HuggingFaceTokenizer": "tokenizer",
    "SentencePieceTokenizer": "tokenizer",
    "Tokenizer": "tokenizer",
    "check_vocab": "tokenizer",
    "load_tokenizer": "tokenizer",
    "train_sentencepiece": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  globals()[name] = value
  return value


def __dir__():
  return __all__
