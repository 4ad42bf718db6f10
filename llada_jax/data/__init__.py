"""Tokenizers and Grain input pipelines.

Names are imported lazily so that `python -m llada_jax.data.tokenizer` does not import the
module it is about to run (runpy warns about that).
"""

import importlib

_EXPORTS = {
    "DataError": "errors",
    "BATCH_SPECS": "pipelines",
    "KINDS": "pipelines",
    "Pipeline": "pipelines",
    "batch_spec": "pipelines",
    "make_dataset": "pipelines",
    "make_pipeline": "pipelines",
    "make_source": "pipelines",
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
